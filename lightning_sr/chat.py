"""Prompts and replies as chat messages, rendered into token ids with a tokenizer's chat template.

The one home of chat-template handling: the generator encodes prompts with :func:`encode_prompt`,
the reward model renders (prompt, reply) turns with :func:`as_messages`, and the training data
modules split a rendered conversation into prompt ids and reply ids with :func:`encode_exchange`.
Plain Python + a Hugging Face tokenizer; no torch, no Lightning.
"""

from __future__ import annotations

from typing import Any, Union

Message = dict[str, Any]
Prompt = Union[str, list[Message]]
"""A prompt: plain text (one user turn) or a list of chat messages ``{"role", "content"}``."""


def as_messages(value: Prompt, role: str = "user") -> list[Message]:
    """A chat message list: a string becomes one message of ``role``."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: message contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(message.get("content", "")) for message in prompt)


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    """Whether text is rendered through the tokenizer's chat template (asked for, and it has one)."""
    return chat_template and getattr(tokenizer, "chat_template", None) is not None


def encode_prompt(tokenizer, prompt: Prompt, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, ready to be continued by the model.

    With a chat template the prompt is rendered as its messages followed by the assistant's
    generation prompt; otherwise the plain text is tokenized with the tokenizer's special tokens
    (e.g. BOS). Raises ``ValueError`` for a chat message list without a chat template and for a
    prompt with nothing to condition on.
    """
    if not isinstance(prompt, (str, list)):
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list):
        raise ValueError(
            "the prompt is a chat message list but the tokenizer has no chat template "
            "(or chat_template=False): pass plain text or a tokenizer with a chat template"
        )
    else:
        if not prompt.strip():
            raise ValueError("the prompt is empty and the tokenizer has no chat template")
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


def encode_exchange(tokenizer, prompt: Prompt, reply: Prompt, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of the reply that continues it, for training on the reply.

    With a chat template the reply (a string, or the assistant message(s) that follow the prompt)
    is rendered as the rest of the conversation after the generation prompt, so it carries the
    template's end-of-turn tokens. Without one, the prompt is tokenized with special tokens and the
    EOS token is appended to the reply. Raises ``ValueError`` when the template does not render the
    reply as a continuation of the prompt, or when chat messages meet a tokenizer without template.
    """
    if uses_chat_template(tokenizer, chat_template):
        messages = as_messages(prompt)
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + as_messages(reply, "assistant"), tokenize=False)
        if not full.startswith(head):
            raise ValueError(
                "the chat template does not render the reply as a continuation of the prompt with its "
                "generation prompt; use chat_template=False"
            )
        return _ids(tokenizer, head, special=False), _ids(tokenizer, full[len(head) :], special=False)
    if isinstance(prompt, list) or isinstance(reply, list):
        raise ValueError("chat messages need a tokenizer with a chat template (and chat_template=True)")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return _ids(tokenizer, prompt, special=True), _ids(tokenizer, reply, special=False) + eos


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])
