"""Tokens per second of the engine's decoding loop against ``model.generate``, and the cost of
dropping rows from the KV cache against re-prefilling the survivors.

1. Decoding throughput, one prompt sampled ``B`` times, ``T`` new tokens, greedy and sampled
   (temperature 1, top-k 50), prefill included:

   - ``generate``: ``model.generate`` on the prompt repeated ``B`` times with
     ``min_new_tokens = max_new_tokens = T`` (no early EOS: exactly ``B x T`` tokens);
   - ``rollout``: the engine's loop, :func:`lightning_sr.generation.prefill` then ``T - 1``
     ``Rollout.step`` calls with ``sample_next_token`` (no EOS check: exactly ``B x T`` tokens);
   - ``best_of_n``: the whole engine (``best_of_n`` with a constant reward): EOS checks,
     bookkeeping, final scoring and decoding to text included; rows stop at EOS, so its tokens are
     the real ones it generated (``stats.tokens_generated``).

   Each figure is the median of ``--repeats`` timed runs after one warm-up run.
2. Pruning at a decision point: ``B`` rows decoded ``t`` tokens past the prompt, half of them
   (every other row) survive. Timed: ``Rollout.keep`` (``DynamicCache.batch_select_indices`` and
   the masks; what the engine does) against rebuilding the survivors' cache from scratch, the
   authors' approach, from token ids (a prefill of ``B/2`` rows of ``prompt + t`` tokens) and from
   text (decode, re-tokenize, prefill). The next-token logits of pruning and of re-prefilling from
   ids are compared (``max_logit_diff``).

Usage::

    .venv/bin/python benchmarks/engine_throughput.py --preset embedded --threads 1  # ~8 min, 2 busy cores
    .venv/bin/python benchmarks/engine_throughput.py --preset tiny

Writes ``benchmarks/results/engine_throughput_<preset>.{csv,json,png}`` and
``engine_pruning_<preset>.csv`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
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

from lightning_sr.generation import Rollout, SamplingParams, best_of_n, prefill, sample_next_token  # noqa: E402
from lightning_sr.generation.prompts import encode_prompts  # noqa: E402
from lightning_sr.rewards import FunctionReward  # noqa: E402

PRESETS = {
    "tiny": dict(batch_sizes=[1, 8], new_tokens=8, prune_batches=[8], prune_lengths=[4], repeats=2),
    "embedded": dict(batch_sizes=[1, 8, 32], new_tokens=24, prune_batches=[16, 64], prune_lengths=[16], repeats=2),
}
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_k=50, top_p=1.0)}
CONSTANT = FunctionReward(lambda prompt, response: 0.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prune-batches", type=int, nargs="+", help="rows before a pruning decision")
    parser.add_argument("--prune-lengths", type=int, nargs="+", help="generated tokens at the decision")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def run_generate(model, tokenizer, prompt_ids, batch, tokens, sampling):
    ids = torch.tensor([prompt_ids] * batch, device=model.device)
    kwargs = dict(do_sample=False) if sampling.temperature == 0 else dict(
        do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
    )  # fmt: skip
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        **kwargs,
    )
    return batch * (out.size(1) - ids.size(1))


def run_rollout(model, tokenizer, prompt_ids, batch, tokens, sampling):
    generator = torch.Generator(device=model.device).manual_seed(0)
    with torch.inference_mode():
        rollout = prefill(model, [prompt_ids], batch, tokenizer.pad_token_id or 0)
        for step in range(tokens):
            next_tokens = sample_next_token(rollout.logits, sampling, generator)
            if step < tokens - 1:
                rollout.step(next_tokens)
    return batch * tokens


def run_best_of_n(model, tokenizer, prompt, batch, tokens, sampling):
    params = SamplingParams(**{**vars(sampling), "max_new_tokens": tokens})
    (result,) = best_of_n(model, tokenizer, CONSTANT, [prompt], n=batch, sampling=params, seed=0)
    return result.stats.tokens_generated


def throughput(args, model, tokenizer, prompt) -> list[dict]:
    (prompt_ids,) = encode_prompts(tokenizer, [prompt])
    rows = []
    for mode, params in MODES.items():
        sampling = SamplingParams(max_new_tokens=args.new_tokens, **params)
        for batch in args.batch_sizes:
            runners = {
                "generate": lambda: run_generate(model, tokenizer, prompt_ids, batch, args.new_tokens, sampling),
                "rollout": lambda: run_rollout(model, tokenizer, prompt_ids, batch, args.new_tokens, sampling),
                "best_of_n": lambda: run_best_of_n(model, tokenizer, prompt, batch, args.new_tokens, sampling),
            }
            for fn in runners.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in runners}
            counts: dict[str, list[int]] = {name: [] for name in runners}
            for _ in range(args.repeats):  # interleaved, so load changes hit every implementation
                for name, fn in runners.items():
                    seconds, count = timed(fn, model.device)
                    times[name].append(seconds)
                    counts[name].append(count)
            base = None
            for name in runners:
                seconds = statistics.median(times[name])
                tokens = statistics.median(counts[name])
                rate = tokens / seconds
                base = rate if name == "generate" else base
                rows.append(
                    {
                        "mode": mode,
                        "batch": batch,
                        "new_tokens": args.new_tokens,
                        "impl": name,
                        "tokens": tokens,
                        "median_s": seconds,
                        "min_s": min(times[name]),
                        "tokens_per_s": rate,
                        "vs_generate": rate / base,
                    }
                )
            print(f"{mode} B={batch}: " + ", ".join(f"{r['impl']} {r['tokens_per_s']:.0f} tok/s" for r in rows[-3:]), flush=True)
    return rows


def decision_state(model, tokenizer, prompt_ids, batch, length) -> tuple[Rollout, torch.Tensor]:
    """``batch`` rows of one prompt decoded ``length`` sampled tokens (the state at a decision),
    and the generated ids ``[batch, length]``."""
    generator = torch.Generator(device=model.device).manual_seed(0)
    sampling = SamplingParams(temperature=1.0, top_k=50)
    rollout = prefill(model, [prompt_ids], batch, tokenizer.pad_token_id or 0)
    generated = []
    for _ in range(length):
        next_tokens = sample_next_token(rollout.logits, sampling, generator)
        generated.append(next_tokens)
        rollout.step(next_tokens)
    return rollout, torch.stack(generated, dim=1)


def pruning(args, model, tokenizer, prompt) -> list[dict]:
    (prompt_ids,) = encode_prompts(tokenizer, [prompt])
    pad_id = tokenizer.pad_token_id or 0
    rows = []
    with torch.inference_mode():
        for batch in args.prune_batches:
            for length in args.prune_lengths:
                state, generated = decision_state(model, tokenizer, prompt_ids, batch, length)
                survivors = torch.arange(0, batch, 2, device=model.device)

                def prune():
                    clone = Rollout(model, copy.deepcopy(state.cache), state.logits, state.attention_mask,
                                    state.positions, state.row_ids)  # fmt: skip
                    seconds, _ = timed(lambda: clone.keep(survivors), model.device)
                    return seconds, clone.logits

                def reprefill_ids():
                    sequences = [prompt_ids + row for row in generated[survivors].tolist()]
                    return timed(lambda: prefill(model, sequences, 1, pad_id).logits, model.device)

                def reprefill_text():
                    def run():
                        texts = tokenizer.batch_decode(
                            [prompt_ids + row for row in generated[survivors].tolist()]
                        )
                        sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
                        return prefill(model, sequences, 1, pad_id).logits

                    return timed(run, model.device)

                results = {"prune": [], "reprefill_ids": [], "reprefill_text": []}
                logits = {}
                for _ in range(args.repeats):
                    for name, fn in (("prune", prune), ("reprefill_ids", reprefill_ids), ("reprefill_text", reprefill_text)):
                        seconds, out = fn()
                        results[name].append(seconds)
                        logits[name] = out
                diff = (logits["prune"] - logits["reprefill_ids"]).abs().max().item()
                prune_s = statistics.median(results["prune"])
                row = {
                    "batch": batch,
                    "survivors": int(survivors.numel()),
                    "generated": length,
                    "sequence_length": state.sequence_length,
                    "kv_bytes_before": state.kv_bytes,
                    "prune_s": prune_s,
                    "reprefill_ids_s": statistics.median(results["reprefill_ids"]),
                    "reprefill_text_s": statistics.median(results["reprefill_text"]),
                }
                row["reprefill_over_prune"] = row["reprefill_ids_s"] / prune_s
                row["max_logit_diff"] = diff
                rows.append(row)
                print(f"prune B={batch} t={length}: keep {prune_s * 1e3:.2f} ms, re-prefill "
                      f"{row['reprefill_ids_s'] * 1e3:.1f} ms (ids) / {row['reprefill_text_s'] * 1e3:.1f} ms (text)",
                      flush=True)  # fmt: skip
    return rows


def plot(tput: list[dict], prune: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"generate": ("black", "-"), "rollout": ("tab:red", "--"), "best_of_n": ("tab:blue", ":")}
    for (mode, marker) in (("greedy", "o"), ("sampled", "s")):
        for impl, (color, line) in styles.items():
            pts = [r for r in tput if r["mode"] == mode and r["impl"] == impl]
            axes[0].plot([r["batch"] for r in pts], [r["tokens_per_s"] for r in pts], line, marker=marker,
                         color=color, label=f"{impl} ({mode})")  # fmt: skip
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("rows decoded together (batch)")
    axes[0].set_ylabel("generated tokens / second")
    axes[0].legend(fontsize=8)
    axes[0].grid(True, which="both", alpha=0.3)
    labels = [f"B={r['batch']}→{r['survivors']}\nt={r['generated']}" for r in prune]
    xs = range(len(prune))
    width = 0.27
    for offset, key, color, name in ((-width, "prune_s", "tab:red", "keep rows (batch_select_indices)"),
                                     (0, "reprefill_ids_s", "tab:gray", "re-prefill from ids"),
                                     (width, "reprefill_text_s", "black", "re-prefill from text")):  # fmt: skip
        axes[1].bar([x + offset for x in xs], [r[key] * 1e3 for r in prune], width, color=color, label=name)
    axes[1].set_xticks(list(xs), labels)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("milliseconds at one decision point")
    axes[1].legend(fontsize=8)
    axes[1].grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_models(args.preset, args.device)
    prompt = load_prompts(args.preset, 1)[0]
    tput = throughput(args, model, tokenizer, prompt)
    print_table(tput, ["mode", "batch", "new_tokens", "impl", "tokens", "median_s", "tokens_per_s", "vs_generate"])
    prune = pruning(args, model, tokenizer, prompt)
    print_table(prune, list(prune[0]))

    ours = [r for r in tput if r["impl"] == "rollout"]
    targets = {
        "loop_vs_generate": {
            "description": "engine decoding loop (rollout) >= 1.0x the tokens/s of model.generate",
            "min_ratio": min(r["vs_generate"] for r in ours),
            "met": all(r["vs_generate"] >= 1.0 for r in ours),
            "best_of_n_min_ratio": min(r["vs_generate"] for r in tput if r["impl"] == "best_of_n"),
        },
        "prune_vs_reprefill": {
            "description": "dropping rows from the cache is cheaper than re-prefilling the survivors",
            "min_reprefill_over_prune": min(r["reprefill_over_prune"] for r in prune),
            "met": all(r["prune_s"] < r["reprefill_ids_s"] for r in prune),
        },
    }
    print(f"targets: {targets}")
    stem = args.out / f"engine_throughput_{args.preset}"
    write_csv(stem.with_suffix(".csv"), tput)
    write_csv(args.out / f"engine_pruning_{args.preset}.csv", prune)
    plot(tput, prune, stem.with_suffix(".png"),
         f"{args.preset} generator, {args.new_tokens} new tokens, {torch.get_num_threads()} torch thread(s), "
         f"{args.device}")  # fmt: skip
    write_json(
        stem.with_suffix(".json"),
        {
            "command": command_line(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine_info(),
            "prompt_tokens": len(encode_prompts(tokenizer, [prompt])[0]),
            "targets": targets,
            "throughput": tput,
            "pruning": prune,
        },
    )
    print(f"wrote {stem}.csv, .json, .png and engine_pruning_{args.preset}.csv")
    return tput, prune


if __name__ == "__main__":
    main()
