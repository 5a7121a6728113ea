"""The ``lightning-sr`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Model and data are chosen by class path in the YAML (subclass mode), so any LightningModule or
DataModule works, ours or a project's own; our classes also resolve by short name
(``--model=SpeculativeRejectionModule``, ``--trainer.callbacks+=GPUMemoryProfiler``)::

    lightning-sr predict --config configs/predict_sr.yaml --model.init_args.generator=path/to/model
    lightning-sr fit --config configs/fit_dpo_ondare.yaml --trainer.callbacks+=lightning_sr:memory

Optimizers are either injected into the module (``--model.init_args.optimizer=...``) or given to
LightningCLI's own ``--optimizer`` (which replaces a module's ``configure_optimizers``). A shipped
callback list is named ``lightning_sr:<name>`` (see ``lightning_sr.callbacks.config_path``).

The CLI runs on ``lightning`` when it is installed, else on ``pytorch_lightning``; set
``LIGHTNING_SR_PACKAGE=pytorch_lightning`` to choose (see :mod:`lightning_sr.lightning_packages`).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

from lightning_sr._lazy import LIGHTNING_CLASSES
from lightning_sr.lightning_packages import LightningCLI, active_package, for_package

CALLBACK_SHORTCUT = "lightning_sr:"


class LightningSRCLI(LightningCLI):
    """LightningCLI that knows our classes by short name and our shipped callback lists.

    Before parsing it builds every class of ours for its Lightning package (so ``--help`` lists
    them and short names resolve), turns ``lightning_sr:<name>`` into the path of a shipped
    callback YAML, and keeps Lightning's adverts out of the output.
    """

    def init_parser(self, **kwargs: Any):
        for name, module in LIGHTNING_CLASSES.items():
            if name != type(self).__name__:
                for_package(getattr(importlib.import_module(module), name), self._lightning_package)
        importlib.import_module("lightning_sr.optim")  # OnDARE, OnTIES by short name
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = [_expand_shortcut(arg) for arg in (sys.argv[1:] if args is None else args)]
        super().parse_arguments(parser, args)


def _expand_shortcut(arg: str) -> str:
    """``lightning_sr:memory`` (alone or after ``=``) → the shipped YAML's path."""
    head, sep, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
    if value.startswith(CALLBACK_SHORTCUT):
        from lightning_sr.callbacks import config_path

        value = str(config_path(value[len(CALLBACK_SHORTCUT) :]))
    return f"{head}{sep}{value}"


def quiet_lightning() -> None:
    """Keep third-party adverts and deprecation noise out of our entry points' output."""
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logger = logging.getLogger(name)
        logger.addFilter(_drop_tips)
        for handler in logger.handlers:
            handler.addFilter(_drop_tips)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


def _drop_tips(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith("💡")


def main(args: list[str] | dict | None = None, **kwargs: Any):
    """Run the CLI (``args`` as for LightningCLI; None reads the command line) and return it."""
    quiet_lightning()
    defaults = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    return for_package(LightningSRCLI, active_package())(**{**defaults, **kwargs})


def run() -> None:
    """Console-script entry: runs the CLI and exits 0 on success (``main`` returns the CLI)."""
    main()


if __name__ == "__main__":
    run()
