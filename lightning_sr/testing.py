"""Tiny random models and in-memory tokenizers built from configs in code: nothing is downloaded.

Used by the test suite and the benchmarks' ``tiny`` preset, and handy for trying the engine
without any model files: ``generator = tiny_llama(tokenizer := make_tokenizer(chat_template=True))``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "user assistant system the a an good bad kind rude thanks thank sorry please help you we i "
    "are is was not very happy sad day night love hate great awful nice terrible friend enemy "
    "today tomorrow yes no maybe and or but so to of in on for with it this that my your our "
    "capital france paris city is of , . ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_tokenizer(chat_template: bool = False, words=WORDS, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary, with an optional chat template."""
    vocab = {}
    for token in SPECIALS + list(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer=None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, random weights, eval mode."""
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            **_special_ids(tokenizer),
            **overrides,
        }
    )
    return LlamaForCausalLM(config).eval()


def _special_ids(tokenizer) -> dict:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def tiny_gpt2(tokenizer=None, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (learned absolute positions), random weights, eval mode."""
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        **{"vocab_size": len(tokenizer), "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
           **_special_ids(tokenizer), **overrides}
    )
    return GPT2LMHeadModel(config).eval()


def tiny_reward_model(seed: int = 0, **overrides):
    """A tiny BERT sequence classifier (one label) with its own, upper-case tokenizer."""
    tokenizer = make_tokenizer(words=[w.upper() for w in WORDS] + ["[CLS]", "[SEP]"], padding_side="right")
    tokenizer.cls_token, tokenizer.sep_token = "[CLS]", "[SEP]"
    torch.manual_seed(seed)
    config = BertConfig(
        **{"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "max_position_embeddings": 128, "num_labels": 1,
           "pad_token_id": tokenizer.pad_token_id, **overrides}
    )
    return BertForSequenceClassification(config).eval(), tokenizer


def save_tiny_generator(directory: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny Llama and its tokenizer with ``save_pretrained``; returns the folder."""
    tokenizer = make_tokenizer(chat_template=chat_template)
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_tiny_reward(directory: Path, seed: int = 0) -> Path:
    """Save the tiny reward model and its tokenizer with ``save_pretrained``; returns the folder."""
    model, tokenizer = tiny_reward_model(seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def spawn_gloo(fn, processes: int, *args) -> None:
    """Run ``fn(rank, processes, *args)`` in ``processes`` new CPU processes joined by a gloo
    process group (one torch thread each); raises if any of them fails.

    ``fn`` must be importable by name (a module-level function). For the sharded-training tests
    and benchmarks: FSDP2 runs on CPUs with gloo.
    """
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_gloo_process, (processes, port, fn, args), nprocs=processes, start_method="spawn")


def _gloo_process(rank: int, processes: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes)
    try:
        fn(rank, processes, *args)
    finally:
        dist.destroy_process_group()
