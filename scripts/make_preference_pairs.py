"""Make a preference file (JSONL: prompt, chosen, rejected) with Speculative Rejection.

The Best-of-N data pipeline of the online-merging paper, on the embedded models: for each prompt,
sample ``n`` responses with speculative rejection, score them with the reward model, and pair the
best final-scored response (chosen) with the worst final-scored one (rejected). Only complete,
final-scored candidates are paired (candidates rejected early have partial scores only), so with
``alpha`` rejecting part of the rows, the pair comes from the survivors; a prompt with fewer than
two distinct final candidates, or with no positive reward gap (or one below ``--min-gap``),
is skipped.

    python scripts/make_preference_pairs.py                 # 50 shipped prompts, n=4, 48 tokens
    python scripts/make_preference_pairs.py --generator <hub id or folder> --reward <folder> \
        --prompts my_prompts.jsonl --output my_pairs.jsonl --n 16 --max-new-tokens 256

Lines are written as each batch of prompts finishes, so an interrupted run leaves a usable file.
Each line also records the two rewards and how it was made.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("make_preference_pairs")
ROOT = Path(__file__).resolve().parents[1]


def read_prompts(path: Path, limit: int | None) -> list[dict]:
    """``[{"id", "prompt"}]`` from a JSONL file with a ``prompt`` field, or a text file (one per line)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                if "prompt" not in row:
                    raise ValueError(f"{path}:{lineno}: missing field 'prompt'")
                rows.append({"id": row.get("id", f"line-{lineno}"), "prompt": row["prompt"]})
            else:
                rows.append({"id": f"line-{lineno}", "prompt": line.strip()})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def best_and_worst(result, min_gap: float = 0.0):
    """(chosen, rejected) candidates of a GenerationResult, or None when no useful pair exists."""
    finals = [c for c in result.candidates if c.final and not math.isnan(c.reward) and c.text.strip()]
    if len(finals) < 2:
        return None
    best = max(finals, key=lambda c: c.reward)
    worst = min(finals, key=lambda c: c.reward)
    gap = best.reward - worst.reward
    if best.text.strip() == worst.text.strip() or gap <= 0 or gap < min_gap:
        return None
    return best, worst


def make_pairs(model, tokenizer, reward, prompts: list[dict], output: Path, args) -> tuple[int, int]:
    """Generate and write pairs; returns (pairs written, prompts skipped)."""
    from lightning_sr.generation import FixedSchedule, SamplingParams, speculative_rejection

    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=1.0, max_new_tokens=args.max_new_tokens
    )
    made = f"speculative_rejection n={args.n} alpha={args.alpha} decisions={args.decisions}"
    written = skipped = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as out:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            t0 = time.perf_counter()
            results = speculative_rejection(
                model, tokenizer, reward, [p["prompt"] for p in batch],
                n=args.n, alpha=args.alpha, schedule=FixedSchedule(lengths=list(args.decisions)),
                sampling=sampling, seed=args.seed + start,
            )
            for item, result in zip(batch, results):
                pair = best_and_worst(result, args.min_gap)
                if pair is None:
                    skipped += 1
                    continue
                chosen, rejected = pair
                row = {
                    "id": item["id"], "prompt": item["prompt"],
                    "chosen": chosen.text.strip(), "rejected": rejected.text.strip(),
                    "chosen_reward": chosen.reward, "rejected_reward": rejected.reward,
                    "made_by": made,
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            out.flush()
            log.info("prompts %d-%d: %d pairs so far, %d skipped (%.1f s)",
                     start + 1, start + len(batch), written, skipped, time.perf_counter() - t0)
    return written, skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=ROOT / "configs/data/prompts.jsonl")
    p.add_argument("--output", type=Path, default=ROOT / "configs/data/preferences.jsonl")
    p.add_argument("--generator", default="smollm2-135m-instruct", help="hub id, folder or embedded name")
    p.add_argument("--reward", default="minilm-positivity", help="hub id, folder or embedded name")
    p.add_argument("--limit", type=int, default=50, help="first N prompts (0: all)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--alpha", type=float, default=0.5, help="fraction rejected at each decision point")
    p.add_argument("--decisions", type=int, nargs="*", default=[16],
                   help="generated lengths of the decision points (fixed schedule)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4, help="prompts decoded together")
    p.add_argument("--min-gap", type=float, default=0.0, help="skip pairs whose reward gap is smaller")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_sr.assets import resolve_model
    from lightning_sr.rewards import HFRewardModel

    torch.set_grad_enabled(False)
    prompts = read_prompts(args.prompts, args.limit or None)
    folder = resolve_model(args.generator)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reward = HFRewardModel(args.reward)
    t0 = time.perf_counter()
    written, skipped = make_pairs(model, tokenizer, reward, prompts, args.output, args)
    log.info("wrote %d pairs to %s (%d prompts skipped) in %.0f s",
             written, args.output, skipped, time.perf_counter() - t0)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
