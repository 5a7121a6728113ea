"""OnDARE / OnTIES under litgpt's ``finetune_full``, with no callback: a tiny worked example.

litgpt builds the optimizer from bare ``model.parameters()`` by class path and ``init_args``, and
loads the fine-tuned checkpoint only afterwards. The online merging optimizers therefore take the
base themselves (``init_args: {"base_model": ...}``) and compute τ = θ_SFT − θ_base at their first
step, pairing the parameters with the base by position (a litgpt ``lit_model.pth`` is a state dict
in module order).

    python scripts/litgpt_online_merging.py prepare DIR   # tiny base and SFT checkpoints, data
    litgpt finetune_full DIR/sft ... --optimizer '{"class_path": "lightning_sr.optim.OnDARE",
        "init_args": {..., "base_model": "DIR/base/lit_model.pth"}}'   # the command it prints
    python scripts/litgpt_online_merging.py check DIR     # did training pull toward τ?

``prepare`` writes two litgpt checkpoints of a one-layer GPT with random weights (``DIR/base`` and
``DIR/sft``, the SFT one being the base plus a random τ) with the project's test tokenizer, and
an instruction file ``DIR/data.json``; it prints the ``litgpt finetune_full`` command.
``check`` compares the fine-tuned weights ``DIR/out/final/lit_model.pth`` with the SFT weights:
the update has a component along τ (cosine > 0) only because the optimizer merged α·τ̃ at every
step. With ``--exact`` (after a run with ``lr=0``, ``keep_rate=1``) it checks the update is
exactly ``steps · α · τ``: τ came from the SFT weights litgpt loaded after building the optimizer.

litgpt is not a dependency of lightning-sr (its pins, ``jsonargparse<=4.41`` and
``huggingface-hub<1.4``, conflict with transformers 5); install it where you run this.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

CONFIG = dict(name="tiny-online-merging", block_size=64, n_layer=1, n_head=2, n_embd=32, intermediate_size=64,
              bias=True, padding_multiple=1)
ALPHA, KEEP_RATE, STEPS = 1e-2, 0.3, 3


def command(directory: Path, lr: float = 1e-5, keep_rate: float = KEEP_RATE) -> list[str]:
    """The ``litgpt finetune_full`` command line that fine-tunes ``directory/sft`` with OnDARE."""
    optimizer = {
        "class_path": "lightning_sr.optim.OnDARE",
        "init_args": {"lr": lr, "keep_rate": keep_rate, "merge_weight": ALPHA,
                      "base_model": str(directory / "base" / "lit_model.pth")},
    }
    return [
        "litgpt", "finetune_full", str(directory / "sft"), "--out_dir", str(directory / "out"),
        "--precision", "32-true", "--data", "JSON", "--data.json_path", str(directory / "data.json"),
        "--data.val_split_fraction", "0.25", "--train.max_steps", str(STEPS), "--train.global_batch_size", "2",
        "--train.micro_batch_size", "2", "--train.lr_warmup_steps", "1", "--train.max_seq_length", "32",
        "--eval.initial_validation", "false", "--eval.final_validation", "false", "--eval.interval", "1000",
        "--optimizer", json.dumps(optimizer),
    ]


def prepare(directory: Path) -> None:
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    from lightning_sr.testing import make_tokenizer

    tokenizer = make_tokenizer()
    config = Config(**CONFIG, vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer))
    torch.manual_seed(0)
    base = GPT(config).state_dict()
    generator = torch.Generator().manual_seed(1)
    sft = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    for name, weights in (("base", base), ("sft", sft)):
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        save_config(config, folder)
        torch.save(weights, folder / "lit_model.pth")
        tokenizer.save_pretrained(folder)
    words = ["good", "bad", "thanks", "hello", "you", "great"]
    rows = [{"instruction": f"say {a}", "input": "", "output": f"{a} {b}"} for a in words for b in words[:2]]
    (directory / "data.json").write_text(json.dumps(rows))
    print(shlex.join(command(directory)))


def check(directory: Path, exact: bool) -> None:
    base = torch.load(directory / "base" / "lit_model.pth", weights_only=True)
    sft = torch.load(directory / "sft" / "lit_model.pth", weights_only=True)
    final = torch.load(directory / "out" / "final" / "lit_model.pth", weights_only=True)
    final = final.get("model", final)
    tau = torch.cat([(sft[k] - base[k]).flatten() for k in sft])
    update = torch.cat([(final[k] - sft[k]).flatten() for k in sft])
    cosine = torch.nn.functional.cosine_similarity(update, tau, dim=0).item()
    print(f"cosine(θ_final − θ_SFT, τ) = {cosine:.4f} over {tau.numel()} weights")
    if exact:  # lr = 0, keep_rate = 1: every step adds α·τ exactly
        torch.testing.assert_close(update, STEPS * ALPHA * tau, rtol=1e-4, atol=1e-6)
        print(f"θ_final − θ_SFT = {STEPS} · {ALPHA} · τ: τ was computed from the fine-tuned weights")
    elif cosine <= 0:
        sys.exit("training did not pull toward τ: was base_model given?")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("prepare").add_argument("directory", type=Path)
    checking = sub.add_parser("check")
    checking.add_argument("directory", type=Path)
    checking.add_argument("--exact", action="store_true", help="after a run with lr=0 and keep_rate=1")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        prepare(args.directory)
    else:
        check(args.directory, args.exact)


if __name__ == "__main__":
    main()
