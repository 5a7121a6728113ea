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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["model", "method", "pref_accuracy", "pref_margin", "reward", "sft_exact", "sft_value", "ppl", "train_seconds"]


def describe(name: str, runs: dict, merges: dict) -> str:
    """A short description of how a model was made."""
    if name == "base":
        return "base (SmolLM2-135M-Instruct)"
    if name == "sft":
        return "SFT (base + unit-conversion SFT)"
    kind, _, run = name.partition("/")
    if kind == "merges":
        m = merges[run]
        return f"offline {run} merge of AdamW-DPO and SFT (w={m['weight']}, density={m['density']})"
    config, extra = runs[run]
    return "DPO + " + optimizer_summary(ROOT / "configs" / "online_merging" / config, extra)


def optimizer_summary(config: Path, overrides: list[str]) -> str:
    """``"OnDARE (α=1e-3, p=0.01, K=4)"`` from a DPO config and the run's CLI overrides."""
    import yaml

    optimizer = yaml.safe_load(config.read_text())["model"]["init_args"]["optimizer"]
    args = dict(optimizer["init_args"])
    for override in overrides:
        key, _, value = override.removeprefix("--model.optimizer.init_args.").partition("=")
        args[key] = float(value)
    name = optimizer["class_path"].rsplit(".", 1)[-1]
    if name == "AdamW":
        return f"AdamW (lr={args['lr']:g})"
    parts = [f"lr={args['lr']:g}", f"α={args['merge_weight']:g}", f"p={args['keep_rate']:g}"]
    if args.get("merge_every", 1) > 1:
        parts.append(f"step-K, K={args['merge_every']}")
    return f"{name} ({', '.join(parts)})"


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


def load_rows(eval_dir: Path, runs: dict, merges: dict) -> list[dict]:
    rows = []
    for path in sorted(eval_dir.glob("**/metrics.json")):
        metrics = json.loads(path.read_text())
        name = metrics["model"]
        stage_done = eval_dir.parent / name / "done.json"
        seconds = json.loads(stage_done.read_text())["seconds"] if name != "base" and stage_done.is_file() else None
        rows.append({**{k: metrics.get(k) for k in COLUMNS}, "model": name, "method": describe(name, runs, merges),
                     "train_seconds": seconds, "examples": metrics.get("examples")})
    order = ["base", "sft", *(f"dpo/{r}" for r in runs), *(f"merges/{m}" for m in merges)]
    return sorted(rows, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))


def plot(rows: list[dict], on_frontier: list[str], path: Path) -> None:
    """Reward side (x) against the tax side (y) for every model, two reward measures side by side.

    The tax axis is the general-text perplexity (inverted: up is less tax); the skill accuracy is
    printed next to each point (every model after SFT scored the same here, see RESULTS.md).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "black", "sft": "grey", "adamw": "tab:red", "ondare": "tab:blue", "onties": "tab:green",
              "linear": "tab:orange", "dare": "tab:orange", "ties": "tab:orange"}
    markers = {"base": "s", "sft": "D", "merges": "^", "dpo": "o"}

    def style(name: str):
        kind, _, run = name.partition("/")
        key = run.split("-")[0] if run else kind
        return markers.get(kind, markers.get(name, "o")), colors[key]

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, (reward_key, reward_label) in zip(
        axes, [("pref_margin", "held-out DPO reward margin (β·log-ratio vs the SFT model, chosen − rejected)"),
               ("reward", "mean minilm-positivity reward of greedy replies to unseen prompts")]
    ):
        for row in rows:
            marker, color = style(row["model"])
            ax.scatter(row[reward_key], row["ppl"], marker=marker, color=color, s=80, zorder=3,
                       edgecolors="black" if row["model"] in on_frontier else "none", linewidths=1.5)
        ax.invert_yaxis()
        labels = [(f"{row['model'].split('/')[-1]} ({row['sft_exact']:.0%})", row[reward_key], row["ppl"]) for row in rows]
        place_labels(ax, labels, fontsize=7.5)
        ax.set_xlabel(f"reward side →\n{reward_label}", fontsize=9)
        ax.set_ylabel("tax side ↑: perplexity on Shakespeare (lower is better)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Online merging in miniature: SmolLM2-135M base → unit-conversion SFT → tone DPO (8 steps, CPU)\n"
                 "up and right is better; (n%) = held-out unit-conversion exact accuracy; "
                 "black edge = Pareto frontier (margin, accuracy, perplexity)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict], on_frontier: list[str]) -> str:
    """The table as Markdown (for RESULTS.md and the README): reward side, then tax side."""
    lines = [
        "| model | how it was made | pref. acc. ↑ | pref. margin ↑ | positivity reward ↑ | conversion exact ↑ | conversion value ↑ | Shakespeare ppl ↓ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "—" if r["model"] == "sft" else f"{r['pref_accuracy']:.2f}"
        star = " ★" if r["model"] in on_frontier else ""
        lines.append(
            f"| `{r['model']}`{star} | {r['method']} | {acc} | {r['pref_margin']:+.3f} | {r['reward']:.3f} | "
            f"{r['sft_exact']:.3f} | {r['sft_value']:.3f} | {r['ppl']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def report(eval_dir: Path, runs: dict, merges: dict, out_dir: Path = RESULTS) -> dict:
    """Write the CSV, JSON and PNG; return the JSON's content."""
    import torch

    rows = load_rows(eval_dir, runs, merges)
    trained = [r for r in rows if r["model"] not in ("base",)]
    on_frontier = frontier(trained)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "online_merging.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + ["frontier"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row[k] for k in COLUMNS}, "frontier": row["model"] in on_frontier})
    summary = {
        "rows": rows,
        "frontier": {"axes": [f"{key} {'up' if sign > 0 else 'down'}" for key, sign in OBJECTIVES], "models": on_frontier},
        "runs": {name: {"config": c, "overrides": e} for name, (c, e) in runs.items()},
        "merges": merges,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "online_merging.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "online_merging_table.md").write_text(markdown_table(rows, on_frontier))
    plot(rows, on_frontier, out_dir / "online_merging.png")
    return summary
