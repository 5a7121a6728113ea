"""Step time, τ̃ bytes per rank and communication of OnDARE / OnTIES on an FSDP2-sharded Llama.

A random Llama is sharded with ``fully_shard`` (one unit per decoder layer) over 1, 2 and 4 CPU
processes (gloo, one thread each); every optimizer holds the same sharded parameters with the
same random gradients, new each step (each rank its shard of the whole gradient), and only
``optimizer.step()`` is timed: no forward or backward pass, whose cost FSDP2 sets and AdamW
shares. ``torch.optim.AdamW(foreach=True)`` on the same DTensor parameters is the baseline.

Per (processes, optimizer): the median step time over ``--steps`` steps after one warm-up step,
its ratio to AdamW's (median of the per-step ratios, the optimizers taking turns step by step),
τ̃ bytes on the largest rank and summed over ranks, and the bytes the optimizer itself sends per
step and rank (counted by wrapping ``torch.distributed``'s collectives during ``step()``: OnDARE
draws every mask from the same stream on every rank and sends nothing; OnTIES agrees on each
parameter's top-k threshold with a few small all-reduces).

Presets: ``100m`` (hidden 768, 12 layers, MLP 2048, vocab 16000: 110M parameters) and ``tiny``
(for the test suite; its numbers mean nothing). On a 2-core machine 4 processes share 2 cores:
their times include that contention.

Usage::

    .venv/bin/python benchmarks/sharded_step.py                  # table + results/sharded_step.{csv,json}
    .venv/bin/python benchmarks/sharded_step.py --preset tiny --processes 1 2 --out /tmp/x
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine_info, print_table, write_csv, write_json  # noqa: E402

PRESETS = {
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=16000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", {"lr": 1e-6, "foreach": True}),
    "OnDARE": ("lightning_sr.optim", "OnDARE", {"lr": 1e-6, "keep_rate": 0.01, "merge_weight": 1e-7}),
    "OnTIES": ("lightning_sr.optim", "OnTIES", {"lr": 1e-6, "keep_rate": 0.01, "merge_weight": 1e-7}),
}
COLUMNS = ["processes", "optimizer", "step_s", "time_ratio", "tau_bytes_max_rank", "tau_bytes_total",
           "sent_bytes_per_step", "collectives_per_step"]


class CollectiveCounter:
    """Counts the calls and tensor bytes of ``torch.distributed``'s collectives while active."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor")

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.bytes, self.active = dist, 0, 0, False
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self.originals.items():
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
            return original(tensor, *args, **kwargs)

        return counted


def _worker(rank: int, processes: int, preset: str, steps: int, out: str) -> None:
    import importlib

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_sr.optim.shards import flat_shard, local
    from lightning_sr.sharding import shard_model

    counter = CollectiveCounter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**PRESETS[preset], tie_word_embeddings=False))
    base = {n: p.detach() - 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    shard_model(model, init_device_mesh("cpu", (processes,)))
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(1)

    def new_gradients():  # each rank's shard of one whole random gradient per parameter
        for p in params:
            shard = flat_shard(p)
            whole = torch.randn(p.numel(), generator=generator)
            part = whole[shard.start : shard.start + local(p).numel()].view(local(p).shape)
            p.grad = DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizers = {}
    for name, (module, cls, kwargs) in OPTIMIZERS.items():
        opt = getattr(importlib.import_module(module), cls)(params, **kwargs)
        if hasattr(opt, "set_base"):
            opt.set_base(model, base)
        optimizers[name] = opt
    del base
    times = {name: [] for name in optimizers}
    sent = {name: (0, 0) for name in optimizers}
    for round_ in range(steps + 1):
        new_gradients()  # fresh each round (a constant gradient ties every |m̂|/√v̂ at 1)
        for name, opt in optimizers.items():
            counter.calls = counter.bytes = 0
            dist.barrier()
            counter.active, start = True, time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            counter.active = False
            seconds = torch.tensor([elapsed])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            if round_:  # the first round warms up
                times[name].append(float(seconds))
                sent[name] = (counter.calls, counter.bytes)
    tau = {}
    for name, opt in optimizers.items():
        mine = torch.tensor([opt.reference_bytes() if hasattr(opt, "reference_bytes") else 0])
        gathered = [torch.zeros_like(mine) for _ in range(processes)]
        dist.all_gather(gathered, mine)
        tau[name] = [int(t) for t in gathered]
    if rank == 0:
        torch.save({"times": times, "sent": sent, "tau": tau, "parameters": sum(p.numel() for p in params)}, out)


def measure(processes: int, preset: str, steps: int) -> list[dict]:
    from lightning_sr.testing import spawn_gloo

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.pt"
        spawn_gloo(_worker, processes, preset, steps, str(out))
        result = torch.load(out)
    adamw = result["times"]["AdamW"]
    rows = []
    for name, times in result["times"].items():
        calls, sent = result["sent"][name]
        rows.append({
            "processes": processes, "optimizer": name, "parameters": result["parameters"],
            "step_s": statistics.median(times),
            "time_ratio": statistics.median(t / a for t, a in zip(times, adamw)),
            "tau_bytes_max_rank": max(result["tau"][name]), "tau_bytes_total": sum(result["tau"][name]),
            "sent_bytes_per_step": sent, "collectives_per_step": calls,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="100m")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each optimizer (after one warm-up)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for processes in args.processes:
        rows += measure(processes, args.preset, args.steps)
        print_table([r for r in rows if r["processes"] == processes], COLUMNS)
        sys.stdout.flush()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sharded_step" if args.preset == "100m" else f"sharded_step_{args.preset}"
    write_csv(args.out / f"{stem}.csv", rows)
    write_json(args.out / f"{stem}.json", {"command": command_line(), "machine": machine_info(), "rows": rows})
    print(f"wrote {args.out / stem}.csv and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
