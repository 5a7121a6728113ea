"""Speculative Rejection against Best-of-N on the same engine, the same prompts and the same seeds.

Methods (all through ``lightning_sr.generation``):

- Best-of-N at every N of ``--ns`` (default 2, 4, ..., 64), each N run for real (its compute is
  the time it took to sample and score N responses per prompt, not a subset of a bigger run);
- Speculative Rejection starting at ``n = max(--ns)`` rows per prompt (the paper starts with as
  many rows as memory allows; here the memory is an explicit KV budget, so the start equals the
  largest Best-of-N), at every alpha of ``--alphas``, with the paper's memory schedule and with a
  fixed schedule (``--fixed-lengths``) for comparison.

The memory budget is fixed for the whole run: the KV cache of ``n`` rows for each prompt of a
batch at the longest prompt plus ``--min-tokens`` tokens. A batch therefore fills it shortly
after ``min_tokens`` (batches of shorter prompts a few tokens later) and must start rejecting,
as on a GPU whose memory is full.

Metrics (docs/DESIGN.md, "Metrics from the paper"; the reference is the smallest Best-of-N):

- improvement score: per prompt ``(best_method - best_ref) / (best_ref - worst_ref)``, reported as
  ``100 x (1 + mean)`` so the reference scores 100 (prompts whose reference samples tie are left
  out of the mean);
- relative compute: (generation + reward seconds) over the reference's; model loading excluded;
- speedup at equal score: the Best-of-N compute needed to reach the method's score (log-linear
  interpolation of the Best-of-N curve between the two N that bracket it) over the method's
  compute; "beyond curve" when the score exceeds the largest N's (then the figure is a lower
  bound). ``speedup_tokens`` is the same with generated tokens in place of seconds, a check that
  does not depend on the load of a shared machine. The ``*_reward`` columns do the same at equal
  mean reward (no per-prompt denominator, so less noisy with a 2-sample reference).

Prompts are processed in chunks (``--chunk``); within a chunk every method runs, in an order that
rotates from chunk to chunk, so a change of machine load is shared by all methods. A method
decodes ``max(1, --rows // n)`` prompts of a chunk together.

Usage::

    .venv/bin/python benchmarks/sr_vs_bon.py --preset embedded --threads 1  # 29 min on 2 busy CPU cores
    .venv/bin/python benchmarks/sr_vs_bon.py --preset tiny                  # seconds; keeps the script working
    .venv/bin/python benchmarks/sr_vs_bon.py --rederive benchmarks/results/sr_vs_bon_embedded.json

Writes ``benchmarks/results/sr_vs_bon_<preset>.{csv,json,png}`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    command_line,
    load_models,
    load_prompts,
    machine_info,
    print_table,
    write_csv,
    write_json,
)

from lightning_sr.generation import (  # noqa: E402
    FixedSchedule,
    MemorySchedule,
    SamplingParams,
    best_of_n,
    kv_bytes_per_token,
    speculative_rejection,
)
from lightning_sr.generation.prompts import encode_prompts  # noqa: E402

PRESETS = {
    "tiny": dict(prompts=4, chunk=2, max_new_tokens=12, min_tokens=4, fixed_lengths=[3, 6], rows=64),
    "embedded": dict(prompts=8, chunk=4, max_new_tokens=40, min_tokens=12, fixed_lengths=[8, 16, 32], rows=128),
}
COLUMNS = [
    "method", "schedule", "n", "alpha", "prompts", "mean_reward", "improvement_score", "scored_prompts",
    "generation_s", "reward_s", "compute_s", "relative_compute", "tokens_generated", "relative_tokens",
    "reward_tokens", "reward_calls", "mean_rounds", "peak_kv_bytes", "peak_cuda_bytes", "peak_rss_bytes",
    "bon_equivalent_n", "speedup", "speedup_tokens", "speedup_note",
    "bon_equivalent_n_reward", "speedup_reward", "speedup_reward_tokens", "speedup_reward_note",
]  # fmt: skip


@dataclass
class Method:
    """One row of the comparison: Best-of-N (alpha 0) or Speculative Rejection."""

    name: str
    n: int
    alpha: float = 0.0
    schedule: object = None
    schedule_name: str = "-"
    # Accumulated over prompts, in prompt order.
    chosen: list[float] = field(default_factory=list)
    finals: list[list[float]] = field(default_factory=list)
    generation_s: float = 0.0
    reward_s: float = 0.0
    tokens: int = 0
    reward_tokens: int = 0
    reward_calls: int = 0
    rounds: list[int] = field(default_factory=list)
    peak_kv: int = 0
    peak_cuda: int | None = None
    peak_rss: int | None = None

    @property
    def is_bon(self) -> bool:
        return self.alpha == 0

    @property
    def compute_s(self) -> float:
        return self.generation_s + self.reward_s

    def run(self, model, tokenizer, reward, prompts, sampling, seed):
        if self.is_bon:
            return best_of_n(model, tokenizer, reward, prompts, n=self.n, sampling=sampling, seed=seed)
        return speculative_rejection(
            model, tokenizer, reward, prompts, n=self.n, alpha=self.alpha, schedule=self.schedule,
            sampling=sampling, seed=seed,
        )  # fmt: skip

    def record(self, results) -> None:
        for result in results:
            stats = result.stats
            self.chosen.append(result.reward)
            self.finals.append([c.reward for c in result.candidates if c.final])
            self.generation_s += stats.generation_seconds
            self.reward_s += stats.reward_seconds
            self.tokens += stats.tokens_generated
            self.reward_tokens += stats.reward_tokens
            self.reward_calls += stats.reward_calls
            self.rounds.append(stats.rounds)
            self.peak_kv = max(self.peak_kv, stats.peak_kv_bytes)
            if stats.peak_memory_bytes is not None:
                self.peak_cuda = max(self.peak_cuda or 0, stats.peak_memory_bytes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    parser.add_argument("--prompts", type=int, help="number of prompts (evenly spaced over the file)")
    parser.add_argument("--chunk", type=int, help="prompts per chunk (all methods run on a chunk in turn)")
    parser.add_argument("--rows", type=int, help="rows decoded together: a method batches max(1, rows // n) prompts")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--min-tokens", type=int, help="tokens before the first decision of the memory schedule")
    parser.add_argument("--fixed-lengths", type=int, nargs="+", help="decision lengths of the fixed schedule")
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="Best-of-N sizes")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the generator's dtype (the reward model stays float32)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV, JSON and PNG")
    parser.add_argument("--rederive", type=Path, metavar="JSON",
                        help="recompute the derived columns and the plot of a saved run; runs nothing")  # fmt: skip
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ns = sorted(set(args.ns))
    return args


def memory_budget(model, tokenizer, prompts, n: int, prompts_per_batch: int, min_tokens: int) -> int:
    """KV bytes of ``n`` rows for each prompt of a full batch at the longest prompt + ``min_tokens``."""
    longest = max(len(ids) for ids in encode_prompts(tokenizer, prompts))
    return prompts_per_batch * n * (longest + min_tokens) * kv_bytes_per_token(model.config, model.dtype)


def build_methods(args, budget: int) -> list[Method]:
    methods = [Method(f"BoN-{n}", n) for n in args.ns]
    n_sr = max(args.ns)
    fixed = FixedSchedule(list(args.fixed_lengths))
    for alpha in args.alphas:
        memory = MemorySchedule(budget_bytes=budget, min_tokens=args.min_tokens)
        methods.append(Method(f"SR-mem-a{alpha:g}", n_sr, alpha, memory, "memory"))
    for alpha in args.alphas:
        methods.append(Method(f"SR-fixed-a{alpha:g}", n_sr, alpha, fixed, f"fixed{fixed.lengths}"))
    return methods


def run_all(args, model, tokenizer, reward, prompts, methods: list[Method], after_chunk=None) -> None:
    """Run every method on every chunk of prompts; each method records its results in prompt order.

    A batch's seed depends only on its chunk and its first prompt, so methods that batch the same
    prompts sample with the same seed. ``after_chunk()`` runs when every method has done a chunk.
    """
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    chunks = [prompts[i : i + args.chunk] for i in range(0, len(prompts), args.chunk)]
    start = time.perf_counter()
    for c, chunk in enumerate(chunks):
        order = methods[c % len(methods) :] + methods[: c % len(methods)]
        for method in order:
            per_batch = min(len(chunk), max(1, args.rows // method.n))
            _reset_peak_rss()
            results = []
            for b in range(0, len(chunk), per_batch):
                seed = args.seed + 1000 * c + b
                results.extend(method.run(model, tokenizer, reward, chunk[b : b + per_batch], sampling, seed))
            if [r.prompt for r in results] != list(chunk):
                raise RuntimeError(f"{method.name} returned results out of prompt order")
            method.record(results)
            rss = _peak_rss()
            if rss is not None:
                method.peak_rss = max(method.peak_rss or 0, rss)
            print(
                f"[{time.perf_counter() - start:7.1f}s] chunk {c + 1}/{len(chunks)} {method.name:>14}: "
                f"mean reward {statistics.fmean(r.reward for r in results):+.3f}",
                flush=True,
            )
        if after_chunk is not None:
            after_chunk()


def improvement(method: Method, reference: Method) -> tuple[float, int]:
    """``100 x (1 + mean)`` of the per-prompt improvement over the reference; prompts used."""
    values = []
    for best, ref_finals in zip(method.chosen, reference.finals):
        best_ref, worst_ref = max(ref_finals), min(ref_finals)
        if best_ref - worst_ref > 1e-9 and math.isfinite(best):
            values.append((best - best_ref) / (best_ref - worst_ref))
    return (100.0 * (1.0 + statistics.fmean(values)) if values else float("nan")), len(values)


def interpolate_bon(score: float, curve: list[tuple[int, float, float, float]]):
    """Best-of-N (N, compute, tokens) needed for ``score``, log-linear between bracketing N.

    ``curve`` holds (N, score, compute, tokens) by increasing N. Scores are made non-decreasing
    (a noisy dip does not count twice). Returns (N, compute, tokens, note) where note is
    "beyond curve" (score above the largest N's: the values are the largest N's, a lower bound)
    or "below curve" (score under the smallest N's: the smallest N's values, an upper bound).
    """
    best = -math.inf
    points = []
    for n, s, compute, tokens in curve:
        best = max(best, s)
        points.append((n, best, compute, tokens))
    if score > points[-1][1]:
        n, _, compute, tokens = points[-1]
        return n, compute, tokens, "beyond curve"
    if score <= points[0][1]:
        n, _, compute, tokens = points[0]
        return n, compute, tokens, "below curve" if score < points[0][1] else ""
    for (n0, s0, c0, t0), (n1, s1, c1, t1) in zip(points, points[1:]):
        if s0 < score <= s1:
            f = (score - s0) / (s1 - s0)
            lerp = lambda a, b: math.exp(math.log(a) + f * (math.log(b) - math.log(a)))  # noqa: E731
            return lerp(n0, n1), lerp(c0, c1), lerp(t0, t1), ""
    raise AssertionError("unreachable: the score is bracketed")


def summarize(methods: list[Method]) -> list[dict]:
    bons = [m for m in methods if m.is_bon]
    reference = bons[0]
    scores = {m.name: improvement(m, reference) for m in methods}
    curve = [(m.n, scores[m.name][0], m.compute_s, m.tokens) for m in bons]
    rows = []
    for m in methods:
        score, used = scores[m.name]
        row = {
            "method": "BoN" if m.is_bon else "SR",
            "schedule": m.schedule_name,
            "n": m.n,
            "alpha": m.alpha,
            "prompts": len(m.chosen),
            "mean_reward": statistics.fmean(m.chosen),
            "improvement_score": score,
            "scored_prompts": used,
            "generation_s": m.generation_s,
            "reward_s": m.reward_s,
            "compute_s": m.compute_s,
            "relative_compute": m.compute_s / reference.compute_s,
            "tokens_generated": m.tokens,
            "relative_tokens": m.tokens / reference.tokens,
            "reward_tokens": m.reward_tokens,
            "reward_calls": m.reward_calls,
            "mean_rounds": statistics.fmean(m.rounds),
            "peak_kv_bytes": m.peak_kv,
            "peak_cuda_bytes": m.peak_cuda,
            "peak_rss_bytes": m.peak_rss,
            "bon_equivalent_n": None,
            "speedup": None,
            "speedup_tokens": None,
            "speedup_note": "",
        }
        if math.isfinite(score):
            n_eq, compute, tokens, note = interpolate_bon(score, curve)
            row.update(
                bon_equivalent_n=n_eq,
                speedup=compute / m.compute_s,
                speedup_tokens=tokens / m.tokens,
                speedup_note=note,
            )
        rows.append(row)
    return add_reward_speedups(rows)


def add_reward_speedups(rows: list[dict]) -> list[dict]:
    """The speedup columns again, at equal *mean reward* instead of improvement score.

    The improvement score divides by each prompt's reference spread, which for a 2-sample
    reference can be tiny and dominates the mean; the mean reward has no such denominator.
    Needs only the aggregated columns, so it can be recomputed from a saved run (``--rederive``).
    """
    curve = [(r["n"], r["mean_reward"], r["compute_s"], r["tokens_generated"]) for r in rows if r["method"] == "BoN"]
    for row in rows:
        n_eq, compute, tokens, note = interpolate_bon(row["mean_reward"], curve)
        row.update(
            bon_equivalent_n_reward=n_eq,
            speedup_reward=compute / row["compute_s"],
            speedup_reward_tokens=tokens / row["tokens_generated"],
            speedup_reward_note=note,
        )
    return rows


def speedup_target(rows: list[dict]) -> dict:
    """Target: some SR configuration matches a larger Best-of-N with >= 2x less compute."""
    target = {"description": "speculative rejection reaches the score of a larger Best-of-N with >= 2x less compute"}
    for metric, key in (("improvement_score", "speedup"), ("mean_reward", "speedup_reward")):
        sr = [r for r in rows if r["method"] == "SR" and r.get(key) is not None]
        best = max(sr, key=lambda r: r[key], default=None)
        target[metric] = None if best is None else {
            "best_method": f"SR {best['schedule']} alpha={best['alpha']:g}",
            "speedup": best[key],
            "speedup_tokens": best[key + "_tokens"],
            "bon_equivalent_n": best["bon_equivalent_n" + key[len("speedup"):]],
            "note": best[key + "_note"],
            "met": best[key] >= 2.0,
        }  # fmt: skip
    target["met"] = any(isinstance(v, dict) and v["met"] for v in target.values())
    return target


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in (
        (axes[0], "mean_reward", "mean reward of the chosen response"),
        (axes[1], "improvement_score", "improvement score (smallest BoN = 100)"),
    ):
        bon = [r for r in rows if r["method"] == "BoN"]
        ax.plot([r["relative_compute"] for r in bon], [r[key] for r in bon], "-o", color="black", label="Best-of-N")
        for r in bon:
            ax.annotate(f"N={r['n']}", (r["relative_compute"], r[key]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for schedule, marker, color in (("memory", "o", "tab:red"), ("fixed", "s", "tab:blue")):
            sr = [r for r in rows if r["method"] == "SR" and r["schedule"].startswith(schedule)]
            if not sr:
                continue
            ax.scatter([r["relative_compute"] for r in sr], [r[key] for r in sr], marker=marker, color=color,
                       label=f"Speculative Rejection ({sr[0]['schedule']}, n={sr[0]['n']})", zorder=3)  # fmt: skip
            for r in sr:
                ax.annotate(f"α={r['alpha']:g}", (r["relative_compute"], r[key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=color)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("relative compute (generation + reward seconds, smallest BoN = 1)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    # One legend for both panels, below them: inside an axes it would cover data points.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the bottom strip is the legend's
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reset_peak_rss() -> None:
    """Reset the process's peak resident memory (Linux ``VmHWM``); a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rederive(path: Path) -> list[dict]:
    """Recompute the derived columns, target and plot of a saved run (its JSON) without rerunning."""
    payload = json.loads(path.read_text())
    rows = add_reward_speedups(payload["rows"])
    rows = [{column: row.get(column) for column in COLUMNS} for row in rows]
    payload["rows"], payload["target"] = rows, speedup_target(rows)
    write_csv(path.with_suffix(".csv"), rows)
    write_json(path, payload)
    args = payload["args"]
    plot(rows, path.with_suffix(".png"),
         f"{args['preset']}: {rows[0]['prompts']} prompts, {args['max_new_tokens']} new tokens, SR starts at "
         f"n={max(args['ns'])}, KV budget {payload['kv_budget_bytes'] / 2**20:.0f} MiB / "
         f"{payload['sr_prompts_per_batch']} prompts")  # fmt: skip
    print_table(rows, ["method", "schedule", "alpha", "mean_reward", "compute_s", "speedup_reward", "speedup_reward_note"])
    print(f"target: {payload['target']}")
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.rederive:
        return rederive(args.rederive)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = time.perf_counter()
    model, tokenizer, reward = load_models(args.preset, args.device, getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - load_start
    prompts = load_prompts(args.preset, args.prompts)
    n_sr = max(args.ns)
    sr_per_batch = min(args.chunk, max(1, args.rows // n_sr))
    budget = memory_budget(model, tokenizer, prompts, n_sr, sr_per_batch, args.min_tokens)
    methods = build_methods(args, budget)
    print(
        f"{args.preset}: {len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, BoN N={args.ns}, "
        f"SR n={n_sr} alpha={args.alphas}, KV budget {budget / 2**20:.1f} MiB per batch of {sr_per_batch} "
        f"prompts (first decision after >= {args.min_tokens} tokens), fixed schedule {args.fixed_lengths}",
        flush=True,
    )
    stem = args.out / f"sr_vs_bon_{args.preset}"
    title = (f"{args.preset}: {{prompts}} prompts, {args.max_new_tokens} new tokens, SR starts at n={n_sr}, "
             f"KV budget {budget / 2**20:.0f} MiB / {sr_per_batch} prompts")  # fmt: skip
    run_start = time.perf_counter()

    def write_outputs() -> list[dict]:
        """The CSV, JSON and plot of the prompts done so far (after every chunk: a run that is
        stopped keeps its finished chunks, and ``--rederive`` redraws them)."""
        rows = summarize(methods)
        done = len(methods[0].chosen)
        write_csv(stem.with_suffix(".csv"), rows)
        plot(rows, stem.with_suffix(".png"), title.format(prompts=done))
        write_json(
            stem.with_suffix(".json"),
            {
                "command": command_line(),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": machine_info(),
                "kv_budget_bytes": budget,
                "sr_prompts_per_batch": sr_per_batch,
                "load_seconds": load_seconds,
                "run_seconds": time.perf_counter() - run_start,
                "target": speedup_target(rows),
                "rows": rows,
                "per_prompt_chosen_reward": {m.name: m.chosen for m in methods},
                "per_prompt_final_rewards": {m.name: m.finals for m in methods},
                "prompts": prompts[:done],
            },
        )
        return rows

    run_all(args, model, tokenizer, reward, prompts, methods, after_chunk=write_outputs)
    run_seconds = time.perf_counter() - run_start
    rows = summarize(methods)
    print_table(rows, [c for c in COLUMNS if c not in ("reward_calls", "peak_cuda_bytes", "generation_s", "reward_s")])
    print(f"target (SR >= 2x less compute at equal score): {speedup_target(rows)}")
    print(f"wrote {stem}.csv, .json, .png (run {run_seconds:.0f}s, load {load_seconds:.0f}s)")
    return rows


if __name__ == "__main__":
    main()
