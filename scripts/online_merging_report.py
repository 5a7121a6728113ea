"""The online merging table and reward-versus-tax plot from the pipeline's per-model metrics.

Writes ``benchmarks/results/online_merging.{csv,json,png}`` and ``online_merging_table.md``: one row per model (base and SFT as
reference rows, the DPO runs, the offline merges), the Pareto frontier of (reward up, tax down),
and a plot of the reward side against the tax side (Lu et al., arXiv 2405.17931, Table 4 reads the
same way: higher reward *and* less alignment tax is better).
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def describe(name: str, runs: dict, merges: dict) -> str:
    """A short description of how a model (or a group of seeds, ``dpo/adamw``) was made."""
    if name == "base":
        return "base (SmolLM2-135M-Instruct)"
    if name == "sft":
        return "SFT (base + unit-conversion SFT)"
    kind, _, run = name.partition("/")
    if kind == "merges":
        m = merges[run]
        return f"offline {m['method']} merge of AdamW-DPO and SFT (w={m['weight']}, density={m['density']})"
    run = next(r for r in runs if r == run or group_of(r) == run)
    return "DPO + " + optimizer_summary(ROOT / "configs" / "online_merging" / runs[run].config, runs[run].overrides)


def group_of(run: str) -> str:
    """``adamw`` for ``adamw-s2``: the seeds of one setting form a group."""
    stem, _, seed = run.rpartition("-s")
    return stem if stem and seed.isdigit() else run


def optimizer_summary(config: Path, overrides: list[str]) -> str:
    """``"OnDARE (lr=3e-4, α=1e-4, p=0.01, K=4, 40 steps)"`` from a DPO config and the run's overrides."""
    import yaml

    settings = yaml.safe_load(config.read_text())
    optimizer = settings["model"]["init_args"]["optimizer"]
    args = dict(optimizer["init_args"])
    beta, steps = settings["model"]["init_args"].get("beta", 0.1), settings["trainer"]["max_steps"]
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith("--model.optimizer.init_args."):
            args[key.removeprefix("--model.optimizer.init_args.")] = float(value)
        elif key == "--model.beta":
            beta = float(value)
        elif key == "--trainer.max_steps":
            steps = int(value)
    name = optimizer["class_path"].rsplit(".", 1)[-1]
    parts = [f"lr={args['lr']:g}"]
    if name != "AdamW":
        parts += [f"α={args['merge_weight']:g}", f"p={args['keep_rate']:g}"]
    if args.get("merge_every", 1) > 1:
        parts.append(f"step-K, K={args['merge_every']}")
    if beta != 0.1:
        parts.append(f"β={beta:g}")
    return f"{name} ({', '.join(parts)}, {steps} steps)"


OBJECTIVES = (("pref_margin", 1), ("sft_exact", 1), ("ppl", -1))
"""The frontier's axes: reward margin up, skill accuracy up, general-text perplexity down."""


def frontier(rows: list[dict], objectives=OBJECTIVES) -> list[str]:
    """Models no other model matches or beats on every objective while beating on one (Pareto)."""

    def at_least(a: dict, b: dict) -> bool:
        return all(sign * a[key] >= sign * b[key] for key, sign in objectives)

    def beats(a: dict, b: dict) -> bool:
        return at_least(a, b) and any(sign * a[key] > sign * b[key] for key, sign in objectives)

    return [row["model"] for row in rows if not any(beats(other, row) for other in rows)]


def place_labels(ax, labels: list[tuple[str, float, float]], fontsize: float) -> None:
    """Annotate points so that no two labels overlap: each label takes the first of a few offsets
    around its point whose box (estimated from the text length) is clear of the labels placed."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data → pixel positions hold
    scale = ax.figure.dpi / 72  # points → pixels
    width_per_char, height = 0.55 * fontsize * scale, 1.2 * fontsize * scale
    offsets = [(6, 5), (6, -12), (-6, 5), (-6, -12), (6, 16), (6, -23), (-6, 16), (-6, -23), (6, 27), (6, -34)]
    placed: list[tuple[float, float, float, float]] = []
    for text, x, y in labels:
        px, py = ax.transData.transform((x, y))
        width = width_per_char * len(text)
        for dx, dy in offsets:
            left = px + dx * scale - (width if dx < 0 else 0)
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="right" if dx < 0 else "left")


METRICS = ("pref_accuracy", "pref_margin", "reward", "sft_exact", "sft_value", "ppl", "train_seconds")


def load_rows(eval_dir: Path, runs: dict, merges: dict) -> list[dict]:
    """One row per evaluated model (every seed on its own)."""
    rows = []
    for path in sorted(eval_dir.glob("**/metrics.json")):
        metrics = json.loads(path.read_text())
        name = metrics["model"]
        stage_done = eval_dir.parent / name / "done.json"
        seconds = json.loads(stage_done.read_text())["seconds"] if name != "base" and stage_done.is_file() else None
        rows.append({**{k: metrics.get(k) for k in METRICS}, "model": name, "train_seconds": seconds})
    order = ["base", "sft", *(f"dpo/{r}" for r in runs), *(f"merges/{m}" for m in merges)]
    return sorted((r for r in rows if r["model"] in order), key=lambda r: order.index(r["model"]))


def group_rows(rows: list[dict], runs: dict, merges: dict) -> list[dict]:
    """The seeds of each setting as one row: the mean of each metric, its sample standard deviation
    (``<metric>_sd``, None for one seed) and ``seeds``; with the row's plot family and setting."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        kind, _, run = row["model"].partition("/")
        groups.setdefault(f"dpo/{group_of(run)}" if kind == "dpo" else row["model"], []).append(row)
    grouped = []
    for name, members in groups.items():
        kind, _, run = name.partition("/")
        row = {"model": name, "method": describe(name, runs, merges), "seeds": len(members)}
        for key in METRICS:
            values = [m[key] for m in members if m[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        if kind == "dpo":
            first = runs[members[0]["model"].partition("/")[2]]
            row["family"], row["setting"] = first.family, first.setting
        elif kind == "merges":
            row["family"], row["setting"] = f"offline {merges[run]['method']}", merges[run]["weight"]
        else:
            row["family"], row["setting"] = name, None
        grouped.append(row)
    return grouped


COLORS = {"AdamW": "tab:red", "AdamW, KL β": "tab:pink", "OnDARE (p 0.01)": "tab:blue",
          "OnTIES (p 0.01, lr 1e-3)": "tab:green", "OnTIES at AdamW's lr": "olive", "step-K OnDARE (K 4)": "tab:purple",
          "offline linear": "tab:orange", "offline dare": "goldenrod", "offline ties": "saddlebrown", "sft": "grey", "base": "black"}


def family_lines(grouped: list[dict], merged_run: dict | None = None) -> dict[str, list[dict]]:
    """Each family's points in the order of its swept value, joined to the points it starts and
    ends at: offline merges start at the SFT model (w = 0) and the linear one ends at the merged
    AdamW run itself (``merged_run``, w = 1); the β sweep starts at the AdamW run (β = 0.1)."""
    by_name = {r["model"]: r for r in grouped}
    lines: dict[str, list[dict]] = {}
    for row in grouped:
        if row["family"] not in ("search",):
            lines.setdefault(row["family"], []).append(row)
    for family, points in lines.items():
        points.sort(key=lambda r: r["setting"] if r["setting"] is not None else 0.0)
        if family.startswith("offline") and "sft" in by_name:
            points.insert(0, by_name["sft"])
        if family == "offline linear" and merged_run is not None:
            points.append({**merged_run, "seeds": 1, "family": "dpo"})
        if family == "AdamW, KL β" and "dpo/adamw" in by_name:
            points.insert(0, by_name["dpo/adamw"])
    return lines


REWARD_AXES = (("pref_margin", "held-out DPO reward margin (β·log-ratio vs the SFT model, chosen − rejected)"),
               ("reward", "mean minilm-positivity reward of greedy replies to 25 unseen prompts"))
TAX_AXES = (("ppl", "perplexity on Shakespeare (lower is better)"),
            ("sft_exact", "held-out unit-conversion exact accuracy"))


def plot(grouped: list[dict], on_frontier: list[str], path: Path, title: str, merged_run: dict | None) -> None:
    """Reward side (x: held-out DPO margin; the same zoomed on the DPO runs; the positivity reward)
    against the tax side (y: general-text perplexity, inverted; held-out conversion accuracy), one
    line per family; error bars: the seeds' standard deviation. The base model (no skill, no DPO)
    is left out: it would squeeze the accuracy axis; it is in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in grouped if r["family"] not in ("search", "base")]
    runs = [r for r in shown if r["model"].startswith("dpo/")]
    best = max((r["pref_margin"] for r in runs), default=0.0)
    trained = [r for r in runs if r["pref_margin"] >= best / 2]  # the runs that trained, zoomed on
    columns = [(REWARD_AXES[0], shown, "all models"), (REWARD_AXES[0], trained, "the DPO runs that trained, closer"),
               (REWARD_AXES[1], shown, "all models")]
    fig, axes = plt.subplots(2, 3, figsize=(20, 12))
    for row_axes, (y_key, y_label) in zip(axes, TAX_AXES):
        for ax, ((x_key, x_label), labelled, what) in zip(row_axes, columns):
            for family, points in family_lines(shown, merged_run).items():
                color = COLORS.get(family, "black")
                ax.plot([p[x_key] for p in points], [p[y_key] for p in points], "-o", color=color, label=family,
                        markersize=6, alpha=0.85)
                for p in points:
                    if p["seeds"] > 1 and p["family"] == family:
                        ax.errorbar(p[x_key], p[y_key], xerr=p[f"{x_key}_sd"], yerr=p[f"{y_key}_sd"], color=color,
                                    capsize=3, linewidth=1)
                    if p["model"] in on_frontier:
                        ax.scatter(p[x_key], p[y_key], s=140, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
            if labelled is trained:  # zoom on the DPO runs (their spread plus a margin)
                for key, limits in ((x_key, ax.set_xlim), (y_key, ax.set_ylim)):
                    values = [r[key] for r in trained]
                    pad = 0.15 * (max(values) - min(values) or 1.0)
                    limits(min(values) - pad, max(values) + pad)
            if y_key == "ppl":
                ax.invert_yaxis()
            place_labels(ax, [(r["model"].split("/")[-1], r[x_key], r[y_key]) for r in labelled], fontsize=7)
            ax.set_title(what, fontsize=9)
            ax.set_xlabel(f"reward side →\n{x_label}", fontsize=9)
            ax.set_ylabel(f"tax side ↑: {y_label}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize=7.5, loc="lower left")
    fig.suptitle(title + "\nup and right is better; circled = Pareto frontier (margin, conversion accuracy, perplexity); "
                 "error bars = standard deviation over the seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tax_at_reward(points: list[dict], x_key: str, y_key: str, x0: float, sign: int) -> float | None:
    """The best ``y_key`` (``sign`` +1: highest, −1: lowest) where the family's line, read between
    consecutive points, reaches the reward ``x0``; None when it never does."""
    found = []
    for a, b in zip(points, points[1:] or points):
        (xa, ya), (xb, yb) = (a[x_key], a[y_key]), (b[x_key], b[y_key])
        if min(xa, xb) <= x0 <= max(xa, xb):
            found.append(ya if xa == xb else ya + (yb - ya) * (x0 - xa) / (xb - xa))
    return max(found, key=lambda y: sign * y) if found else None


def equal_reward_table(grouped: list[dict], merged_run: dict | None = None) -> list[dict]:
    """Each family's tax at the AdamW run's reward (Table 4 of the paper compares at equal reward):
    perplexity and conversion accuracy read off its line where it crosses AdamW's margin and
    AdamW's positivity reward."""
    adamw = next(r for r in grouped if r["model"] == "dpo/adamw")
    table = []
    for family, points in family_lines(grouped, merged_run).items():
        if family in ("base", "sft"):
            continue
        entry = {"family": family}
        for x_key, _ in REWARD_AXES:
            for y_key, sign in (("ppl", -1), ("sft_exact", 1)):
                entry[f"{y_key}_at_{x_key}"] = tax_at_reward(points, x_key, y_key, adamw[x_key], sign)
        table.append(entry)
    return table


def _cell(row: dict, key: str, fmt: str) -> str:
    if row[key] is None:
        return "—"
    sd = row.get(f"{key}_sd")
    return format(row[key], fmt) + (f" ± {format(sd, fmt.lstrip('+'))}" if sd is not None else "")


def markdown_table(grouped: list[dict], on_frontier: list[str]) -> str:
    """The table as Markdown (for RESULTS.md): reward side, then tax side; mean ± sd over seeds."""
    lines = [
        "| model | how it was made | seeds | pref. acc. ↑ | pref. margin ↑ | positivity reward ↑ | conversion exact ↑ | conversion value ↑ | Shakespeare ppl ↓ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in grouped:
        acc = "—" if r["model"] == "sft" else _cell(r, "pref_accuracy", ".2f")
        star = " ★" if r["model"] in on_frontier else ""
        lines.append(f"| `{r['model']}`{star} | {r['method']} | {r['seeds']} | {acc} | {_cell(r, 'pref_margin', '+.3f')} | "
                     f"{_cell(r, 'reward', '.3f')} | {_cell(r, 'sft_exact', '.3f')} | {_cell(r, 'sft_value', '.3f')} | "
                     f"{_cell(r, 'ppl', '.1f')} |")
    return "\n".join(lines) + "\n"


def equal_reward_markdown(table: list[dict]) -> str:
    """The equal-reward comparison as Markdown ("—": the family never reaches AdamW's reward)."""
    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    lines = ["| family | ppl at AdamW's margin ↓ | conversion at AdamW's margin ↑ | ppl at AdamW's positivity ↓ | conversion at AdamW's positivity ↑ |",
             "|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['family']} | {cell(e['ppl_at_pref_margin'], '.1f')} | {cell(e['sft_exact_at_pref_margin'], '.3f')} | "
                     f"{cell(e['ppl_at_reward'], '.1f')} | {cell(e['sft_exact_at_reward'], '.3f')} |")
    return "\n".join(lines) + "\n"


def report(eval_dir: Path, runs: dict, merges: dict, title: str, merged_run: str | None = None,
           out_dir: Path = RESULTS) -> dict:
    """Write the CSV (every model), the JSON, the Markdown table and the PNG (seeds grouped)."""
    import torch

    rows = load_rows(eval_dir, runs, merges)
    grouped = group_rows(rows, runs, merges)
    merged = next((r for r in rows if r["model"] == f"dpo/{merged_run}"), None)
    on_frontier = frontier([r for r in grouped if r["model"] != "base" and r["family"] != "search"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "online_merging.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "models": rows,
        "groups": grouped,
        "frontier": {"axes": [f"{key} {'up' if sign > 0 else 'down'}" for key, sign in OBJECTIVES], "models": on_frontier},
        "runs": {name: run._asdict() for name, run in runs.items()},
        "merges": merges,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "online_merging.json").write_text(json.dumps(summary, indent=2))
    summary["at_adamw_reward"] = equal_reward_table(grouped, merged)
    (out_dir / "online_merging_table.md").write_text(markdown_table(grouped, on_frontier) + "\n"
                                                     + equal_reward_markdown(summary["at_adamw_reward"]))
    plot(grouped, on_frontier, out_dir / "online_merging.png", title, merged)
    return summary
