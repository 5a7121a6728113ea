"""A trained model out of a Lightning checkpoint, for inference: one Hugging Face folder.

A sharded run (``lightning_sr.FSDP2Strategy``) checkpoints into a *folder* of per-rank shards
(torch's distributed checkpoint, plus Lightning's ``meta.pt``); ``FSDP2Strategy(
save_distributed_checkpoint=False)`` and the other strategies write one ``.ckpt`` file. Either is
read here in one process, with no process group and no GPU, and the policy of a
:class:`~lightning_sr.modules.preference.PreferenceModule` (or the model of an
:class:`~lightning_sr.modules.sft.SFTModule`) is written with ``save_pretrained`` as a single
safetensors file, its config and its tokenizer::

    python -m lightning_sr.export outputs/fit_dpo_ondare_fsdp/version_0/checkpoints/last.ckpt outputs/dpo-model

The folder loads anywhere a model name does (``--model.generator=outputs/dpo-model``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_sr.assets import resolve_model
from lightning_sr.loading import load_tokenizer, load_weights
from lightning_sr.quiet import quiet_transformers

__all__ = ["model_state_dict", "hyperparameters", "export_model", "main"]

METADATA = "meta.pt"  # what Lightning writes beside the shards of a distributed checkpoint
MODEL_ATTRIBUTES = {"policy": "policy.", "model": "model."}  # hyperparameter naming the model → its prefix


def model_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The whole module's weights (``policy.model.layers...``) of a checkpoint file or folder."""
    path = Path(checkpoint)
    if not path.is_dir():
        return dict(load_weights(path))
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    return state["state_dict"]


def hyperparameters(checkpoint: str | Path) -> dict:
    """The LightningModule's saved init arguments (``hyper_parameters``)."""
    path = Path(checkpoint)
    metadata = path / METADATA if path.is_dir() else path
    if not metadata.is_file():
        raise FileNotFoundError(f"{path}: not a Lightning checkpoint file, nor a folder with {METADATA}")
    return torch.load(metadata, map_location="cpu", weights_only=True, mmap=not path.is_dir()).get("hyper_parameters", {})


def export_model(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the trained policy (or SFT model) of ``checkpoint`` as a Hugging Face folder.

    The architecture and tokenizer come from the model the run started from (its ``policy`` /
    ``model`` hyperparameter: a name, a folder or an embedded default); the weights from the
    checkpoint. Raises ``ValueError`` when the checkpoint names no such model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    params = hyperparameters(checkpoint)
    attribute = next((a for a in MODEL_ATTRIBUTES if isinstance(params.get(a), str)), None)
    if attribute is None:
        raise ValueError(
            f"{checkpoint}: the checkpoint names no starting model (a 'policy' or 'model' hyperparameter); "
            "export works for PreferenceModule and SFTModule runs"
        )
    prefix = MODEL_ATTRIBUTES[attribute]
    weights = {k[len(prefix):]: v for k, v in model_state_dict(checkpoint).items() if k.startswith(prefix)}
    source = resolve_model(params[attribute])
    with quiet_transformers():
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
        model.load_state_dict(weights, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"{checkpoint}: no weights for {missing[:3]} ... in the checkpoint")
        output = Path(output)
        model.save_pretrained(output)
        load_tokenizer(source).save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_sr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file, or the folder a sharded run wrote")
    parser.add_argument("output", help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export_model(args.checkpoint, args.output)}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"lightning_sr.export: {error}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
