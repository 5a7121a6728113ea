"""Shared pieces of the generation benchmarks: model presets, prompts, machine facts, output files.

Two presets:

- ``tiny``: a random 2-layer Llama with a word-level tokenizer and chat template, and a random
  1-layer BERT reward model with its own tokenizer, all built from configs in code (nothing is
  read from disk or downloaded). It only keeps the scripts working; its numbers mean nothing.
- ``embedded``: the package's embedded defaults, SmolLM2-135M-Instruct as generator and the
  ``minilm-positivity`` reward model, on the shipped prompts ``configs/data/prompts.jsonl``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS_FILE = ROOT / "configs" / "data" / "prompts.jsonl"

TINY_PROMPTS = [
    "the good day",
    "thanks for your help",
    "we are not very happy today",
    "please help my friend",
    "sorry , i was rude",
    "this is a terrible night",
    "you are very kind",
    "tomorrow is a great day",
]


def tiny_models(seed: int = 0):
    """(generator, tokenizer, reward) built from configs in code: random weights, no files."""
    from lightning_sr.rewards import HFRewardModel
    from lightning_sr.testing import make_tokenizer, tiny_llama, tiny_reward_model

    tokenizer = make_tokenizer(chat_template=True)
    generator = tiny_llama(tokenizer, seed=seed, hidden_size=64, intermediate_size=128, max_position_embeddings=512)
    # A wide initialisation gives scores that differ visibly between responses.
    reward_model, reward_tokenizer = tiny_reward_model(seed=seed, max_position_embeddings=512, initializer_range=0.5)
    return generator, tokenizer, HFRewardModel(reward_model, reward_tokenizer)


def embedded_models(dtype: torch.dtype = torch.float32):
    """(generator, tokenizer, reward): SmolLM2-135M-Instruct (in ``dtype``) and ``minilm-positivity``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_sr.assets import resolve_model
    from lightning_sr.rewards import HFRewardModel

    path = resolve_model("smollm2-135m-instruct")
    generator = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return generator, tokenizer, HFRewardModel("minilm-positivity")


def load_models(preset: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The preset's (generator, tokenizer, reward), the generator (in ``dtype``) and reward on ``device``."""
    if preset == "tiny":
        generator, tokenizer, reward = tiny_models()
    elif preset == "embedded":
        generator, tokenizer, reward = embedded_models(dtype)
    else:
        raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'embedded'")
    generator.to(device=device, dtype=dtype)
    reward.to(device)
    return generator, tokenizer, reward


def load_prompts(preset: str, count: int) -> list[str]:
    """``count`` prompts: the tiny list, or evenly spaced shipped prompts (all categories)."""
    if preset == "tiny":
        prompts = TINY_PROMPTS
    else:
        from lightning_sr.data.prompts import read_prompts

        prompts = [item["prompt"] for item in read_prompts(PROMPTS_FILE)]
    if count > len(prompts):
        raise ValueError(f"asked for {count} prompts but the {preset} preset has {len(prompts)}")
    stride = len(prompts) / count
    return [prompts[int(i * stride)] for i in range(count)]


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), cpu)
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv]) if sys.argv else ""


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
