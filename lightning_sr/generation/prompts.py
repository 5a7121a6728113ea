"""Turning a batch of prompts into token ids for the generator, and the ids that end a reply."""

from __future__ import annotations

from typing import Sequence

from lightning_sr.chat import Prompt, encode_prompt


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
