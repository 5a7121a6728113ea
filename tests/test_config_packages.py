"""With both Lightning packages installed, ``lightning-sr`` runs a config on the package it names."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from lightning_sr.config_packages import packages_named
from lightning_sr.lightning_packages import PACKAGE_ENV

BUILD = """
import sys
{block}
from lightning_sr.cli import main
cli = main(["--config", sys.argv[1]], run=False, save_config_callback=None)
callbacks = [type(c).__mro__[1].__module__.split(".")[0] for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
print(type(cli.trainer).__module__.split(".")[0], type(cli.model).__module__, callbacks[0])
"""


def run_cli(tmp_path, checkpoint_class: str, env: dict | None = None, block: str | None = None):
    """Build (not run) the CLI in a fresh process on a config naming ``checkpoint_class``."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_sr.PreferenceModule", "init_args": {"policy": "x"}},
        "data": {"class_path": "lightning_sr.data.PreferenceDataModule", "init_args": {"path": "x", "tokenizer": "x"}},
        "trainer": {"callbacks": [{"class_path": checkpoint_class}], "logger": False, "accelerator": "cpu",
                    "default_root_dir": str(tmp_path)},
    }))  # fmt: skip
    blocked = f"sys.modules[{block!r}] = None  # as if it were not installed" if block else ""
    environment = {k: v for k, v in os.environ.items() if k != PACKAGE_ENV}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BUILD.format(block=blocked)), str(config)],
        capture_output=True, text=True, env={**environment, **(env or {})}, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "class_path, package",
    [("pytorch_lightning.callbacks.ModelCheckpoint", "pytorch_lightning"),
     ("lightning.pytorch.callbacks.ModelCheckpoint", "lightning")],
)  # fmt: skip
def test_a_config_runs_on_the_package_it_names(tmp_path, class_path, package):
    done = run_cli(tmp_path, class_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [package, f"lightning_sr.{package}", package]


def test_the_other_package_than_the_environment_variable_stops_in_one_line(tmp_path):
    done = run_cli(tmp_path, "lightning.pytorch.callbacks.ModelCheckpoint", env={PACKAGE_ENV: "pytorch_lightning"})
    assert done.returncode == 1
    first, hint = done.stderr.strip().splitlines()[-2:]
    assert first.startswith("lightning-sr: lightning.pytorch.callbacks.ModelCheckpoint (")
    assert f"config.yaml:{config_line(tmp_path, 'ModelCheckpoint')})" in first
    assert f"${PACKAGE_ENV}=pytorch_lightning runs lightning-sr on pytorch_lightning" in first
    assert hint == "(the whole story: add --verbose)"


def test_a_package_that_is_not_installed_is_named(tmp_path):
    done = run_cli(tmp_path, "pytorch_lightning.callbacks.ModelCheckpoint", block="pytorch_lightning")
    assert done.returncode == 1
    assert "but pytorch_lightning is not installed: pip install pytorch-lightning" in done.stderr


def test_both_packages_in_one_config_stop_before_anything_is_built(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  logger:\n    class_path: pytorch_lightning.loggers.CSVLogger\n")
    config = tmp_path / "main.yaml"
    config.write_text("# comments naming lightning.pytorch.Trainer are not class paths\ntrainer:\n"
                      "  callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint}]\n")  # fmt: skip
    from lightning_sr.config_packages import choose_package

    with pytest.raises(ValueError) as error:
        choose_package(["fit", f"--config={config}", "--config", str(extra)])
    message = str(error.value)
    assert f"lightning.pytorch.callbacks.ModelCheckpoint ({config}:3)" in message
    assert f"pytorch_lightning.loggers.CSVLogger ({extra}:3)" in message and "\n" not in message


def test_class_paths_are_found_where_users_write_them(tmp_path):
    args = ["predict", "--trainer.callbacks+=lightning_sr.pytorch_lightning.JSONLPredictionWriter",
            "--ckpt_path=lightning_logs/version_0/last.ckpt", "--config=x/lightning.yaml",
            "--trainer.plugins=lightning_fabric.plugins.environments.SLURMEnvironment",
            "--model=lightning_sr.SpeculativeRejectionModule", "--trainer.callbacks+=ModelCheckpoint"]  # fmt: skip
    assert [(n.package, n.class_path) for n in packages_named(args)] == [
        ("pytorch_lightning", "lightning_sr.pytorch_lightning.JSONLPredictionWriter"),
        ("pytorch_lightning", "lightning_fabric.plugins.environments.SLURMEnvironment"),
    ]
    assert [n.package for n in packages_named({"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger"}}})] == ["lightning"]


def config_line(tmp_path, text: str) -> int:
    lines = (tmp_path / "config.yaml").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)
