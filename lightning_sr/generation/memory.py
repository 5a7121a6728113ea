"""KV-cache accounting and the memory budget that drives speculative rejection's decisions."""

from __future__ import annotations

import torch

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types the engine's static cache holds (a sliding-window layer is stored in full)."""


def kv_shape(model_config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a causal LM's KV cache, read from its config.

    Uses the text config of multimodal models. Raises ``NotImplementedError`` for layers the
    engine's cache cannot hold (linear attention, chunked attention, shared KV, ...).
    """
    config = text_config(model_config)
    layer_types = getattr(config, "layer_types", None) or ()
    unsupported = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    if unsupported or getattr(config, "attention_chunk_size", None):
        raise NotImplementedError(
            f"the generation engine caches full and sliding-window attention layers only; this model has "
            f"{unsupported or ['chunked_attention']} layers"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Bytes one token of one row takes in the engine's KV cache.

    ``2 (keys and values) x layers x kv_heads x head_dim x bytes per element``. Exact for the
    engine's :class:`~lightning_sr.generation.cache.StaticKVCache`, which keeps every layer's full
    history (a sliding-window layer's mask hides what lies outside its window).
    """
    layers, kv_heads, head_dim = kv_shape(model_config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_dtype(model) -> torch.dtype:
    """The dtype the KV cache will be stored in: autocast's when it is on (mixed precision)."""
    device_type = model.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.dtype


def fit_n(n, budget: int, per_token: int, prompt_ids: list[list[int]], min_tokens: int) -> int:
    """Check (or, for ``n='auto'``, choose) n so every row reaches ``min_tokens`` in the budget.

    Before the first possible decision the cache grows to ``rows x (prompt + min_tokens - 1)``
    tokens: the token sampled at ``min_tokens`` enters the cache only after the decision. So
    ``n x prompts x (W + min_tokens - 1) x per_token <= budget``, ``W`` the longest prompt, and
    ``n='auto'`` is the largest such ``n``.
    """
    prompts = len(prompt_ids)
    per_row = (max(len(ids) for ids in prompt_ids) + min_tokens - 1) * per_token
    fits = budget // (per_row * prompts)
    if fits < 1:
        raise ValueError(
            f"the memory budget of {budget} bytes cannot hold one row per prompt for {min_tokens} "
            f"tokens: {prompts} prompts need at least {per_row * prompts} bytes ({per_row} per row); "
            "raise the budget, lower min_tokens or send fewer prompts per batch"
        )
    if n == "auto":
        return int(fits)
    if n > fits:
        raise ValueError(
            f"n={n} rows per prompt need {n * per_row * prompts} bytes of KV cache to reach "
            f"min_tokens={min_tokens}, but the memory budget is {budget} bytes: it fits n<={fits} "
            f"(or use n='auto', or a budget of at least {n * per_row * prompts} bytes)"
        )
    return n


def text_config(model_config):
    """The decoder's config: the text config of a multimodal model, the config itself otherwise."""
    if hasattr(model_config, "get_text_config"):
        return model_config.get_text_config(decoder=True)
    return model_config


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers ``Cache``, one layer at a time."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def free_cuda_bytes(device: torch.device, margin_fraction: float) -> int:
    """Memory a new KV cache can take on a CUDA device, minus ``margin_fraction`` of its total.

    Free means free on the device plus what PyTorch's allocator holds cached but unused (the
    previous batch's cache, for instance), so the budget does not shrink from batch to batch.
    The margin leaves room for activations, the reward model's forward and allocator slack.
    """
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, int(free + cached - margin_fraction * total))
