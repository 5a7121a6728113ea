"""Step time and memory of OnDARE / OnTIES against torch.optim.AdamW (foreach) on a random Llama.

All optimizers hold the same parameters of one random Llama with fixed random gradients; only
``optimizer.step()`` is timed, no forward or backward pass. Presets (``--preset``):

- ``106m`` (default): hidden 768, 8 layers, vocab 32000, untied head: 106M fp32 parameters;
- ``1b``: the TinyLlama-1.1B shape (hidden 2048, 22 layers, 4 key-value heads, vocab 32000,
  untied head): 1.1B fp32 parameters, for ``--device cuda`` (about 50 GB of GPU memory for the
  four optimizers' states; far too slow for a CPU).

The optimizers take turns step by step (round robin), so that on a shared machine every round
compares them under the same load; the time ratio is the median over rounds of (optimizer step
time / AdamW step time in the same round). On CUDA every timed step is bracketed by
``torch.cuda.synchronize()``, after ``--warmup`` untimed steps of each optimizer. Reported:

- ``step_s``: median wall-clock step time; ``time_ratio``: the paired median ratio to AdamW, and
  ``time_ratio_range`` the smallest and largest per-round ratio;
- CPU only, ``cpu_s`` / ``cpu_time_ratio``: the same for the process's CPU time
  (``time.process_time``). Other processes' load barely changes it, so on a shared machine run
  with ``--threads 1`` (with more threads it also counts OpenMP's spin-waiting) and compare these;
- ``state_bytes``: bytes of all tensors in the optimizer state; ``extra_state_bytes`` and
  ``extra_state_pct``: the bytes beyond AdamW's state (τ̃ indices + values, generator states,
  step-K buffer), absolute and as a percentage of the parameter bytes (target: <= 3% at
  keep_rate=0.01);
- ``peak_step_bytes``: the temporaries one step allocates beyond the memory held before it. On
  the CPU the largest resident-memory growth (Linux VmHWM, reset before each step), a lower
  bound: 0 means "fitted in memory the allocator already held". On CUDA the growth of
  ``torch.cuda.max_memory_allocated`` over the allocated bytes before the step.

Usage::

    .venv/bin/python benchmarks/optimizer_step.py     # table + benchmarks/results/optimizer_step.{csv,json}
    .venv/bin/python benchmarks/optimizer_step.py --rounds 3 --layers 2   # quicker, smaller model
    .venv/bin/python benchmarks/optimizer_step.py --threads 1    # CPU-time ratios robust to load
    python benchmarks/optimizer_step.py --device cuda --preset 1b --out benchmarks/results/optimizer_step_cuda
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
PRESETS = {
    "106m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=12),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),  # keeps the script working (the GPU proof's dry run)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}


def build_model(preset: str, layers: int | None, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(PRESETS[preset])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**{"vocab_size": 32000, "tie_word_embeddings": False, **shape})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _StepMeter:
    """Times one ``step()`` (wall clock and CPU time) and measures the memory it allocates beyond
    what was held before."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, optimizer) -> tuple[float, float, int]:
        cuda = self.torch.cuda
        if self.cuda:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            held = cuda.memory_allocated()
        else:
            held = _rss_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        if self.cuda:
            cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        peak = cuda.max_memory_allocated() if self.cuda else _rss_bytes("VmHWM")
        return elapsed, cpu, max(0, peak - held)


def run(names: list[str], preset: str, layers: int | None, rounds: int, warmup: int, device) -> list[dict]:
    import torch

    from lightning_sr.optim import OnDARE, OnTIES

    model = build_model(preset, layers, device)
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
    measure = _StepMeter(device)
    for optimizer in optimizers.values():
        for _ in range(warmup):
            measure(optimizer)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    peaks = {name: 0 for name in names}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            elapsed, cpu, peak = measure(optimizer)
            times[name].append(elapsed)
            cpu_times[name].append(cpu)
            peaks[name] = max(peaks[name], peak)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"torch threads: {torch.get_num_threads()}"
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
            "device": device.type,
            "params": sum(p.numel() for p in params),
            "param_bytes": param_bytes,
            "step_s": statistics.median(times[name]),
            "step_s_all": times[name],
            "cpu_s": statistics.median(cpu_times[name]),
            "cpu_s_all": cpu_times[name],
            "state_bytes": state_bytes,
            "peak_step_bytes": peaks[name],
            "where": where,
        })
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--preset", choices=list(PRESETS), default="106m")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per optimizer, round robin")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "optimizer_step")
    args = parser.parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = ["AdamW"] + [n for n in args.only if n != "AdamW"]
    load_before = os.getloadavg()
    rows = run(names, args.preset, args.layers, args.rounds, args.warmup, device)
    adamw = rows[0]
    for row in rows:
        ratios = [t / a for t, a in zip(row["step_s_all"], adamw["step_s_all"])]
        row["time_ratio"] = statistics.median(ratios)
        row["time_ratio_range"] = [min(ratios), max(ratios)]
        cpu_ratios = [t / a for t, a in zip(row["cpu_s_all"], adamw["cpu_s_all"])]
        row["cpu_time_ratio"] = statistics.median(cpu_ratios) if device.type == "cpu" else None
        row["extra_state_bytes"] = row["state_bytes"] - adamw["state_bytes"]
        row["extra_state_pct"] = 100 * row["extra_state_bytes"] / row["param_bytes"]
        target = TARGETS.get(row["optimizer"])
        row["time_target"] = target
        row["time_target_met"] = None if target is None else row["time_ratio"] <= target
        compared = row["optimizer"] != "AdamW"
        row["memory_target_met"] = row["extra_state_pct"] <= 3.0 if compared else None

    print(f"{rows[0]['params'] / 1e6:.1f}M fp32 parameters on {device} ({rows[0]['where']}), "
          f"{args.rounds} round-robin steps per optimizer")
    print(f"{'optimizer':<10} {'step s':>8} {'x AdamW':>8} {'per-round x':>12} {'cpu s':>7} {'cpu x':>6} "
          f"{'state MiB':>10} {'extra %':>8} {'peak step MiB':>14}")
    for r in rows:
        low, high = r["time_ratio_range"]
        cpu_ratio = "-" if r["cpu_time_ratio"] is None else f"{r['cpu_time_ratio']:.2f}"
        print(f"{r['optimizer']:<10} {r['step_s']:>8.3f} {r['time_ratio']:>8.2f} {f'{low:.2f}-{high:.2f}':>12} "
              f"{r['cpu_s']:>7.3f} {cpu_ratio:>6} {r['state_bytes'] / 2**20:>10.1f} "
              f"{r['extra_state_pct']:>8.2f} {r['peak_step_bytes'] / 2**20:>14.1f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        fields = [k for k in rows[0] if not k.endswith("_all")]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out.with_suffix('.csv')} and .json")
    return rows


if __name__ == "__main__":
    main()
