"""The ``lightning-sr`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Model and data are chosen by class path in the YAML (subclass mode), so any LightningModule or
DataModule works, ours or a user's::

    lightning-sr predict --config configs/predict_sr.yaml --model.generator=path/to/model
    lightning-sr fit --config configs/fit_dpo_ondare.yaml

Optimizers are injected through each module's ``optimizer`` argument
(``auto_configure_optimizers=False``), and callback sets compose from files:
``--trainer.callbacks+=callbacks/memory.yaml``.
"""

from __future__ import annotations

import logging

from pytorch_lightning.cli import LightningCLI


def main(args=None) -> LightningCLI:
    logging.getLogger("lightning_sr").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run() -> None:
    """Console-script entry: runs the CLI and exits 0 on success (``main`` returns the CLI)."""
    main()


if __name__ == "__main__":
    run()
