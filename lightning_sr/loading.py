"""Loading models, tokenizers and weights by name: the one place every other module loads from.

A *source* is a hub id, a local Hugging Face folder, an embedded default name
(``"smollm2-135m-instruct"``, ``"minilm-positivity"``: see :mod:`lightning_sr.assets`), or an
object that is already loaded (returned as it is). Loading is quiet: transformers' per-load
"Loading weights" bars and notices are switched off while our loaders run
(:func:`~lightning_sr.quiet.quiet_transformers`, also importable from here).

This module uses :mod:`lightning_sr.assets` (to turn an embedded name into its built folder);
``assets`` never imports this module back.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sr.assets import EMBEDDED_MODELS, resolve_model
from lightning_sr.quiet import quiet_transformers


def torch_dtype(dtype: Any) -> Any:
    """A torch dtype from its name (``"bfloat16"``); a dtype, ``"auto"`` and None pass through."""
    if not isinstance(dtype, str) or dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return value


def check_source(source: Any, what: str) -> None:
    """Fail early, naming ``what``, when a source is a local path that does not exist.

    A name shaped like a hub id (``org/name``) or an embedded name cannot be checked offline and
    passes; anything that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) must exist.
    """
    if not isinstance(source, (str, Path)) or str(source) in EMBEDDED_MODELS:
        return
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{what}: {text!r} is not a folder or file that exists (nor a hub id)")


def load_causal_lm(source: str | nn.Module, dtype: Any = None, **kwargs) -> nn.Module:
    """An ``AutoModelForCausalLM`` from a source; ``dtype`` is a dtype, its name, ``"auto"`` or None."""
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(resolve_model(source), **kwargs)


def load_sequence_classifier(source: str | nn.Module, dtype: Any = None, **kwargs) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` (a reward model) from a source."""
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoModelForSequenceClassification

    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    with quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(resolve_model(source), **kwargs)


def load_tokenizer(source: Any):
    """An ``AutoTokenizer`` from a source; a tokenizer object is returned as it is."""
    if not isinstance(source, (str, Path)):
        return source
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_model(str(source)))


class LazyTensor:
    """One tensor of a safetensors file, read only when indexed: ``t[a:b]`` reads rows a to b,
    ``t[:]`` all of it. ``shape`` comes from the file's header."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...]):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def __getitem__(self, index) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as file:
            if index == slice(None) or not self.shape:
                return file.get_tensor(self.name)
            return file.get_slice(self.name)[index]

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, path={str(self.path)!r})"


def _lazy_safetensors(files: list[Path]) -> dict[str, LazyTensor]:
    """Every tensor of ``files`` by name, as :class:`LazyTensor` s (only the headers are read)."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                tensors[name] = LazyTensor(path, name, file.get_slice(name).get_shape())
    return tensors


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder saved as safetensors (one file or an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def load_weights(source: Any, lazy: bool = False, **kwargs) -> Mapping[str, torch.Tensor]:
    """A model's tensors by name, from whatever form a user has them in.

    - a ``torch.nn.Module`` or a mapping of tensors: used as they are;
    - a ``.safetensors`` file;
    - a Lightning ``.ckpt`` (its ``state_dict``), a litgpt / Fabric ``lit_model.pth`` (its
      ``model``) or any ``torch.save`` file of a state dict (loaded with ``weights_only=True``,
      memory-mapped: pages are read when used);
    - anything else: a hub id, a Hugging Face folder or an embedded name, loaded with
      :func:`load_causal_lm` in the checkpoint's own dtype (``kwargs`` go to ``from_pretrained``).

    With ``lazy=True`` a ``.safetensors`` file, and a local or embedded Hugging Face folder of
    safetensors, give :class:`LazyTensor` values that read only what is indexed (the online
    merging optimizers read one parameter, or one shard of it, at a time), with the names as
    stored in the files.

    Names keep their prefixes (a ``.ckpt`` of a LightningModule holding ``self.policy`` names its
    weights ``policy.model...``); the online merging optimizers align prefixes by themselves.
    """
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"weights must come from a model name or path, a checkpoint file, a torch.nn.Module or "
            f"a state dict, got {type(source).__name__}"
        )
    path = Path(source)
    if path.suffix == ".safetensors":
        if lazy:
            return _lazy_safetensors([_existing(path)])
        from safetensors.torch import load_file

        return load_file(str(_existing(path)))
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            state = torch.load(_existing(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path} holds Python objects, not only tensors: save a state_dict() instead") from None
        for key in ("state_dict", "model"):  # a Lightning .ckpt; litgpt's / Fabric's {"model": ...}
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
                break
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} holds no state dict of tensors (a Lightning .ckpt or a torch.save of one)")
        return state
    if lazy and not kwargs:
        folder = Path(resolve_model(str(source))).expanduser()
        files = _safetensors_files(folder) if folder.is_dir() else []
        if files:
            return _lazy_safetensors(files)
    return load_causal_lm(str(source), **{"dtype": "auto", **kwargs}).state_dict()


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path
