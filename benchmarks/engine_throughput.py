"""Decoding throughput of the engine against the engine of a git ref and ``model.generate``.

Three implementations decode the same prompt sampled ``rows`` times for ``--new-tokens`` tokens
(temperature 1, top-k 50; EOS disabled, so every run generates exactly ``rows x new tokens``):

- ``engine``: :func:`lightning_sr.generation.best_of_n` of this checkout, constant reward (the
  whole engine: prefill once, decode, bookkeeping, final scoring and decoding to text);
- ``baseline``: the same call on the engine of ``--baseline-ref`` (default ``8d68c29``, the engine
  before the static KV cache). Its ``lightning_sr/`` is extracted with ``git archive`` into a
  temporary folder and run in a subprocess with that ``PYTHONPATH``: no copy of it in the repo;
- ``generate``: ``model.generate`` on the prompt repeated ``rows`` times, ``min_new_tokens =
  max_new_tokens``.

The engine and ``generate`` run in one worker process, the baseline in another, both with the
model loaded once; the driver alternates them (the order rotates every repeat) so the ratios come
from one run under the same machine load. Each figure is the median of ``--repeats`` timed runs
after a short warm-up; on CUDA a run is timed with CUDA events. Every run also records the time
of each decoding step (from the engine's step events, and a logits processor in ``generate``) to
show the step time against the generated length: with a cache copied at every step (today's
``DynamicCache``) it grows with the cache, with a static cache only with the attention's reads.

A table times one decision point of the engine: ``Rollout.resize`` (survivors moved within the
KV arena) against re-prefilling the survivors from their ids, and compares their logits. A last
one times one sampling call of each engine (``sample_next_token`` of ``rows`` logits over the
model's vocabulary, temperature 0.7, top-k 50, median of 30), which the full runs cannot resolve:
the baseline scales the whole vocabulary by the temperature, this engine the top-k survivors only.

With ``--bandwidth GB/s`` (the device's memory bandwidth, e.g. 3350 for an H100 SXM) each row gets
an HBM roofline: ``rows / ((weight bytes + KV bytes read per step) / bandwidth)`` tokens/s, the
KV read averaged over the generated length.

Usage::

    .venv/bin/python benchmarks/engine_throughput.py --preset embedded --threads 1   # CPU, ~1 h
    .venv/bin/python benchmarks/engine_throughput.py --preset gpu --bandwidth 3350   # CUDA, bf16
    .venv/bin/python benchmarks/engine_throughput.py --preset tiny                   # seconds

Writes ``benchmarks/results/engine_throughput_<preset>.{csv,json,png}``,
``engine_step_times_<preset>.csv``, ``engine_decision_<preset>.csv``,
``engine_sampler_<preset>.csv`` and, as the runs end,
``engine_runs_<preset>.jsonl`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, load_prompts, machine_info, print_table, write_csv, write_json  # noqa: E402

PRESETS = {
    "tiny": dict(models=["tiny"], rows=[1, 4], greedy_rows=[4], new_tokens=8, repeats=1, decision_rows=[8],
                 decision_length=4, dtype="float32"),
    "embedded": dict(models=["smollm2"], rows=[1, 16, 64, 256], greedy_rows=[64], new_tokens=256, repeats=2,
                     once_above=128, decision_rows=[64], decision_length=128, dtype="float32"),
    "gpu": dict(models=["smollm2", "llama-1b"], rows=[1, 16, 64, 256, 1024], greedy_rows=[64, 1024], new_tokens=256,
                repeats=3, decision_rows=[256], decision_length=128, dtype="bfloat16"),
}  # fmt: skip
IMPLS = ("engine", "baseline", "generate")
TARGET_ROWS, TARGET_RATIO = 64, 1.25
STEP_BINS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    parser.add_argument("--models", nargs="+", choices=["tiny", "smollm2", "llama-1b"])
    parser.add_argument("--rows", type=int, nargs="+", help="rows decoded together (sampled decoding)")
    parser.add_argument("--greedy-rows", type=int, nargs="*", help="rows also timed with greedy decoding")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--once-above", type=int, help="time cells of more rows than this only once")
    parser.add_argument("--decision-rows", type=int, nargs="*", help="rows before a timed decision point")
    parser.add_argument("--decision-length", type=int, help="generated tokens at the timed decision point")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--baseline-ref", default="8d68c29", help="git ref of the engine to compare with")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline engine")
    parser.add_argument("--bandwidth", type=float, help="device memory bandwidth in GB/s, for the roofline column")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------- worker
# Runs in a subprocess whose PYTHONPATH picks the lightning_sr under test; uses only the API that
# both engines share (best_of_n, SamplingParams, FunctionReward).


def load_generator(name: str, device: str, dtype: torch.dtype):
    """(model, tokenizer) for a benchmark model name; EOS is disabled (see :class:`NoEos`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        from common import tiny_models

        model, tokenizer, _ = tiny_models()
        model = model.to(dtype)
    else:
        from lightning_sr.assets import resolve_model

        path = resolve_model("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if name == "smollm2":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:  # random weights, TinyLlama-1.1B's shape with SmolLM2's vocabulary
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632,
                                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                 max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
            with torch.device(device):
                model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model, NoEos(tokenizer)


class NoEos:
    """A tokenizer without an EOS id, so that every row decodes to the last token."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self._tokenizer)


class Timer:
    """Wall time of a run: CUDA events on a GPU, ``perf_counter`` otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def run_job(job: dict, model, tokenizer, prompt: str) -> dict:
    """One timed run (``impl`` engine/baseline/generate) or one timed decision point."""
    from lightning_sr.generation import SamplingParams, best_of_n
    from lightning_sr.rewards import FunctionReward

    if job["kind"] == "decision":
        return time_decision(job, model, tokenizer, prompt)
    if job["kind"] == "sampler":
        return time_sampler(job, model)
    rows, tokens, greedy = job["rows"], job["new_tokens"], job.get("mode") == "greedy"
    never = model.config.vocab_size + 1  # a stop id no row can sample: the engines need one
    sampling = SamplingParams(temperature=0.0 if greedy else 1.0, top_k=50, max_new_tokens=tokens, stop_token_ids=(never,))
    marks: list[tuple[int, float]] = []
    with Timer(model.device) as timer:
        marks.append((0, time.perf_counter()))
        if job["kind"] == "generate":
            generated = run_generate(model, tokenizer, prompt, rows, tokens, marks, greedy)
        else:
            observer = lambda event: marks.append((event.step, time.perf_counter()))  # noqa: E731
            (result,) = best_of_n(model, tokenizer, FunctionReward(lambda p, r: 0.0), [prompt], n=rows,
                                  sampling=sampling, seed=job["repeat"], observer=observer)  # fmt: skip
            generated = result.stats.tokens_generated
    return {"seconds": timer.seconds, "tokens": generated, "marks": marks}


def run_generate(model, tokenizer, prompt: str, rows: int, tokens: int, marks: list, greedy: bool) -> int:
    from transformers import LogitsProcessor, LogitsProcessorList

    from lightning_sr.generation.prompts import encode_prompts

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            marks.append((len(marks), time.perf_counter()))
            return scores

    (prompt_ids,) = encode_prompts(tokenizer, [prompt])
    ids = torch.tensor([prompt_ids] * rows, device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
        **(dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)),
        pad_token_id=tokenizer.pad_token_id or 0,
        logits_processor=LogitsProcessorList([Clock()]),
    )  # fmt: skip
    return rows * (out.size(1) - ids.size(1))


def time_decision(job: dict, model, tokenizer, prompt: str) -> dict:
    """``rows`` rows decoded ``length`` tokens; every other row survives. Resize vs re-prefill."""
    from lightning_sr.generation import SamplingParams
    from lightning_sr.generation.rollout import prefill
    from lightning_sr.generation.sampling import sample_next_token
    from lightning_sr.generation.prompts import encode_prompts

    rows, length = job["rows"], job["length"]
    (prompt_ids,) = encode_prompts(tokenizer, [prompt])
    generator = torch.Generator(device=model.device).manual_seed(0)
    sampling = SamplingParams(temperature=1.0, top_k=50)
    with torch.inference_mode():
        rollout = prefill(model, [prompt_ids], rows, tokenizer.pad_token_id or 0, capacity=len(prompt_ids) + length)
        generated = []
        for _ in range(length):
            tokens = sample_next_token(rollout.logits, sampling, generator)
            generated.append(tokens)
            rollout.step(tokens)
        generated = torch.stack(generated, 1)
        keep = torch.arange(0, rows, 2)
        kv_before = rollout.cache.reserved_bytes
        with Timer(model.device) as resize:
            rollout.resize(keep, rollout.capacity)
        sequences = [prompt_ids + row for row in generated[keep.to(model.device)].tolist()]
        with Timer(model.device) as reprefill:
            fresh = prefill(model, sequences, 1, tokenizer.pad_token_id or 0)
        diff = (rollout.logits - fresh.logits).abs().max().item()
    return {"resize_s": resize.seconds, "reprefill_s": reprefill.seconds, "max_logit_diff": diff,
            "kv_bytes_before": kv_before, "sequence_length": rollout.sequence_length}  # fmt: skip


def time_sampler(job: dict, model) -> dict:
    """One ``sample_next_token`` call over ``rows`` logits of the model's vocabulary: median of 30."""
    from lightning_sr.generation import SamplingParams
    from lightning_sr.generation.sampling import sample_next_token

    generator = torch.Generator(device=model.device).manual_seed(0)
    logits = 4 * torch.randn(job["rows"], model.config.vocab_size, generator=generator, device=model.device)
    params, seconds = SamplingParams(temperature=0.7, top_k=50), []
    for _ in range(31):  # the first call warms up
        with Timer(model.device) as timer:
            sample_next_token(logits, params, generator)
        seconds.append(timer.seconds)
    return {"seconds": statistics.median(seconds[1:])}


def worker(args: argparse.Namespace) -> None:
    """Serve jobs: one JSON object per line on stdin, one ``RESULT {...}`` line per job on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded: dict[str, tuple] = {}
    prompt = load_prompts("tiny" if args.preset == "tiny" else "embedded", 1)[0]
    for line in sys.stdin:
        job = json.loads(line)
        if job["model"] not in loaded:
            loaded.clear()
            loaded[job["model"]] = load_generator(job["model"], args.device, getattr(torch, args.dtype))
        model, tokenizer = loaded[job["model"]]
        with torch.inference_mode():
            result = run_job(job, model, tokenizer, prompt)
        gc.collect()  # free the run's cache before the next one (256 rows of SmolLM2: 3.7 GB)
        print("RESULT " + json.dumps(result), flush=True)


class WorkerDied(RuntimeError):
    pass


class Worker:
    """A worker subprocess running this script with ``lightning_sr`` from ``pythonpath``."""

    def __init__(self, pythonpath: Path, args: argparse.Namespace):
        self.command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", args.preset,
                        "--device", args.device, "--dtype", args.dtype]  # fmt: skip
        if args.threads:
            self.command += ["--threads", str(args.threads)]
        self.env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)

    def run(self, job: dict) -> dict:
        """The job's result; a worker that died (out of memory, say) is restarted and the job fails."""
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        code = self.process.wait()
        self.start()
        raise WorkerDied(f"the benchmark worker exited with {code} during {job}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _commit() -> str | None:
    """This checkout's commit; None without git (a copy of the tree on a GPU machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def extract_baseline(ref: str, folder: Path) -> Path:
    """``lightning_sr/`` of ``ref``, extracted into ``folder`` with ``git archive``."""
    archive = subprocess.run(["git", "archive", ref, "lightning_sr"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"cannot extract lightning_sr at {ref!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# ---------------------------------------------------------------------------------------- driver


def step_bins(new_tokens: int, bins: int = STEP_BINS) -> list[tuple[int, int]]:
    """``(first, last)`` steps of each stretch: steps 2 to ``new_tokens - 1`` (the first step holds
    the prefill, and the baseline's last step has no forward pass)."""
    last = max(2, new_tokens - 1)
    width = max(1, -(-(last - 1) // bins))
    return [(start, min(last, start + width - 1)) for start in range(2, last + 1, width)]


def step_profile(marks: list, new_tokens: int, bins: int = STEP_BINS) -> list[float]:
    """Mean milliseconds per decoding step in each of :func:`step_bins`.

    ``marks`` are ``(step, time)`` pairs; where several steps share a mark (events read back in a
    burst on CUDA) their time is spread evenly over them.
    """
    per_step: list[float | None] = [None] * (new_tokens + 1)
    for (step_a, time_a), (step_b, time_b) in zip(marks, marks[1:]):
        if step_b > step_a:
            for step in range(step_a + 1, min(step_b, new_tokens) + 1):
                per_step[step] = (time_b - time_a) / (step_b - step_a)
    means = []
    for first, last in step_bins(new_tokens, bins):
        values = [v for v in per_step[first : last + 1] if v is not None]
        means.append(1000 * statistics.mean(values) if values else float("nan"))
    return means


def roofline(model_facts: dict, rows: int, new_tokens: int, bandwidth: float | None) -> float | None:
    """Tokens/s if a step only read the weights and the KV cache at the device's bandwidth."""
    if not bandwidth:
        return None
    kv_read = rows * (model_facts["prompt_tokens"] + (new_tokens + 1) / 2) * model_facts["kv_bytes_per_token"]
    return rows / ((model_facts["weight_bytes"] + kv_read) / (bandwidth * 1e9))


def model_facts(name: str, args) -> dict:
    """Weight bytes, KV bytes per token and prompt length of a benchmark model (built on meta)."""
    from transformers import AutoConfig, LlamaConfig

    from lightning_sr.generation import kv_bytes_per_token

    dtype = getattr(torch, args.dtype)
    if name == "tiny":
        from common import tiny_models

        model, tokenizer, _ = tiny_models()
        config, weights = model.config, sum(p.numel() for p in model.parameters())
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lightning_sr.assets import resolve_model

        path = resolve_model("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path) if name == "smollm2" else LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
        with torch.device("meta"):
            weights = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    from lightning_sr.generation.prompts import encode_prompts

    prompt = load_prompts("tiny" if name == "tiny" else "embedded", 1)[0]
    return {
        "parameters": weights,
        "weight_bytes": weights * torch.empty((), dtype=dtype).element_size(),
        "kv_bytes_per_token": kv_bytes_per_token(config, dtype),
        "prompt_tokens": len(encode_prompts(tokenizer, [prompt])[0]),
    }


def measure(args, workers: dict) -> tuple[list[dict], list[dict], list[dict], list[dict], list[str]]:
    impls = [impl for impl in IMPLS if impl in workers or impl == "generate"]
    rows_out, steps_out, decisions, samplers, failed = [], [], [], [], []
    log = args.out / f"engine_runs_{args.preset}.jsonl"  # every run as it ends, in case a later one fails
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    turn = 0
    for model in args.models:
        facts = model_facts(model, args)
        for impl in impls:  # warm-up: load the model, first kernels
            owner = workers["baseline" if impl == "baseline" else "engine"]
            owner.run({"model": model, "kind": impl, "rows": 2, "new_tokens": 4, "repeat": 0})
        for rows in args.decision_rows:
            job = {"model": model, "kind": "decision", "rows": rows, "length": args.decision_length, "new_tokens": 0}
            decision = workers["engine"].run(job)
            decisions.append({"model": model, "rows": rows, "survivors": rows // 2 + rows % 2,
                              "generated": args.decision_length, **decision,
                              "reprefill_over_resize": decision["reprefill_s"] / decision["resize_s"]})  # fmt: skip
        for rows in sorted(set(args.rows) | set(args.greedy_rows)):
            job = {"model": model, "kind": "sampler", "rows": rows}
            ms = {impl: 1000 * owner.run(job)["seconds"] for impl, owner in workers.items()}
            samplers.append({"model": model, "rows": rows, **{f"{impl}_ms": value for impl, value in ms.items()},
                             "baseline_over_engine": ms["baseline"] / ms["engine"] if "baseline" in ms else None})  # fmt: skip
        cells = [(rows, "sampled") for rows in args.rows] + [(rows, "greedy") for rows in args.greedy_rows]
        for rows, mode in sorted(cells, key=lambda cell: (cell[0], cell[1] == "greedy")):  # the largest last
            results: dict[str, list[dict]] = {impl: [] for impl in impls}
            try:
                for repeat in range(args.repeats if args.once_above is None or rows <= args.once_above else 1):
                    order = impls[turn % len(impls) :] + impls[: turn % len(impls)]
                    turn += 1
                    for impl in order:
                        owner = workers["baseline" if impl == "baseline" else "engine"]
                        job = {"model": model, "kind": impl, "rows": rows, "mode": mode,
                               "new_tokens": args.new_tokens, "repeat": repeat}  # fmt: skip
                        results[impl].append(owner.run(job))
                        done = results[impl][-1]
                        with open(log, "a") as handle:
                            handle.write(json.dumps({**job, "seconds": done["seconds"], "tokens": done["tokens"]}) + "\n")
                        print(f"{model} {mode} rows={rows} {impl}: {done['tokens'] / done['seconds']:.1f} tok/s", flush=True)
            except WorkerDied as error:
                print(f"cell {model} {mode} rows={rows} failed: {error}", flush=True)
                failed.append(f"{model} {mode} rows={rows}: {error}")
                continue
            rates = {}
            for impl, runs in results.items():
                seconds = statistics.median(run["seconds"] for run in runs)
                tokens = statistics.median(run["tokens"] for run in runs)
                rates[impl] = tokens / seconds
                profile = [statistics.mean(ms) for ms in zip(*(step_profile(r["marks"], args.new_tokens) for r in runs))]
                for (first, last), ms in zip(step_bins(args.new_tokens), profile):
                    steps_out.append({"model": model, "mode": mode, "rows": rows, "impl": impl, "from_step": first,
                                      "to_step": last, "ms_per_step": ms})  # fmt: skip
                rows_out.append({"model": model, "mode": mode, "rows": rows, "new_tokens": args.new_tokens, "impl": impl,
                                 "tokens": tokens, "median_s": seconds, "min_s": min(r["seconds"] for r in runs),
                                 "tokens_per_s": rates[impl]})  # fmt: skip
            bound = roofline(facts, rows, args.new_tokens, args.bandwidth)
            for row in rows_out[-len(impls) :]:
                row["vs_generate"] = row["tokens_per_s"] / rates["generate"]
                row["vs_baseline"] = row["tokens_per_s"] / rates["baseline"] if "baseline" in rates else None
                row["roofline_tok_s"] = bound
                row["of_roofline"] = row["tokens_per_s"] / bound if bound else None
    return rows_out, steps_out, decisions, samplers, failed


def plot(tput: list[dict], steps: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"engine": "tab:blue", "baseline": "tab:red", "generate": "black"}
    lines = {"sampled": ("-", "o"), "greedy": ("--", "x")}
    models = sorted({r["model"] for r in tput})
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for (left, right), model in zip(axes, models):
        ours = [r for r in tput if r["model"] == model]
        target = TARGET_ROWS if any(r["rows"] == TARGET_ROWS for r in ours) else max(r["rows"] for r in ours)
        for (impl, color), (mode, (line, marker)) in ((c, m) for c in colors.items() for m in lines.items()):
            pts = [r for r in ours if r["impl"] == impl and r["mode"] == mode]
            if pts:
                left.plot([r["rows"] for r in pts], [r["tokens_per_s"] for r in pts], line, marker=marker, color=color,
                          label=f"{impl} ({mode})")  # fmt: skip
            pts = [r for r in steps if r["model"] == model and r["impl"] == impl and r["mode"] == mode
                   and r["rows"] == target]  # fmt: skip
            if pts:
                right.plot([(r["from_step"] + r["to_step"]) / 2 for r in pts], [r["ms_per_step"] for r in pts], line,
                           marker=marker, color=color, label=f"{impl} ({mode})")  # fmt: skip
        bounds = [r for r in ours if r["impl"] == "engine" and r["mode"] == "sampled" and r["roofline_tok_s"]]
        if bounds:
            left.plot([r["rows"] for r in bounds], [r["roofline_tok_s"] for r in bounds], color="gray", label="HBM roofline")
        left.set(xscale="log", yscale="log", xlabel="rows decoded together", ylabel="generated tokens / s", title=model)
        right.set(xlabel="generated length (tokens)", ylabel="ms per decoding step", title=f"{model}, {target} rows")
        for ax in (left, right):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> tuple[list[dict], list[dict], list[dict]]:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))  # the driver reads model facts with this checkout's lightning_sr
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="engine_baseline_") as folder:
        workers = {"engine": Worker(ROOT, args)}
        if not args.no_baseline:
            workers["baseline"] = Worker(extract_baseline(args.baseline_ref, Path(folder)), args)
        try:
            tput, steps, decisions, samplers, failed = measure(args, workers)
        finally:
            for worker_process in workers.values():
                worker_process.close()
    print_table(tput, ["model", "mode", "rows", "impl", "tokens", "median_s", "tokens_per_s", "vs_generate", "vs_baseline",
                       "roofline_tok_s", "of_roofline"])  # fmt: skip
    print_table(steps, list(steps[0]) if steps else [])
    print_table(decisions, list(decisions[0]) if decisions else [])
    print_table(samplers, list(samplers[0]) if samplers else [])
    engine = [r for r in tput if r["impl"] == "engine"]
    target = [r for r in engine if r["rows"] == TARGET_ROWS and r["vs_baseline"] is not None]
    targets = {
        "engine_vs_baseline": {
            "description": f"engine >= {TARGET_RATIO}x the tokens/s of {args.baseline_ref} at {TARGET_ROWS} rows x "
                           f"{args.new_tokens} tokens",
            "ratio": {r["mode"]: r["vs_baseline"] for r in target},
            "met": bool(target) and all(r["vs_baseline"] >= TARGET_RATIO for r in target),
        },
        "engine_vs_generate": {
            "description": "engine >= 1.0x the tokens/s of model.generate",
            "min_ratio": min(r["vs_generate"] for r in engine),
            "met": all(r["vs_generate"] >= 1.0 for r in engine),
        },
    }  # fmt: skip
    print(f"targets: {json.dumps(targets)}")
    for cell in failed:
        print(f"FAILED: {cell}")
    stem = args.out / f"engine_throughput_{args.preset}"
    write_csv(stem.with_suffix(".csv"), tput)
    write_csv(args.out / f"engine_step_times_{args.preset}.csv", steps)
    write_csv(args.out / f"engine_decision_{args.preset}.csv", decisions)
    write_csv(args.out / f"engine_sampler_{args.preset}.csv", samplers)
    title = (f"{args.preset}: {args.new_tokens} new tokens, {args.dtype}, {args.device}, "
             f"{args.threads or torch.get_num_threads()} torch thread(s), baseline {args.baseline_ref}")  # fmt: skip
    plot(tput, steps, stem.with_suffix(".png"), title)
    write_json(
        stem.with_suffix(".json"),
        {
            "command": command_line(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {**machine_info(), "load_average_at_start": load},
            "commit": _commit(),
            "models": {model: model_facts(model, args) for model in args.models},
            "targets": targets,
            "failed_cells": failed,
            "throughput": tput,
            "step_times": steps,
            "decision": decisions,
            "sampler": samplers,
        },
    )
    print(f"wrote {stem}.csv, .json, .png, engine_step_times_{args.preset}.csv, engine_decision_{args.preset}.csv, "
          f"engine_sampler_{args.preset}.csv")
    return tput, steps, decisions


if __name__ == "__main__":
    main()
