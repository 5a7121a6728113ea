"""Name alignment: pair a model's parameter names with the names of a base state dict.

The online merging optimizers need, for every trainable parameter, its counterpart in the
pre-trained base model (τ = θ_SFT − θ_base). The two rarely use the same names: a LightningModule
that holds a Hugging Face model as ``self.policy`` calls its weights ``policy.model.layers.0...``,
a compiled module adds ``_orig_mod.``, DDP ``module.``, FSDP1 and activation checkpointing insert
``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` at every wrapped level, and a reward
model initialised from an SFT checkpoint holds the SFT network one level down
(``model._orig_mod.backbone.transformer...`` against the checkpoint's
``model._orig_mod.transformer...``), while the base calls them ``model.layers.0...``.

The rule (:func:`match_names`): wrapper segments are dropped from both sides, then a name is
paired with the base name that shares its *longest dotted suffix*, among the base tensors of the
same shape, if that base name is the only one sharing a suffix that long. A shared suffix of a
single segment (``weight``) counts only when it is a whole name on one side, so a new head's
``new_head.weight`` is never paired with some ``body.weight`` that happens to have its shape.
What stays unpaired is reported with the reason, and an explicit ``rename`` map handles the rest.

This module only compares names and shapes; it knows nothing of tensors or optimizers, so the
matching rule can change here alone. It imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["WRAPPER_SEGMENTS", "NameMatch", "match_names"]

WRAPPER_SEGMENTS = frozenset(
    {
        "_orig_mod",  # torch.compile's OptimizedModule
        "_fsdp_wrapped_module",  # FSDP1's FullyShardedDataParallel
        "_checkpoint_wrapped_module",  # torch.distributed's activation checkpointing wrapper
        "_forward_module",  # Lightning's / Fabric's module wrappers
        "_original_module",
    }
)
"""Module names that wrappers insert anywhere in a name; dropped before names are compared.

Leading prefixes (DDP's ``module.``, a LightningModule's ``policy.``) need no list: a shared
suffix ignores them."""

_EXACT = 1 << 30  # the score of an identical name: beats any shared suffix


@dataclass
class NameMatch:
    """The outcome of :func:`match_names`.

    ``pairs``: name → base name, in the order of the names. ``unmatched``: name → why it has no
    pair (no base name shares a long enough suffix at its shape, several do, or ``rename`` left it
    out). ``mismatched``: name → the base name it is evidently the counterpart of (the same name,
    up to prefixes and wrappers) whose shape differs: the caller decides whether that is an error.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, str] = field(default_factory=dict)


def _canonical(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def _renamed(name: str, rename: Mapping[str, str | None]) -> tuple[str | None, bool]:
    """``name`` after the longest ``rename`` key that is a dotted prefix of it (or all of it).

    Returns ``(new name, whether a key applied)``; the new name is None when the key maps to None.
    """
    best = None
    for old in rename:
        key = old.rstrip(".")
        applies = key == "" or name == key or name.startswith(key + ".")
        if applies and (best is None or len(key) > len(best.rstrip("."))):
            best = old
    if best is None:
        return name, False
    new = rename[best]
    if new is None:
        return None, True
    rest = name[len(best.rstrip(".")) :].lstrip(".")
    return ".".join(part for part in (new.rstrip("."), rest) if part), True


def match_names(
    names: Iterable[str],
    base_names: Iterable[str],
    shapes: Mapping[str, tuple] | None = None,
    base_shapes: Mapping[str, tuple] | None = None,
    rename: Mapping[str, str | None] | None = None,
) -> NameMatch:
    """Pair parameter names with base names: identical names, else the longest unique dotted suffix.

    For each name (after ``rename``, see below):

    1. an identical base name is its pair;
    2. else both names lose their wrapper segments (:data:`WRAPPER_SEGMENTS`) and the base names
       of the same shape (``shapes`` / ``base_shapes``: name → shape; without them every shape
       counts as equal) are searched for the longest shared dotted suffix. A suffix of one
       segment only counts when it is a whole name on either side. The single base name sharing
       the longest suffix is the pair; when several share it, the name is ambiguous and left
       unpaired (a shorter suffix would only be shared by more of them).
    3. A base name claimed by several names goes to the one sharing the longer suffix (a tie
       leaves them all unpaired).

    A name whose identical (up to prefixes and wrappers) base name has another shape is reported
    in ``mismatched``, not paired by a shorter suffix.

    ``rename`` maps dotted prefixes of parameter names (or whole names) to what the base calls
    them, ``{"backbone.encoder": "model"}``; the longest key that applies is used, and the result
    is matched as above. A key mapped to None leaves those parameters unpaired (plain AdamW).
    """
    shapes = shapes or {}
    base_shapes = base_shapes or {}
    rename = dict(rename or {})
    base_names = list(base_names)
    base_set = set(base_names)
    canonical = {b: _canonical(b) for b in base_names}
    by_canonical: dict[tuple, list[str]] = {}
    ending_with: dict[tuple, list[str]] = {}
    for base_name, parts in canonical.items():
        by_canonical.setdefault(parts, []).append(base_name)
        for k in range(1, len(parts) + 1):
            ending_with.setdefault(parts[-k:], []).append(base_name)

    def same_shape(name: str, base_name: str) -> bool:
        if name not in shapes or base_name not in base_shapes:
            return True
        return tuple(shapes[name]) == tuple(base_shapes[base_name])

    result = NameMatch()
    claims: dict[str, str] = {}  # name → base name
    scores: dict[str, int] = {}
    names = list(names)
    for name in names:
        target, renamed = _renamed(name, rename) if rename else (name, False)
        if target is None:
            result.unmatched[name] = "left out by rename"
            continue
        if target in base_set:
            if same_shape(name, target):
                claims[name], scores[name] = target, _EXACT
            else:
                result.mismatched[name] = target
            continue
        parts = _canonical(target)
        whole = by_canonical.get(parts, [])
        if len(whole) == 1:  # the same name up to wrappers
            if same_shape(name, whole[0]):
                claims[name], scores[name] = whole[0], len(parts)
            else:
                result.mismatched[name] = whole[0]
            continue
        shape = f" of shape {tuple(shapes[name])}" if name in shapes else ""
        why = f"no base tensor{shape} shares its last two name segments, nor its whole name"
        for k in range(len(parts), 0, -1):
            allowed = [b for b in ending_with.get(parts[-k:], ()) if k >= 2 or k in (len(parts), len(canonical[b]))]
            if not allowed:
                continue
            same = [b for b in allowed if same_shape(name, b)]
            if len(same) == 1:
                claims[name], scores[name], why = same[0], k, None
                break
            if len(same) > 1:
                suffix = ".".join(parts[-k:])
                why = f"ambiguous: {len(same)} base tensors end with {suffix!r} ({', '.join(same[:3])}, ...)"
                break
            whole_names = [b for b in allowed if k in (len(parts), len(canonical[b]))]
            if len(whole_names) == 1:  # its evident counterpart, at another shape
                result.mismatched[name], why = whole_names[0], None
                break
        if why is not None:
            result.unmatched[name] = why + (f" (renamed to {target!r})" if renamed else "")

    by_base: dict[str, list[str]] = {}
    for name, base_name in claims.items():
        by_base.setdefault(base_name, []).append(name)
    for name in names:
        if name not in claims:
            continue
        rivals = by_base[claims[name]]
        best = max(scores[n] for n in rivals)
        if scores[name] == best and sum(scores[n] == best for n in rivals) == 1:
            result.pairs[name] = claims[name]
        else:
            others = [n for n in rivals if n != name]
            result.unmatched[name] = f"its base tensor {claims[name]!r} is also claimed by {others[:3]}"
    return result
