"""SpeculativeRejectionModule: speculative rejection (or Best-of-N) as a drop-in ``predict_step``."""

from __future__ import annotations

import logging
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from lightning_sr.generation import (
    FixedSchedule,
    MemorySchedule,
    SamplingParams,
    StepEvent,
    best_of_n,
    speculative_rejection,
)
from lightning_sr.rewards import HFRewardModel, RewardModel

log = logging.getLogger(__name__)


class SpeculativeRejectionModule(pl.LightningModule):
    """Generates the best response per prompt with a generator and a reward model.

    ``predict_step`` takes a batch of ``{"id", "prompt"}`` items (as produced by
    :class:`~lightning_sr.data.PromptDataModule`) and returns one dict per prompt: ``id``,
    ``prompt``, ``response``, ``reward``, ``stats`` (and ``candidates`` with
    ``return_candidates=True``). Every prompt of the batch decodes together.

    Models are loaded lazily in ``configure_model`` (not at import or construction), moved to the
    trainer's device by Lightning, and kept in eval mode without gradients. Callbacks that define
    ``on_generation_step(trainer, pl_module, event)`` receive every decoding step's
    :class:`~lightning_sr.generation.StepEvent`, and ``on_generation_end(trainer, pl_module,
    results)`` each batch's results (the memory profiler uses both).

    Args:
        generator: hub id, local path or embedded default name of a causal LM, or a model object.
        reward_model: hub id / local path / default name of a sequence classifier (scalar
            output), or a :class:`~lightning_sr.rewards.RewardModel` object.
        n: samples per prompt, or ``"auto"`` (as many as the memory schedule's budget allows).
        alpha: rejection rate at each decision point, in [0, 1).
        schedule: ``MemorySchedule`` (default: free CUDA memory; explicit budget on CPU) or
            ``FixedSchedule(lengths=[...])``.
        sampling: ``SamplingParams`` (temperature, top_k, top_p, max_new_tokens, stop_token_ids).
        seed: sampling seed; each batch uses ``seed + batch_idx`` and each process adds its rank.
        method: ``"speculative_rejection"`` or ``"best_of_n"`` (same engine, no rejection).
        chat_template: apply the generator's chat template to prompts when it has one.
        dtype: generator and reward model precision when loaded by name (``"float32"``,
            ``"bfloat16"``, ``"float16"``, or ``"auto"`` for the checkpoint's own).
        tokenizer: the generator's tokenizer (object or name) when ``generator`` is an object.
        return_candidates: also return every candidate with its reward.
    """

    def __init__(
        self,
        generator: Any = "smollm2-135m-instruct",
        reward_model: Any = "minilm-positivity",
        n: int | Literal["auto"] = 8,
        alpha: float = 0.5,
        schedule: MemorySchedule | FixedSchedule | None = None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        method: Literal["speculative_rejection", "best_of_n"] = "speculative_rejection",
        chat_template: bool = True,
        dtype: str = "float32",
        tokenizer: Any = None,
        return_candidates: bool = False,
    ):
        super().__init__()
        if method not in ("speculative_rejection", "best_of_n"):
            raise ValueError(f"method must be 'speculative_rejection' or 'best_of_n', got {method!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if method == "best_of_n" and n == "auto":
            raise ValueError("method='best_of_n' needs an explicit n")
        objects = {"generator": generator, "reward_model": reward_model, "tokenizer": tokenizer}
        self.save_hyperparameters(ignore=[name for name, value in objects.items() if not isinstance(value, (str, type(None)))])
        # A plain dict, so that model objects given here are not registered as submodules.
        self._sources = {"generator": generator, "reward_model": reward_model, "tokenizer": tokenizer}
        self.n, self.alpha, self.seed, self.method = n, alpha, seed, method
        self.schedule = schedule
        self.sampling = sampling or SamplingParams()
        self.chat_template, self.dtype_name = chat_template, dtype
        self.return_candidates = return_candidates
        self.generator: torch.nn.Module | None = None
        self.tokenizer = None
        self.reward: RewardModel | None = None

    def configure_model(self) -> None:
        """Load the generator, its tokenizer and the reward model (once)."""
        if self.generator is not None:
            return
        from lightning_sr.loading import load_causal_lm, load_tokenizer

        source, tokenizer = self._sources["generator"], self._sources["tokenizer"]
        if isinstance(source, str):
            tokenizer = tokenizer or source
        elif tokenizer is None:
            raise ValueError("SpeculativeRejectionModule needs `tokenizer` when `generator` is a model object")
        generator = load_causal_lm(source, self.dtype_name)
        tokenizer = load_tokenizer(tokenizer)
        self.generator = generator.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        reward = self._sources["reward_model"]
        if isinstance(reward, str):
            reward = HFRewardModel(reward, dtype=self.dtype_name)
        if not hasattr(reward, "score"):
            raise TypeError(f"reward_model must be a name, a path or a RewardModel, got {type(reward).__name__}")
        self.reward = reward

    def on_predict_start(self) -> None:
        self.configure_model()
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)

    def predict_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        if not batch:  # every prompt of the batch was already written (resumed run)
            return []
        prompts = [item["prompt"] for item in batch]
        common = dict(
            n=self.n,
            sampling=self.sampling,
            seed=self.seed + batch_idx + 1_000_003 * self.global_rank,
            observer=self._observer(batch_idx),
            chat_template=self.chat_template,
        )
        if self.method == "best_of_n":
            results = best_of_n(self.generator, self.tokenizer, self.reward, prompts, **common)
        else:
            schedule = self.schedule if self.schedule is not None else MemorySchedule()
            results = speculative_rejection(
                self.generator, self.tokenizer, self.reward, prompts, alpha=self.alpha, schedule=schedule, **common
            )
        self._callback_hook("on_generation_end", results)
        self._log_batch(results, batch_idx)
        outputs = []
        for item, result in zip(batch, results):
            output = {
                "id": item["id"],
                "prompt": result.prompt,
                "response": result.response,
                "reward": result.reward,
                "stats": result.stats.to_dict(),
            }
            if self.return_candidates:
                output["candidates"] = [candidate.to_dict() for candidate in result.candidates]
            outputs.append(output)
        return outputs

    def _observer(self, batch_idx: int):
        def observe(event: StepEvent) -> None:
            self._callback_hook("on_generation_step", event)
            self._show_progress(event, batch_idx)

        return observe

    def _callback_hook(self, name: str, *args) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        for callback in trainer.callbacks:
            hook = getattr(callback, name, None)
            if callable(hook):
                hook(trainer, self, *args)

    def _show_progress(self, event: StepEvent, batch_idx: int) -> None:
        """Where a long generation is: on the progress bar, plus a log line per decision."""
        status = {"round": event.round, "live": event.live_rows, "tokens": event.step}
        bar = getattr(self._trainer, "progress_bar_callback", None) if self._trainer else None
        predict_bar = getattr(bar, "predict_progress_bar", None)
        if predict_bar is not None and hasattr(predict_bar, "set_postfix"):
            predict_bar.set_postfix(status, refresh=False)
        if event.decision:
            log.info(
                "batch %d: decision %d at %d tokens, %d rejected, %d rows live",
                batch_idx, event.round, event.step, event.rejected_rows, event.live_rows,
            )

    def _log_batch(self, results, batch_idx: int) -> None:
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

