"""Online merging optimizers: OnDARE and OnTIES (Lu et al., arXiv 2405.17931), Adam variants.

At every step the Adam update Δ and the reference delta τ = θ_SFT − θ_base are both sparsified
and merged into the weights (the paper's Eq. 2, θ ← θ + F(Δ) ⊕ F(τ)), which keeps the policy
close to the direction the SFT model took away from its pre-trained base:

- **OnDARE** (random drop, linear merge, Eq. 3): ``Δ̃ = Δ ⊙ M_t / p`` with a fresh Bernoulli(p)
  mask every step, ``τ̃ = τ ⊙ M_0 / p`` with a mask drawn once, ``θ ← θ + (1 − α)·Δ̃ + α·τ̃``.
- **OnTIES** (top-k drop, sign consensus, Eq. 7 as in the authors' code): ``Δ̃`` and ``τ̃`` keep
  their ⌊p·n⌋ largest magnitudes, the elected sign is ``s = sign(τ̃ + Δ̃)`` (+1 at 0) on the
  *unweighted* terms, ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``.

``Δ = −lr · m̂ / (√v̂ + eps)`` uses ``torch.optim.AdamW``'s moments and bias correction, and
weight decay is ``torch.optim.AdamW``'s decoupled ``θ ← θ − lr·wd·θ`` applied first, so with
``keep_rate=1, merge_weight=0`` OnDARE *is* AdamW. p = ``keep_rate``, α = ``merge_weight``
(multiplies τ̃ directly, once per step, no lr factor). ``merge_every=K > 1`` is the paper's
step-K variant (Alg. 2): K − 1 plain Adam steps whose deltas are accumulated, then on the K-th
step the weights go back to the last merge point (the accumulated Adam deltas are subtracted;
weight decay applied in between stays, as in the authors' code) and the accumulated delta plus
this step's is sparsified and merged once with α·τ̃ (α is not multiplied by K). This costs one
extra parameter-sized buffer per parameter.

How it runs (see the README):

- The Adam moments and the weight decay of a param group are updated with foreach kernels; Δ is
  then computed per parameter, and only where it is needed.
- τ̃ is stored sparse, as sorted flat indices and values, computed once: by ``set_base`` (the
  ``OnlineMerging`` callback calls it at fit start), or at the first ``step`` from the
  ``base_model`` given at construction, for loops that build the optimizer by class path and
  arguments alone (plain PyTorch, Fabric, litgpt, Hugging Face ``Trainer``, LightningCLI's
  ``--optimizer``). Named parameters (``model.named_parameters()``) are paired with the base by
  name (:mod:`.names`: the longest unique dotted suffix of equal shape, wrappers ignored,
  ``rename`` for the rest), bare ones by position with the base in module order, every shape
  checked (:mod:`.reference`); ``base_match`` reports the pairs and the plain-AdamW rest.
- OnDARE's masks come from a ``torch.Generator`` on the parameter's device, seeded from ``seed``
  and the parameter's position, whose state lives in the optimizer state: every data-parallel
  rank draws the same masks and a resumed run continues exactly (on GPUs of one model: torch's
  CUDA random kernels size their grid by the multiprocessor count). On the CPU the kept set is
  drawn as geometric gaps (O(p·n) work, no dense mask) and Δ is computed only there; on a GPU a
  dense Bernoulli mask is drawn on the device and applied to the dense Δ, no host round trip.
- OnTIES ranks every |Δ| and keeps the exact top-k, never with a full sort: on the CPU a sampled
  threshold, then one chunked pass that computes |Δ| and collects the candidates above it, then
  ``torch.topk`` on those; on a GPU ``torch.topk``. Δ itself is computed only at the kept
  coordinates. The sign election finds the overlap of the two sorted index sets with
  ``searchsorted``, without a host sync.
- Half-precision parameters get fp32 master weights and fp32 moments in the state (α·τ̃ per step
  is far below bf16 resolution); the master copy is authoritative, so load new weights before
  the first step.
- FSDP2 (``DTensor``) parameters: each rank keeps the state of its shard only (τ̃ included) and
  makes every mask draw and top-k selection over the whole parameter (:mod:`.shards`,
  :mod:`.sparsify`), so one process and any number of shards end with the same weights;
  ``state_dict`` gives the sharded state as ``DTensor`` s, which torch's distributed
  checkpoint saves per rank and reshards on load (:mod:`.state_dict`).

Deliberate differences from the authors' code (QwenLM/online_merging_optimizers):

- τ̃ is not clamped by default. The authors clamp OnDARE's rescaled ``τ ⊙ M_0 / p`` to [−1, 1];
  ``OnDARE(clamp_reference=True)`` does the same, to reproduce their runs.
- Δ and weight decay are ``torch.optim.AdamW``'s: eps is added after the bias correction and the
  decay is applied before the update. The authors use the Hugging Face ``AdamW`` form (eps added
  to √v before the bias correction, decay applied after the update).
- Step-K updates every parameter on non-merge steps; the authors' loop returns after the first
  parameter on those steps.
- Half-precision parameters get fp32 master weights and moments; the authors keep τ and the
  moments in the parameter dtype.
- OnTIES' top-k uses ``topk`` (or a sampled threshold), not a full ``argsort``: the same set,
  up to ties at the k-th magnitude.

Where each part lives (data flows down this list: a module imports only modules below it, and
``lightning_sr.optim`` exports the public names):

- :mod:`.ondare` (:class:`~.ondare.OnDARE`) and :mod:`.onties` (:class:`~.onties.OnTIES`): how
  τ is sparsified once and how a step's Δ is merged with it.
- :mod:`.base` (:class:`~.base.OnlineMergingOptimizer`): what both share, the one signature,
  the state, ``set_base`` (and ``base_model`` at the first step), ``step`` and step-K.
- :mod:`.adam` (the AdamW moments, decay and Δ), :mod:`.state_dict` (a parameter's fresh state
  and its checkpointed form, sharded or not), :mod:`.reference` (pairing the parameters with the
  base before τ is computed, by name or by position, loading ``base_model``, the resumed check,
  and :class:`~.reference.BaseMatch` and its log line),
  :mod:`.names` (matching parameter names to the base's names).
- this module: what the hyperparameters mean (the argument docs both classes' docstrings are
  built from, and :func:`extended_signature`, which adds a subclass's own to the one signature)
  and which values are valid, and the optimizers' logger.
- :mod:`.sparsify` (which coordinates are kept) and :mod:`.shards` (where a shard's elements sit).

This package imports no Lightning.
"""

from __future__ import annotations

import inspect
import logging
import textwrap
import warnings
from collections.abc import Mapping

from lightning_sr.optim.sparsify import MIN_KEEP_RATE

__all__ = ["ARGUMENTS", "arguments_doc", "check_hyperparameters", "extended_signature", "log"]

log = logging.getLogger(__name__)
"""The logger of all the online merging optimizers' messages (``set_base``'s among them)."""

_PAPER_LR_RANGE = (1e-7, 5e-6)  # the learning rates of the paper's experiments
_HIGH_LR = 1e-4  # warn above this: 20x the paper's largest
_warned_high_lr: set[str] = set()  # class names that have warned (once per process per class)

ARGUMENTS: dict[str, str] = {
    "params": "the parameters to optimize, or dicts defining parameter groups (a group may set any of "
    "the arguments below).",
    "lr": "learning rate of the Adam update Δ. The paper uses 1e-7 to 5e-6; a value above 1e-4 warns once.",
    "betas": "Adam's coefficients for the running averages of the gradient and its square.",
    "eps": "added to √v̂ in Adam's denominator, for numerical stability.",
    "weight_decay": "decoupled weight decay, ``θ ← θ − lr·weight_decay·θ`` before each update.",
    "keep_rate": "p, the fraction of the coordinates of Δ (every step) and of τ (once, at ``set_base``) "
    "that are kept: drawn at random by OnDARE, the largest by OnTIES. In [1e-12, 1]; the paper uses 0.01.",
    "merge_weight": "how hard each step pulls toward the SFT model's direction τ = θ_SFT − θ_base. "
    "Multiplies τ̃ directly, once per step, without an lr factor. In [0, 1]; the paper searched 1e-7 "
    "to 1e-4.",
    "merge_every": "K of the paper's step-K variant (Alg. 2): merge every K-th step, with K − 1 plain Adam "
    "steps accumulated in between (one extra parameter-sized buffer). 1 merges every step.",
    "seed": "seeds the random masks (OnDARE's; OnTIES draws none), an integer >= 0.",
    "base_model": "the pre-trained model the policy was fine-tuned from (τ = θ_SFT − θ_base): a hub id, a "
    "local Hugging Face folder, an embedded model name, a ``.safetensors`` / ``torch.save`` / Lightning "
    "``.ckpt`` file, a state dict or a module. Loaded at the first ``step()``, when the weights are the "
    "fine-tuned ones (litgpt loads them after building the optimizer), then released; a resumed "
    "optimizer keeps its checkpoint's τ̃ and loads nothing. Parameters given with names "
    "(``model.named_parameters()``) match the base by name, bare ones by position (the base in module "
    "order; not a ``.safetensors`` file). None: call ``set_base`` or use the ``OnlineMerging`` callback "
    "instead (required when ``merge_weight > 0``).",
    "base_load_kwargs": "keyword arguments for ``from_pretrained`` when ``base_model`` is a model name or "
    "folder (e.g. ``{\"revision\": \"main\"}``).",
    "rename": "maps parameter-name prefixes to the base's, ``{\"backbone.encoder\": \"model\"}``, for what "
    "the name matching (identical names, else the longest unique dotted suffix of equal shape, wrappers "
    "such as ``_orig_mod.`` ignored) cannot pair; a prefix mapped to null trains with plain AdamW.",
}
"""The argument docs of :class:`~.base.OnlineMergingOptimizer`'s one signature, by name, in its order.

OnDARE and OnTIES take the same arguments (OnDARE one more); :func:`arguments_doc` builds their
docstrings' ``Args:`` sections (which LightningCLI's ``--help`` shows) from these texts and the
few that are the class's own.
"""


def arguments_doc(**own: str) -> str:
    """The ``Args:`` section of a class docstring from the texts of :data:`ARGUMENTS`.

    ``own`` replaces the texts of some arguments (``{shared}`` in one stands for the text it
    replaces) and adds arguments after them (new names). Each is wrapped to 100 columns and
    indented as in a class docstring.
    """
    texts = {**ARGUMENTS, **own}
    lines = ["    Args:"]
    for name, text in texts.items():
        text = " ".join(text.replace("{shared}", ARGUMENTS.get(name, "")).split())
        lines.append(
            textwrap.fill(
                text, 100, initial_indent=f"        {name}: ", subsequent_indent=" " * 12, break_on_hyphens=False
            )
        )
    return "\n".join(lines) + "\n"


def extended_signature(init, **extra: tuple[object, object]) -> inspect.Signature:
    """``init``'s signature followed by the keyword-only arguments ``extra`` (``name=(annotation,
    default)``): how a subclass adds its own hyperparameters to the one signature (OnDARE's
    ``clamp_reference``), for ``inspect.signature`` and so for LightningCLI."""
    signature = inspect.signature(init, eval_str=True)
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in extra.items()
    ]
    return signature.replace(parameters=[*signature.parameters.values(), *added])


def check_hyperparameters(name: str, group: Mapping) -> None:
    """Reject invalid values of a param group; warn (once per class) about a far too large lr."""
    lr, betas = group["lr"], group["betas"]
    if lr < 0.0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
    if group["eps"] < 0.0 or group["weight_decay"] < 0.0:
        raise ValueError(
            f"{name}: eps and weight_decay must be >= 0, got {group['eps']}, {group['weight_decay']}"
        )
    if not MIN_KEEP_RATE <= group["keep_rate"] <= 1.0:
        raise ValueError(
            f"{name}: keep_rate must be in [{MIN_KEEP_RATE:g}, 1] (the fraction of coordinates kept; "
            f"the paper uses 0.01), got {group['keep_rate']}"
        )
    if not 0.0 <= group["merge_weight"] <= 1.0:
        raise ValueError(f"{name}: merge_weight must be in [0, 1], got {group['merge_weight']}")
    merge_every, seed = group["merge_every"], group["seed"]
    if int(merge_every) != merge_every or merge_every < 1:
        raise ValueError(f"{name}: merge_every must be an integer >= 1, got {merge_every}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"{name}: seed must be an integer >= 0, got {seed}")
    if lr > _HIGH_LR and name not in _warned_high_lr:
        _warned_high_lr.add(name)
        low, high = _PAPER_LR_RANGE
        warnings.warn(
            f"{name}: lr={lr:g} is far above the paper's range for online merging ({low:g} to {high:g}, "
            "Lu et al. 2024). merge_weight and keep_rate were tuned for that range: merge_weight·τ̃ "
            "is added once per step without an lr factor, so at this lr the Adam update outweighs "
            "the pull toward the SFT model far more than in the paper. Lower lr unless you mean it.",
            UserWarning,
            stacklevel=2,
        )
