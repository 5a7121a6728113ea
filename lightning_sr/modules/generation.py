"""SpeculativeRejectionModule: speculative rejection (or Best-of-N) as a drop-in ``predict_step``."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from typing_extensions import override

from lightning_sr.chat import encode_prompt
from lightning_sr.generation import (
    DecodeOptions,
    GenerationResult,
    SamplingParams,
    Schedule,
    StepEvent,
    best_of_n,
    speculative_rejection,
)
from lightning_sr.generation.schedules import as_schedule
from lightning_sr.lightning_packages import LightningModule
from lightning_sr.loading import check_source, load_causal_lm, load_tokenizer, torch_dtype
from lightning_sr.progress import show_status
from lightning_sr.rewards import HFRewardModel, RewardModel

log = logging.getLogger(__name__)

GENERATION_METHODS = ("speculative_rejection", "best_of_n")
"""The values of ``SpeculativeRejectionModule(method=...)``: how the best response per prompt is found."""


class SpeculativeRejectionModule(LightningModule):
    """Generates the best response per prompt with a generator and a reward model.

    ``predict_step`` takes a batch of ``{"id", "prompt"}`` items (as
    :class:`~lightning_sr.data.PromptDataModule` serves them) and returns one dict per prompt:
    ``id``, ``prompt``, ``response``, ``reward``, ``stats`` (and ``candidates`` with
    ``return_candidates=True``). Every prompt of the batch decodes together. A prompt that cannot
    be generated (longer than the generator's context, or a chat message list without a chat
    template) is skipped with a warning naming its id; the others go on.

    Models are loaded in ``configure_model`` (not at construction), moved to the trainer's device
    by Lightning and kept in eval mode without gradients. Callbacks with the
    :class:`~lightning_sr.callbacks.GenerationHooks` methods see every decoding step and each
    batch's results; the progress bar shows tokens, live rows, tokens/s and elapsed time while a
    batch decodes.

    Args:
        generator: the causal LM: a hub id, local folder, embedded default name
            (``"smollm2-135m-instruct"``) or a model object.
        reward_model: the reward model: a hub id, local folder or embedded default name
            (``"minilm-positivity"``) of a sequence classifier with one output, or any object with
            ``score(prompts, responses)`` (a :class:`~lightning_sr.rewards.RewardModel`).
        n: samples per prompt, or ``"auto"``: as many as the memory schedule's budget holds.
        alpha: fraction of each prompt's rows rejected at every decision point, in [0, 1).
        schedule: when to decide: ``MemorySchedule`` (the paper's; default, which on CPU needs an
            explicit ``budget_bytes``), ``FixedSchedule(lengths=[...])``, or an object of any
            class implementing the :class:`~lightning_sr.generation.Schedule` protocol (from
            YAML: its ``class_path`` and ``init_args``).
        sampling: temperature, top_k, top_p, max_new_tokens and stop_token_ids
            (``SamplingParams``).
        seed: sampling seed; a batch samples with ``seed + index of its first prompt``, so a
            batch's samples do not depend on the process or on a resumed run.
        method: ``"speculative_rejection"``, or ``"best_of_n"`` (the same engine, no rejection).
        chat_template: apply the generator's chat template to prompts when it has one.
        dtype: precision of models loaded by name: ``"float32"``, ``"bfloat16"``, ``"float16"``
            or ``"auto"`` (the checkpoint's own).
        tokenizer: the generator's tokenizer (an object, or a name or folder); needed when
            ``generator`` is a model object, else the generator's own.
        return_candidates: also return every sampled candidate with its reward.
        decode_options: how the decoding loop runs (host read-back interval on CUDA, CUDA
            graphs, compaction; ``DecodeOptions``). Greedy results do not depend on it; sampled
            ones are another draw from the same distribution.
    """

    def __init__(
        self,
        generator: Any = "smollm2-135m-instruct",
        reward_model: Any = "minilm-positivity",
        n: int | Literal["auto"] = 8,
        alpha: float = 0.5,
        schedule: Schedule | None = None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        method: Literal["speculative_rejection", "best_of_n"] = "speculative_rejection",
        chat_template: bool = True,
        dtype: str = "float32",
        tokenizer: Any = None,
        return_candidates: bool = False,
        decode_options: DecodeOptions | None = None,
    ):
        super().__init__()
        if method not in GENERATION_METHODS:
            raise ValueError(f"method must be one of {GENERATION_METHODS}, got {method!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1) (the fraction rejected per decision), got {alpha}")
        if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive integer or 'auto', got {n!r}")
        if n == "auto" and (method == "best_of_n" or alpha == 0):
            raise ValueError("n='auto' sizes n from the memory budget, which only rejection keeps: give n for Best-of-N")
        torch_dtype(dtype)  # bad names and missing folders fail here, before any model loads
        for name, source in (("generator", generator), ("reward_model", reward_model), ("tokenizer", tokenizer)):
            check_source(source, name)
        objects = {"generator": generator, "reward_model": reward_model, "tokenizer": tokenizer}
        self.save_hyperparameters(ignore=[name for name, value in objects.items() if not isinstance(value, (str, type(None)))])
        # A plain dict, so that model objects given here are not registered as submodules.
        self._sources = objects
        self.n, self.alpha, self.seed, self.method = n, alpha, seed, method
        self.schedule = as_schedule(schedule)  # a wrong object fails here, before any model loads
        self.sampling = sampling or SamplingParams()
        self.chat_template, self.dtype_name = chat_template, dtype
        self.return_candidates = return_candidates
        self.decode_options = decode_options
        self.generator: torch.nn.Module | None = None
        self.tokenizer = None
        self.reward: RewardModel | None = None
        self._warned_no_reward = False  # the all-NaN warning: once a run

    @override
    def configure_model(self) -> None:
        """Load the generator, its tokenizer and the reward model (once)."""
        if self.generator is not None:
            return
        if self.method == "speculative_rejection" and self.alpha > 0 and self._trainer is not None:
            self.schedule.kv_budget(self._trainer.strategy.root_device)  # a budget it cannot have fails before loading
        source, tokenizer = self._sources["generator"], self._sources["tokenizer"]
        if tokenizer is None and not isinstance(source, str):
            raise ValueError("SpeculativeRejectionModule needs `tokenizer` when `generator` is a model object")
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else source)
        self.generator = load_causal_lm(source, self.dtype_name).eval().requires_grad_(False)
        reward = self._sources["reward_model"]
        if isinstance(reward, str):
            reward = HFRewardModel(reward, dtype=self.dtype_name)
        if not callable(getattr(reward, "score", None)):
            raise TypeError(f"reward_model must be a name, a path or a RewardModel, got {type(reward).__name__}")
        self.reward = reward

    @override
    def on_predict_start(self) -> None:
        """Make sure the models are loaded (``configure_model`` loads them once) and move the
        reward model to the module's device: it is not a submodule, so Lightning does not move it."""
        self.configure_model()
        self._warned_no_reward = False
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)

    @override
    def predict_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """The chosen response of every prompt of ``batch`` that fits the generator (see the class
        docstring), all decoded in one engine call."""
        items = [item for item in batch if self._can_generate(item)]
        if not items:
            return []
        first = batch[0].get("index", batch_idx)
        status = _Status(self._trainer, batch_idx, len(items))
        engine_args = dict(
            n=self.n, sampling=self.sampling, seed=self.seed + first, chat_template=self.chat_template,
            decode_options=self.decode_options,
        )
        prompts = [item["prompt"] for item in items]

        def observe(event: StepEvent) -> None:
            self._call_callbacks("on_generation_step", event)
            status.update(event)

        if self.method == "best_of_n":
            results = best_of_n(self.generator, self.tokenizer, self.reward, prompts, observer=observe, **engine_args)
        else:
            results = speculative_rejection(
                self.generator, self.tokenizer, self.reward, prompts,
                alpha=self.alpha, schedule=self.schedule, observer=observe, **engine_args,
            )
        self._call_callbacks("on_generation_end", results)
        self._log_batch(results, batch_idx)
        self._warn_if_no_reward(results, batch_idx)
        return [self._output(item, result) for item, result in zip(items, results)]

    def _can_generate(self, item: dict) -> bool:
        """Whether a prompt fits the generator; if not, a warning names it and it is skipped."""
        try:
            length = len(encode_prompt(self.tokenizer, item["prompt"], self.chat_template))
            context = _context_length(self.generator.config)
            if context is not None and length >= context:
                raise ValueError(f"it has {length} tokens, the generator's context holds {context}")
        except (TypeError, ValueError) as error:
            where = f" (line {item['line']})" if "line" in item else ""
            log.warning("Skipping prompt %r%s: %s", item.get("id"), where, error)
            return False
        return True

    def _warn_if_no_reward(self, results: list[GenerationResult], batch_idx: int) -> None:
        """At the run's first batch whose every reward is NaN, a warning naming the reward model:
        such a run writes responses chosen by nothing, and it would otherwise show only at the end."""
        if self._warned_no_reward or not results or any(_finite(result.reward) for result in results):
            return
        self._warned_no_reward = True
        reward = self._sources["reward_model"]
        log.warning(
            "Every reward of batch %d is NaN: the reward model %s gives no usable score, so responses "
            "are chosen by nothing and written with reward null",
            batch_idx, reward if isinstance(reward, str) else type(reward).__name__,
        )

    def _output(self, item: dict, result: GenerationResult) -> dict:
        output = {
            "id": item["id"],
            "prompt": result.prompt,
            "response": result.response,
            "reward": result.reward,
            "stats": result.stats.to_dict(),
        }
        if self.return_candidates:
            output["candidates"] = [candidate.to_dict() for candidate in result.candidates]
        return output

    def _call_callbacks(self, hook: str, *args: Any) -> None:
        """Call the :class:`~lightning_sr.callbacks.GenerationHooks` method ``hook`` on callbacks."""
        trainer = self._trainer
        for callback in trainer.callbacks if trainer is not None else ():
            method = getattr(callback, hook, None)
            if callable(method):
                method(trainer, self, *args)

    def _log_batch(self, results: list[GenerationResult], batch_idx: int) -> None:
        """Per-batch summary to the loggers (``self.log`` is not allowed in predict)."""
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        rewards = torch.tensor([r.reward for r in results], dtype=torch.float64)
        metrics = {
            "predict/reward_mean": float(rewards.nanmean()),
            "predict/tokens_generated": sum(r.stats.tokens_generated for r in results),
            "predict/generation_seconds": sum(r.stats.generation_seconds for r in results),
            "predict/reward_seconds": sum(r.stats.reward_seconds for r in results),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch_idx)


class _Status:
    """The status of the batch being decoded, on the progress bar or, without a live bar, in the log.

    On a bar it is repainted at most 4 times a second (and at every decision), as long a text as
    the terminal's line holds. Without one (no bar, or output to a file or CI log) each decision
    logs a line, and so does decoding at least every ``LOG_EVERY`` seconds, so that minutes of
    decoding are never silent and a log does not fill with repaints.
    """

    SHOW_EVERY = 0.25
    LOG_EVERY = 30.0

    def __init__(self, trainer: Any, batch_idx: int, prompts: int):
        self.trainer, self.batch_idx, self.prompts = trainer, batch_idx, prompts
        self.start = self.shown = self.logged = time.perf_counter()
        self.tokens = 0

    def update(self, event: StepEvent) -> None:
        self.tokens += event.live_rows + event.ended_rows  # rows that sampled a token at this step
        now = time.perf_counter()
        if now - self.shown < self.SHOW_EVERY and not event.decision:
            return
        self.shown = now
        elapsed = now - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        if self.trainer is not None and show_status(self.trainer, self.texts(event, rate, elapsed)):
            return
        if event.decision:
            log.info(
                "batch %d: decision %d at %d tokens, %d rejected, %d rows live",
                self.batch_idx, event.round, event.step, event.rejected_rows, event.live_rows,
            )
        elif now - self.logged >= self.LOG_EVERY:
            log.info(
                "batch %d: %d tokens, %d rows live, round %d, %.0f tok/s, %.0f s",
                self.batch_idx, event.step, event.live_rows, event.round, rate, elapsed,
            )
        else:
            return
        self.logged = now

    @staticmethod
    def texts(event: StepEvent, rate: float, elapsed: float) -> list[str]:
        """The status from the longest to the shortest: the bar shows the longest its line holds."""
        tokens, live, round_ = event.step, event.live_rows, event.round
        return [
            f"{tokens} tokens · {live} live rows · round {round_} · {rate:.0f} tok/s · {elapsed:.0f}s",
            f"{tokens} tok · {live} live · r{round_} · {rate:.0f} tok/s",
            f"{tokens} tok · {live} live · r{round_}",
            f"{tokens} tok",
        ]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _context_length(config: Any) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
