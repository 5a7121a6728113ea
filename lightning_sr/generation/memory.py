"""KV-cache accounting and the memory budget that drives speculative rejection's decisions."""

from __future__ import annotations

import torch


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Bytes one token of one row adds to a full-attention KV cache.

    ``2 (keys and values) x layers x kv_heads x head_dim x bytes per element``, read from the
    model config (the text config for multimodal models). Sliding-window layers are counted as
    full layers, so the figure is an upper bound for such models.
    """
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers ``Cache``."""
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
