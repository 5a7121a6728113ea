"""Turning prompts (strings or chat message lists) into token ids for the generator."""

from __future__ import annotations

from typing import Any, Sequence

Prompt = str | list[dict[str, Any]]


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """A prompt as a chat message list: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: message contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(message.get("content", "")) for message in prompt)


def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, ready to be continued by the generator.

    With ``chat_template`` and a tokenizer that has one, each prompt is rendered as a user turn
    (or as its own message list) followed by the assistant's generation prompt. Otherwise the
    plain text is tokenized with the tokenizer's special tokens (e.g. BOS). A message list needs a
    chat template; an empty prompt with no chat template has nothing to condition on: both errors.
    """
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    encoded = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list)):
            raise TypeError(
                f"prompt {index} must be a string or a list of chat messages, got {type(prompt).__name__}"
            )
        if use_template:
            text = tokenizer.apply_chat_template(
                as_messages(prompt), tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list):
            raise ValueError(
                f"prompt {index} is a chat message list but the tokenizer has no chat template "
                "(or chat_template=False): pass plain strings or a tokenizer with a chat template"
            )
        else:
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty and the tokenizer has no chat template")
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {index} encodes to no tokens")
        encoded.append(list(ids))
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
