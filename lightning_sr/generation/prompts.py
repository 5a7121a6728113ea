"""Turning a batch of prompts into token ids for the generator, the ids that end a reply, and
the room the generator's context leaves for it."""

from __future__ import annotations

from typing import Sequence

from lightning_sr.chat import Prompt, encode_prompt
from lightning_sr.generation.memory import text_config


def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, ready to be continued (:func:`lightning_sr.chat.encode_prompt`).

    Errors name the prompt's position in ``prompts``.
    """
    encoded = []
    for index, prompt in enumerate(prompts):
        try:
            encoded.append(encode_prompt(tokenizer, prompt, chat_template))
        except (TypeError, ValueError) as error:
            raise type(error)(f"prompt {index}: {error}") from None
    return encoded


def stop_token_ids(model, tokenizer, extra: Sequence[int] = ()) -> list[int]:
    """EOS ids: the union of the generation config's, the tokenizer's and ``extra``."""
    ids: set[int] = set(int(i) for i in extra)
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise ValueError(
            "the generator has no EOS token id (generation config, model config and tokenizer): "
            "pass stop ids with SamplingParams(stop_token_ids=[...])"
        )
    return sorted(ids)


def context_length(model_config) -> int | None:
    """Tokens the generator can attend to (prompt and reply together), or None when unbounded.

    ``max_position_embeddings`` (``n_positions`` for GPT-2) of the text config. A caller can
    check prompt lengths against it before decoding.
    """
    config = text_config(model_config)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def row_limits(model_config, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Tokens each prompt's rows may generate: ``max_new_tokens`` or what the context leaves.

    Raises ``ValueError`` naming the first prompt that leaves no room for a reply.
    """
    context = context_length(model_config)
    limits = []
    for index, ids in enumerate(prompt_ids):
        if context is not None and len(ids) >= context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens, which leaves no room in the generator's "
                f"context of {context} tokens"
            )
        limits.append(max_new_tokens if context is None else min(max_new_tokens, context - len(ids)))
    return limits
