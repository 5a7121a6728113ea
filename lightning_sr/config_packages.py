"""Which Lightning package a ``lightning-sr`` command line and its config files are written for.

With both ``lightning`` and ``pytorch_lightning`` installed, one run can use only one of them: a
Trainer of one refuses the other's callbacks, and each LightningCLI rejects the other's class
paths (``Import path pytorch_lightning.callbacks.ModelCheckpoint does not correspond to a subclass
of Callback``). So the command reads the class paths its arguments and config files name
(``pytorch_lightning.callbacks.ModelCheckpoint``, ``lightning.pytorch.loggers.CSVLogger``,
``lightning_sr.pytorch_lightning.JSONLPredictionWriter``, ...) and runs on the package they name
(:func:`choose_package`). A config that names both, or names the other package than
``$LIGHTNING_SR_PACKAGE``, or one that is not installed, stops before anything is built with one
line saying where, which package runs and how to choose. Short names (``ModelCheckpoint``) and our
own class paths name no package: they follow the one that runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lightning_sr.lightning_packages import PACKAGE_ENV, PACKAGES, active_package, installed_packages

_CLASS_PATH = re.compile(  # modules, then a class: not a file such as lightning.yaml
    r"(?<![\w./\\-])(?:lightning_sr\.)?(pytorch_lightning|lightning_fabric|lightning)\.(?:[a-z_]\w*\.)*[A-Z]\w*"
)
_PACKAGE_OF = {"pytorch_lightning": "pytorch_lightning", "lightning_fabric": "pytorch_lightning", "lightning": "lightning"}
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Named:
    """One class path of a Lightning package, and where it was written."""

    package: str  # as in $LIGHTNING_SR_PACKAGE
    class_path: str
    where: str  # "file:line", or "the command line"

    def __str__(self) -> str:
        return f"{self.class_path} ({self.where})"


def packages_named(args: list[str] | dict | None) -> list[Named]:
    """Every Lightning class path in ``args`` (a command line, or LightningCLI's ``args`` dict) and
    in the config files it names, in order; comments in the files are skipped."""
    return [named for text, where in _texts(args) for named in _class_paths(text, where)]


def choose_package(args: list[str] | dict | None) -> str:
    """The package this command runs on: the one its class paths name, else :func:`active_package`.

    Raises ValueError, naming the class paths and how to choose, when they name both packages, the
    other package than ``$LIGHTNING_SR_PACKAGE``, or a package that is not installed.
    """
    named = packages_named(args)
    first = {}
    for item in named:
        first.setdefault(item.package, item)
    if len(first) > 1:
        raise ValueError(
            f"the config names classes of both Lightning packages, {first['lightning']} and "
            f"{first['pytorch_lightning']}: one run uses one package; write every class path for "
            "one of them (or use the short name, e.g. ModelCheckpoint)"
        )
    if not first:
        return active_package()
    package, item = next(iter(first.items()))
    chosen = os.environ.get(PACKAGE_ENV)
    if chosen and chosen != package:
        raise ValueError(
            f"{item} is a {package} class but ${PACKAGE_ENV}={chosen} runs lightning-sr on {chosen}: "
            f"unset {PACKAGE_ENV}, or write the class path for {PACKAGES[chosen]}"
        )
    if package not in installed_packages():
        other = next(iter(set(PACKAGES) - {package}))
        raise ValueError(
            f"{item} is a {package} class, but {package} is not installed: "
            f"pip install {package.replace('_', '-')}, or write the class path for {PACKAGES[other]}"
        )
    return package


def _texts(args: Any) -> Iterator[tuple[str, str]]:
    """``(text, where)`` of each argument, and each line of each config file it names."""
    if args is None:
        import sys

        args = sys.argv[1:]
    for value in _strings(args):
        path = Path(value.rpartition("=")[2])
        if path.suffix in _CONFIG_SUFFIXES and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                yield line.split(" #")[0] if not line.lstrip().startswith("#") else "", f"{path}:{number}"
        else:
            yield value, "the command line"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _class_paths(text: str, where: str) -> Iterator[Named]:
    for found in _CLASS_PATH.finditer(text):
        yield Named(_PACKAGE_OF[found.group(1)], found.group(0), where)
