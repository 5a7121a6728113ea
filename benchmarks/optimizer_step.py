"""Step time and memory of OnDARE / OnTIES against torch.optim.AdamW (foreach) on a ~106M model.

All optimizers hold the same parameters of one random Llama (hidden 768, 8 layers, vocab 32000,
untied head: 106M fp32 parameters) with fixed random gradients; only ``optimizer.step()`` is
timed, no forward or backward pass. The optimizers take turns step by step (round robin), so
that on a shared machine every round compares them under the same load; the time ratio is the
median over rounds of (optimizer step time / AdamW step time in the same round). Reported:

- ``step_s``: median step time; ``time_ratio``: the paired median ratio to AdamW;
- ``state_bytes``: bytes of all tensors in the optimizer state, and ``extra_state_pct``: the bytes
  beyond AdamW's state (τ̃ indices + values, generator states, step-K buffer) as a percentage of
  the parameter bytes (target: <= 3% at keep_rate=0.01);
- ``peak_step_rss``: the largest resident-memory growth during one step over the memory held
  before it (Linux VmHWM, reset before each step): the temporaries a step allocates beyond what
  the allocator already holds, so a lower bound; 0 means "fitted in memory already held".

Usage::

    .venv/bin/python benchmarks/optimizer_step.py     # table + benchmarks/results/optimizer_step.{csv,json}
    .venv/bin/python benchmarks/optimizer_step.py --rounds 3 --layers 2   # quicker, smaller model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGETS = {"OnDARE": 1.5, "OnTIES": 2.0}
VARIANTS = {
    "AdamW": {},
    "OnDARE": {"keep_rate": 0.01, "merge_weight": 1e-7},
    "OnTIES": {"keep_rate": 0.01, "merge_weight": 1e-7},
    "OnDARE-K4": {"keep_rate": 0.01, "merge_weight": 1e-7, "merge_every": 4},
}


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run(names: list[str], layers: int, rounds: int, warmup: int) -> list[dict]:
    import torch

    from lightning_sr.optim import OnDARE, OnTIES

    model = build_model(layers)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    base = {n: p.detach() + torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
    optimizers = {}
    for name in names:
        if name == "AdamW":
            optimizers[name] = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, foreach=True)
        else:
            cls = OnDARE if name.startswith("OnDARE") else OnTIES
            optimizers[name] = cls(params, lr=1e-6, **VARIANTS[name])
            optimizers[name].set_base(model, base)
    del base
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    times = {name: [] for name in names}
    peaks = {name: 0 for name in names}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            held = _rss_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], _rss_bytes("VmHWM") - held)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    for name, optimizer in optimizers.items():
        state_bytes = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        rows.append({
            "optimizer": name,
            "params": sum(p.numel() for p in params),
            "param_bytes": param_bytes,
            "step_s": statistics.median(times[name]),
            "step_s_all": times[name],
            "state_bytes": state_bytes,
            "peak_step_rss": max(0, peaks[name]),
            "threads": torch.get_num_threads(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per optimizer, round robin")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "optimizer_step")
    args = parser.parse_args()
    names = ["AdamW"] + [n for n in args.only if n != "AdamW"]
    rows = run(names, args.layers, args.rounds, args.warmup)
    adamw = rows[0]
    for row in rows:
        ratios = [t / a for t, a in zip(row["step_s_all"], adamw["step_s_all"])]
        row["time_ratio"] = statistics.median(ratios)
        row["extra_state_pct"] = 100 * (row["state_bytes"] - adamw["state_bytes"]) / row["param_bytes"]
        target = TARGETS.get(row["optimizer"])
        row["time_target"] = target
        row["time_target_met"] = None if target is None else row["time_ratio"] <= target
        compared = row["optimizer"] != "AdamW"
        row["memory_target_met"] = row["extra_state_pct"] <= 3.0 if compared else None

    print(f"{rows[0]['params'] / 1e6:.1f}M fp32 parameters, {rows[0]['threads']} threads, "
          f"{args.rounds} round-robin steps per optimizer")
    print(f"{'optimizer':<10} {'step s':>8} {'x AdamW':>8} {'state MiB':>10} {'extra %':>8} "
          f"{'peak step MiB':>14}")
    for r in rows:
        print(f"{r['optimizer']:<10} {r['step_s']:>8.3f} {r['time_ratio']:>8.2f} "
              f"{r['state_bytes'] / 2**20:>10.1f} {r['extra_state_pct']:>8.2f} "
              f"{r['peak_step_rss'] / 2**20:>14.1f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "step_s_all"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out.with_suffix('.csv')} and .json")


if __name__ == "__main__":
    main()
