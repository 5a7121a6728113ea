"""Base → SFT → DPO with AdamW / OnDARE / OnTIES / step-K → offline merges → evaluation → table.

The online merging paper's experiment (Lu et al., arXiv 2405.17931, Table 4) in miniature, on the
embedded SmolLM2-135M-Instruct, offline, on CPU:

1. ``sft``: the embedded model is the *base*; :class:`~lightning_sr.SFTModule` fine-tunes it on the
   unit-conversion skill (``configs/fit_sft.yaml``, data from ``scripts/make_sft_data.py``) into
   the *SFT* model, so ``tau = SFT - base != 0``.
2. ``dpo/<run>``: DPO from the SFT model on the tone preference pairs
   (``configs/data/preferences.jsonl``, 30% held out), 40 steps at lr 1e-4, where AdamW pays a
   tax (:data:`RUNS`, ``configs/online_merging/dpo_*.yaml``): AdamW, OnDARE and OnTIES at three
   merge weights, three seeds of AdamW and of the middle weight, step-K OnDARE, AdamW with a
   stronger KL (beta), OnTIES at AdamW's lr. The online merging runs get ``base_model`` = the
   base, so they merge toward tau.
3. ``merges/<method>-w<w>``: the offline baselines: the AdamW policy (seed 0) and the SFT model
   merged onto the base with linear / DARE / TIES at three weights
   (:func:`lightning_sr.merging.merge_state_dicts`).
4. ``eval/<model>``: reward side and tax side of every model (``scripts/online_merging_eval.py``).
5. ``report``: ``benchmarks/results/online_merging.{csv,json,png}`` and ``online_merging_table.md``
   (``scripts/online_merging_report.py``): seeds grouped, each method's frontier, the tax at
   AdamW's reward.

About 3.3 CPU-hours: 17 DPO runs of about 8 minutes and 30 evaluations of 1 to 3 minutes, on one
core each; two copies side by side on 2 cores take about 1.7 hours (benchmarks/RESULTS.md).

    python scripts/online_merging_pipeline.py            # everything not built yet
    python scripts/online_merging_pipeline.py --list     # the stages and whether each is done
    python scripts/online_merging_pipeline.py --only sft dpo/adamw   # some stages (and what they need)

Resumable: every stage writes into ``outputs/online_merging/<stage>/`` and marks itself done last
(``done.json``, with its wall time); a finished stage is skipped, a killed one is wiped and rerun.
Several copies of the command may run side by side (more CPU share on a busy machine, or several
GPUs): a stage being built is locked (``<stage>.lock`` holds the builder's process id), and each
copy takes the next stage whose inputs are ready.
Delete a stage's folder to rebuild it (its dependents are not rebuilt by themselves: delete them
too). The training stages run in this process through ``lightning_sr.cli.main``, exactly as
``lightning-sr fit --config ...`` with the overrides listed in :data:`RUNS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from lightning_sr.cli import drop_tips

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "online_merging"
CONFIGS = ROOT / "configs" / "online_merging"
BASE = "smollm2-135m-instruct"
SFT_MODEL = OUT / "sft" / "model"
log = logging.getLogger("online_merging")


class Run(NamedTuple):
    """One DPO run: its config, the CLI overrides, and where it sits in the report."""

    config: str
    overrides: list[str]
    family: str  # the line it belongs to in the reward-vs-tax plot
    setting: float | None = None  # the family's swept value (α, β); None: one point (seeds averaged)


SEEDS = (0, 1, 2)
LR, STEPS = 1e-4, 40  # the regime with a tax (benchmarks/RESULTS.md); also set in the configs
SEARCH = {
    # The search for a regime where AdamW-DPO pays a skill tax (one seed each).
    f"adamw-lr{lr}-{steps}steps": Run("dpo_adamw.yaml", [f"--model.optimizer.init_args.lr={lr}", f"--trainer.max_steps={steps}"], "search")
    for lr, steps in (("3e-4", 40),)
}  # lr 1e-4, 40 steps was the other point of the search: it is the run adamw-s0
ALPHAS = (1e-5, 1e-4, 1e-3)
"""OnDARE / OnTIES merge weights. α·τ̃ is added every step, so its pull over a run is about
steps·α (times 1/p on OnDARE's kept coordinates); 40 steps × these α span the paper's 1e-4 … 1e-1."""
MAIN_ALPHA = 1e-4  # the α run with every seed


def seeded(name: str, run: Run, seeds=SEEDS) -> dict[str, Run]:
    """The run once per seed (``<name>-s<seed>``): the training order and OnDARE's drop masks
    change, the held-out split (the data's ``seed``) does not."""
    runs = {}
    for seed in seeds:
        extra = [f"--seed_everything={seed}", f"--data.init_args.order_seed={seed}"]
        if run.config != "dpo_adamw.yaml":
            extra.append(f"--model.optimizer.init_args.seed={seed}")
        runs[f"{name}-s{seed}"] = run._replace(overrides=[*run.overrides, *extra])
    return runs


def alpha(value: float) -> list[str]:
    return [f"--model.optimizer.init_args.merge_weight={value:g}"]


def short(value: float) -> str:
    """``1e-4`` for 0.0001 (run names)."""
    return f"{value:.0e}".replace("e-0", "e-")


def ondare(a: float) -> Run:
    return Run("dpo_ondare.yaml", alpha(a), "OnDARE (p 0.01)", a)


def onties(a: float) -> Run:
    return Run("dpo_onties.yaml", alpha(a), "OnTIES (p 0.01, lr 1e-3)", a)


MAIN = {"adamw": Run("dpo_adamw.yaml", [], "AdamW"),
        f"ondare-a{short(MAIN_ALPHA)}": ondare(MAIN_ALPHA), f"onties-a{short(MAIN_ALPHA)}": onties(MAIN_ALPHA)}
"""The rows with every seed."""
SWEEPS = {**{f"ondare-a{short(a)}": ondare(a) for a in ALPHAS if a != MAIN_ALPHA},
          **{f"onties-a{short(a)}": onties(a) for a in ALPHAS if a != MAIN_ALPHA}}
OTHERS = {
    "ondare-step4": Run("dpo_stepk.yaml", alpha(MAIN_ALPHA), "step-K OnDARE (K 4)"),
    "adamw-beta0.5": Run("dpo_adamw.yaml", ["--model.beta=0.5"], "AdamW, KL β", 0.5),  # the KL baseline
    "onties-adamw-lr": Run("dpo_onties.yaml", [*alpha(MAIN_ALPHA), f"--model.optimizer.init_args.lr={LR:g}"],
                           "OnTIES at AdamW's lr"),
}
# In the order one copy builds them: the main rows' first seed, the sweeps, their other seeds.
RUNS: dict[str, Run] = dict(SEARCH)
for name, run in {**MAIN, **SWEEPS}.items():
    RUNS |= seeded(name, run, SEEDS[:1])
for name, run in MAIN.items():
    RUNS |= seeded(name, run, SEEDS[1:])
for name, run in OTHERS.items():
    RUNS |= seeded(name, run, SEEDS[:1])
MERGED_RUN = "adamw-s0"
"""The AdamW run the offline baselines merge with the SFT model."""
# Offline merges (the paper's baselines): base + w * F(dpo - base) + (1 - w) * F(sft - base); each
# method traces a frontier over w (w = 0 is the SFT model, w = 1 linear is the AdamW run).
MERGES = {
    f"{method}-w{weight}": dict(method=method, weight=weight, density=density)
    for method, density in (("linear", 1.0), ("dare", 0.5), ("ties", 0.5))
    for weight in (0.25, 0.5, 0.75)
}


@dataclass
class Stage:
    name: str
    run: Callable[[Path], None]
    needs: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return OUT / self.name

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def lock(self) -> bool:
        """Take the stage's lock (False: another live process holds it); stale locks are taken over."""
        path = self.dir.with_name(self.dir.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                with open(path, "x") as handle:
                    handle.write(str(os.getpid()))
                return True
            except FileExistsError:
                try:
                    os.kill(int(path.read_text() or 0), 0)
                    return False
                except (ProcessLookupError, ValueError):
                    path.unlink(missing_ok=True)  # its builder died
        return False

    def unlock(self) -> None:
        self.dir.with_name(self.dir.name + ".lock").unlink(missing_ok=True)


def _fit(config: Path, out: Path, extra: list[str]):
    """``lightning-sr fit --config config`` with its logs under ``out``; returns the CLI."""
    from lightning_sr.cli import main

    args = [
        "fit", "--config", str(config),
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.logger.init_args.name=logs",
        "--trainer.enable_checkpointing=false",  # a killed stage reruns whole; 1.6 GB ckpts unused
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    log.info("lightning-sr %s", " ".join(args))
    return main(args)


def _save(model, out: Path) -> None:
    from lightning_sr.loading import load_tokenizer

    model.save_pretrained(out)
    load_tokenizer(BASE).save_pretrained(out)


def run_sft(out: Path) -> None:
    cli = _fit(ROOT / "configs" / "fit_sft.yaml", out, ["--trainer.limit_val_batches=0"])
    _save(cli.model.model, out / "model")


def dpo_stage(name: str) -> Callable[[Path], None]:
    run_ = RUNS[name]

    def run(out: Path) -> None:
        cli = _fit(CONFIGS / run_.config, out, run_.overrides)
        _save(cli.model.policy, out / "model")

    return run


def merge_stage(name: str) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        from lightning_sr.loading import load_causal_lm
        from lightning_sr.merging import merge_state_dicts

        base = load_causal_lm(BASE, "float32")
        dpo = load_causal_lm(str(OUT / "dpo" / MERGED_RUN / "model"), "float32").state_dict()
        sft = load_causal_lm(str(SFT_MODEL), "float32").state_dict()
        merge = MERGES[name]
        merged = merge_state_dicts(base.state_dict(), [dpo, sft], [merge["weight"], 1.0 - merge["weight"]],
                                   merge["method"], merge["density"], seed=0)
        base.load_state_dict(merged)
        _save(base, out / "model")

    return run


def model_path(name: str) -> str:
    """Where the evaluated model ``name`` lives (the base is the embedded name)."""
    if name == "base":
        return BASE
    if name == "sft":
        return str(SFT_MODEL)
    kind, _, run = name.partition("/")
    return str(OUT / kind / run / "model")


def eval_stage(name: str) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        from online_merging_eval import evaluate

        result = evaluate(model_path(name), reference=str(SFT_MODEL), cache_dir=OUT / "eval" / "_cache")
        (out / "metrics.json").write_text(json.dumps({"model": name, **result}, indent=2))

    return run


def run_report(out: Path) -> None:
    from online_merging_report import report

    report(OUT / "eval", RUNS, MERGES, f"Online merging: SmolLM2-135M base → unit-conversion SFT → tone DPO "
                                       f"({STEPS} steps, lr {LR:g}, CPU)", MERGED_RUN)


def stages() -> list[Stage]:
    """Every stage in the order a single copy runs them: each model's evaluation right after it."""

    def evaluation(model: str, needs: list[str]) -> Stage:
        return Stage(f"eval/{model}", eval_stage(model), ["sft", *needs])

    order = [Stage("sft", run_sft), evaluation("base", []), evaluation("sft", [])]
    for run in RUNS:
        order += [Stage(f"dpo/{run}", dpo_stage(run), ["sft"]), evaluation(f"dpo/{run}", [f"dpo/{run}"])]
        if run == MERGED_RUN:
            for merge in MERGES:
                order += [Stage(f"merges/{merge}", merge_stage(merge), ["sft", f"dpo/{MERGED_RUN}"]),
                          evaluation(f"merges/{merge}", [f"merges/{merge}"])]
    order.append(Stage("report", run_report, [s.name for s in order if s.name.startswith("eval/")]))
    return order


def execute(stage: Stage) -> None:
    if stage.dir.exists():
        log.info("%s: removing an unfinished earlier attempt", stage.name)
        shutil.rmtree(stage.dir)
    stage.dir.mkdir(parents=True)
    log.info("== %s", stage.name)
    start = time.time()
    stage.run(stage.dir)
    seconds = time.time() - start
    (stage.dir / "done.json").write_text(json.dumps({"stage": stage.name, "seconds": round(seconds, 1),
                                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
    log.info("== %s done in %.0f s", stage.name, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run these stages (and the unfinished ones they need)")
    parser.add_argument("--list", action="store_true", help="list the stages and whether each is done")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # Lightning's records reach this handler too
        handler.addFilter(drop_tips)
    all_stages = {s.name: s for s in stages()}
    if args.list:
        for s in all_stages.values():
            print(f"{'done' if s.done else '    '}  {s.name}")
        return
    wanted = list(all_stages) if not args.only else args.only
    unknown = [w for w in wanted if w not in all_stages]
    if unknown:
        sys.exit(f"unknown stage(s) {unknown}; see --list")
    order: list[str] = []

    def visit(name: str) -> None:
        for need in all_stages[name].needs:
            visit(need)
        if name not in order:
            order.append(name)

    for name in wanted:
        visit(name)
    start = time.time()
    skipped = [name for name in order if all_stages[name].done]
    if skipped:
        log.info("done already, skipped: %s", " ".join(skipped))
    waiting = False
    while True:
        pending = [all_stages[n] for n in order if not all_stages[n].done]
        if not pending:
            break
        ready = [s for s in pending if all(all_stages[n].done for n in s.needs)]
        stage = next((s for s in ready if s.lock()), None)
        if stage is None:  # another copy is building what is left (or what it needs)
            if not waiting:
                log.info("waiting for stages another copy is building")
            waiting = True
            time.sleep(10)
            continue
        waiting = False
        try:
            if not stage.done:  # finished by another copy since we looked
                execute(stage)
        finally:
            stage.unlock()
    log.info("pipeline finished in %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
