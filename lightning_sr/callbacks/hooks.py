"""The hooks :class:`~lightning_sr.SpeculativeRejectionModule` calls on callbacks during generation.

A batch of prompts decodes inside one ``predict_step``, so Lightning's own hooks only see it start
and end. A callback that defines any of these methods (it need not subclass anything) is called
by the module: ``on_generation_step`` once per decoding step with the engine's
:class:`~lightning_sr.generation.StepEvent` (live rows, sequence length, KV-cache bytes, whether a
rejection happened), ``on_generation_end`` once per batch with its results. The memory profiler
draws the paper's Figure 1 from the steps.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lightning_sr.generation import GenerationResult, StepEvent


@runtime_checkable
class GenerationHooks(Protocol):
    """Callback methods called during ``SpeculativeRejectionModule.predict_step`` (each optional)."""

    def on_generation_step(self, trainer: Any, pl_module: Any, event: StepEvent) -> None:
        """After every decoding step of the batch being generated."""

    def on_generation_end(self, trainer: Any, pl_module: Any, results: list[GenerationResult]) -> None:
        """After the batch's responses are chosen, before ``predict_step`` returns."""
