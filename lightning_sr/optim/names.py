"""Name alignment: pair a model's parameter names with the names of a base state dict.

The online merging optimizers need, for every trainable parameter, its counterpart in the
pre-trained base model (τ = θ_SFT − θ_base). The two rarely use the same names: a LightningModule
that holds a Hugging Face model as ``self.policy`` calls its weights ``policy.model.layers.0...``,
a compiled module adds ``_orig_mod.``, and the base calls them ``model.layers.0...``. This module
only compares names; it knows nothing of tensors, shapes or optimizers (the caller checks the
shapes of what it pairs), so the matching rule can change here alone.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["align_names"]


def align_names(names: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Pair parameter names with base names that differ only by leading module prefixes.

    A LightningModule that holds a Hugging Face model as ``self.policy`` names its weights
    ``policy.model.layers.0...`` while the base model calls them ``model.layers.0...``. A name is
    paired with, in order: the identical base name; the longest of its own dotted suffixes that
    is a whole base name (the model has an extra prefix); the single base name that ends with it
    (the base has an extra prefix; skipped when several do). Names without a pair are left out.

    Returns ``{name: base name}`` for the paired names, in the order of ``names``.
    """
    base_names = list(base_names)
    base_set = set(base_names)
    ending_with: dict[str, list[str]] = {}
    for base_name in base_names:
        parts = base_name.split(".")
        for i in range(1, len(parts)):
            ending_with.setdefault(".".join(parts[i:]), []).append(base_name)
    pairs = {}
    for name in names:
        if name in base_set:
            pairs[name] = name
            continue
        parts = name.split(".")
        suffixes = (".".join(parts[i:]) for i in range(1, len(parts)))
        found = next((s for s in suffixes if s in base_set), None)
        if found is None and len(ending_with.get(name, ())) == 1:
            found = ending_with[name][0]
        if found is not None:
            pairs[name] = found
    return pairs
