"""The ``lightning-sr`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Model and data are chosen by class path in the YAML (subclass mode), so any LightningModule or
DataModule works, ours or a project's own; our classes also resolve by short name
(``--model=SpeculativeRejectionModule``, ``--trainer.callbacks+=GPUMemoryProfiler``)::

    lightning-sr predict --config configs/predict_sr.yaml --model.init_args.generator=path/to/model
    lightning-sr fit --config configs/fit_dpo_ondare.yaml --trainer.callbacks+=lightning_sr:memory

Optimizers are either injected into the module (``--model.init_args.optimizer=...``) or given to
LightningCLI's own ``--optimizer`` (which replaces a module's ``configure_optimizers``). A shipped
callback list is named ``lightning_sr:<name>`` (see ``lightning_sr.callbacks.config_path``).

The CLI runs on the Lightning package its config's class paths name
(``pytorch_lightning.callbacks.ModelCheckpoint``: ``pytorch_lightning``; see
:mod:`lightning_sr.config_packages`), else on ``lightning`` when it is installed, else on
``pytorch_lightning``; ``LIGHTNING_SR_PACKAGE=pytorch_lightning`` chooses (see
:mod:`lightning_sr.lightning_packages`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
import traceback
import typing
import warnings
from argparse import ArgumentError
from typing import Any

from jsonargparse import ArgumentParser
from jsonargparse.typing import import_object
from typing_extensions import override

from lightning_sr._lazy import LIGHTNING_CLASSES
from lightning_sr.config_packages import choose_package
from lightning_sr.lightning_packages import (
    PACKAGE_ENV,
    LightningCLI,
    for_package,
    import_package,
    use_package,
    written_class,
)

CALLBACK_SHORTCUT = "lightning_sr:"
log = logging.getLogger(__name__)


class LightningSRCLI(LightningCLI):
    """LightningCLI that knows our classes by short name and our shipped callback lists.

    Before parsing it builds every class of ours for its Lightning package (so ``--help`` lists
    them and short names resolve), turns ``lightning_sr:<name>`` into the path of a shipped
    callback YAML, and keeps Lightning's adverts out of the output.

    ``before_predict``, ``after_predict`` and ``before_fit`` are not methods of LightningCLI (so
    they carry no ``@override``): LightningCLI looks them up by name around each subcommand.
    """

    @override
    def init_parser(self, **kwargs: Any):
        """LightningCLI's parser, after every class of ours is built for this CLI's package."""
        for name in LIGHTNING_CLASSES:
            if name != type(self).__name__:
                for_package(written_class(name), self._lightning_package)
        importlib.import_module("lightning_sr.optim")  # OnDARE, OnTIES by short name
        return super().init_parser(**kwargs)

    def before_predict(self) -> None:
        """Writers keep their summaries for ``after_predict`` instead of printing them; a resumed
        run with nothing left says so and skips the predict, before any model loads (the module
        loads its models inside ``trainer.predict``)."""
        for writer in self._prediction_writers():
            writer.print_summary = False  # after_predict prints it, once the progress bar is done
        self._nothing_left = self._nothing_left_to_do()
        if self._nothing_left:
            print(self._nothing_left)

    def predict(self, **kwargs: Any) -> Any:
        """``trainer.predict``, unless ``before_predict`` found nothing left to do (LightningCLI
        runs a method of the subcommand's name in place of the Trainer's)."""
        if not getattr(self, "_nothing_left", None):
            return self.trainer.predict(**kwargs)
        return None

    def after_predict(self) -> None:
        """The writers' summaries last, so that they are the run's final lines; then a run that
        wrote nothing, or only NaN rewards, ends with why and exit status 1 (its files are closed
        and merged by then: nothing written is lost)."""
        writers = self._prediction_writers()
        for writer in writers:
            if writer.summary:
                print(writer.summary)
        problems = dict.fromkeys(writer.problem for writer in writers if writer.problem)
        if problems:
            raise SystemExit("\n".join(f"lightning-sr: {problem}" for problem in problems))

    def _prediction_writers(self) -> list:
        writer = written_class("JSONLPredictionWriter")  # of any package: the written class
        return [callback for callback in self.trainer.callbacks if isinstance(callback, writer)]

    def _nothing_left_to_do(self) -> str | None:
        """What to print when a resumed run has nothing left, or None when it has work to do.

        Asks a :class:`~lightning_sr.data.PromptDataModule` for the batches its ``completed`` file
        does not hold yet; a writer with ``resume: false`` on that file starts afresh, so it has work.
        """
        data = self.datamodule
        if not isinstance(data, written_class("PromptDataModule")) or not data.completed:
            return None
        completed = os.path.realpath(data.completed)
        if any(not w.resume and os.path.realpath(w.output_path) == completed for w in self._prediction_writers()):
            return None
        if data.remaining():
            return None
        return (
            f"Nothing left to do: all {len(data.prompts)} prompts are already in {data.completed}; "
            "no model was loaded.\nTo run them again, delete that file, or add --trainer.callbacks.resume=false "
            "(before any --trainer.callbacks+=; the file is then kept as a .bak)."
        )

    def before_fit(self) -> None:
        """Say up front when a short run will validate or checkpoint nothing, and why."""
        trainer, steps = self.trainer, self.trainer.max_steps
        interval = trainer.val_check_interval
        if steps > 0 and isinstance(interval, int) and interval > steps:
            log.warning("No validation will run: val_check_interval=%d > max_steps=%d", interval, steps)
        for callback in trainer.checkpoint_callbacks:
            every = getattr(callback, "_every_n_train_steps", 0)
            if steps > 0 and every > steps:
                written = "Only last.ckpt, at the end of the run," if getattr(callback, "save_last", False) else "No checkpoint"
                log.warning("%s will be written: every_n_train_steps=%d > max_steps=%d", written, every, steps)

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Expand ``lightning_sr:<name>`` shortcuts and answer ``--model.<argument>.help``, then parse."""
        if args is None:  # the command line: expanded in place, as LightningCLI reads it from there
            sys.argv[1:] = [_expand_shortcut(arg) for arg in sys.argv[1:]]
        elif isinstance(args, (list, tuple)):
            args = [_expand_shortcut(arg) for arg in args]
        _nested_help(parser, sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)


_NESTED_HELP = re.compile(r"--(model|data)\.(?:init_args\.)?(\w+)\.help(?:=(.*))?")


def _nested_help(parser: Any, args: Any) -> None:
    """``--model.<argument>.help [CLASS]``: the help of one init argument's class, then exit.

    jsonargparse lists these options for a subclass-mode ``--model`` but cannot route them, so
    they are answered here from the model (or data) class the other arguments choose.
    """
    if not isinstance(args, (list, tuple)):
        return
    for position, arg in enumerate(args):
        found = _NESTED_HELP.fullmatch(arg)
        if not found:
            continue
        key, name, chosen = found.groups()
        rest = list(args[:position]) + list(args[position + 1 :])
        if chosen is None and position + 1 < len(args) and not args[position + 1].startswith("-"):
            chosen, rest = args[position + 1], list(args[:position]) + list(args[position + 2 :])
        config = parser.parse_args(rest)
        section = config.get(config.get("subcommand") or "", config)
        owner = import_object(section[key]["class_path"])
        hint = inspect.signature(owner).parameters[name].annotation
        hint = typing.get_type_hints(owner.__init__).get(name, hint)
        target = import_object(chosen) if chosen else next(
            (t for t in typing.get_args(hint) or (hint,) if inspect.isclass(t) and t is not type(None)), None
        )
        if target is None:
            raise SystemExit(f"--{key}.{name} of {owner.__name__} is not a class; it has no options of its own")
        helper = ArgumentParser(prog=f"{parser.prog} --{key}.{name}")
        helper.add_class_arguments(target, f"{key}.{name}")
        helper.print_help()
        raise SystemExit(0)


def _expand_shortcut(arg: str) -> str:
    """``lightning_sr:memory`` (alone or after ``=``) → the shipped YAML's path."""
    head, sep, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
    if value.startswith(CALLBACK_SHORTCUT):
        from lightning_sr.callbacks import config_path

        value = str(config_path(value[len(CALLBACK_SHORTCUT) :]))
    return f"{head}{sep}{value}"


def warn_inherited_init_args() -> None:
    """Say which init args a class keeps when YAML or the command line switches its class_path.

    jsonargparse carries an earlier class's init args over to a newly chosen class when the new
    class has arguments of the same name (switching AdamW to OnDARE keeps AdamW's
    ``weight_decay``); the values that differ from the new class's own defaults are named in a
    warning. Wraps a jsonargparse internal; without it nothing is said.
    """
    from jsonargparse import _typehints

    original = getattr(_typehints, "discard_init_args_on_class_path_change", None)
    if original is None or getattr(original, "_lightning_sr", False):
        return

    def discard_and_warn(parser_or_action: Any, prev_val: Any, value: Any) -> None:
        original(parser_or_action, prev_val, value)
        kept = prev_val.get("init_args") if prev_val and prev_val.get("class_path") != value.get("class_path") else None
        if not kept:
            return
        try:
            given = dict(value.get("init_args") or {})
            defaults = {k: p.default for k, p in inspect.signature(import_object(value["class_path"])).parameters.items()}
        except Exception:  # a class that cannot be inspected: say nothing rather than fail the parse
            return
        inherited = {k: v for k, v in dict(kept).items() if k not in given and defaults.get(k, v) != v}
        if inherited:
            log.warning(
                "%s keeps %s from %s, set before it was chosen (its own defaults differ); "
                "set them explicitly to silence this", value["class_path"], inherited, prev_val["class_path"],
            )

    discard_and_warn._lightning_sr = True
    _typehints.discard_init_args_on_class_path_change = discard_and_warn


def quiet_lightning() -> None:
    """Keep third-party adverts and deprecation noise out of our entry points' output."""
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logger = logging.getLogger(name)
        logger.addFilter(drop_tips)
        for handler in logger.handlers:
            handler.addFilter(drop_tips)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    # a resumed predict with nothing left: our data module already said so in words
    warnings.filterwarnings("ignore", message="Total length of `DataLoader` across ranks is zero", category=UserWarning)
    warnings.filterwarnings("ignore", category=Warning, module="jsonargparse")
    # torch's distributed checkpoint replacing last.ckpt of a sharded run, which is what we ask of it
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in", category=UserWarning)


def drop_tips(record: logging.LogRecord) -> bool:
    """A logging filter that drops Lightning's "💡 Tip" adverts."""
    return not str(record.getMessage()).startswith("💡")


USER_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError, ArgumentError)
"""What bad input raises: reported in a few lines, not as a traceback (``--verbose`` shows it)."""


def main(args: list[str] | dict | None = None, **kwargs: Any):
    """Run the CLI (``args`` as for LightningCLI; None reads the command line) and return it.

    Bad input (an invalid option value, a missing file, a model that cannot be found) ends with a
    short message naming it and exit status 1; ``--verbose`` anywhere on the command line, or
    ``LIGHTNING_SR_VERBOSE=1``, shows the full traceback instead.
    """
    command_line = sys.argv if args is None else args
    verbose = os.environ.get("LIGHTNING_SR_VERBOSE", "") not in ("", "0")
    if isinstance(command_line, list) and "--verbose" in command_line:
        command_line.remove("--verbose")
        verbose = True
    warn_inherited_init_args()
    defaults = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        args=args,
    )
    package = None
    try:
        package = choose_package(command_line[1:] if args is None else args)
        use_package(package)
        import_package(package)
        quiet_lightning()  # after the import: Lightning sets up its log handlers then
        return for_package(LightningSRCLI, package)(**{**defaults, **kwargs})
    except USER_ERRORS as error:
        if verbose:
            raise
        message = short_message(error)
        if package and "does not correspond to a subclass of" in message:  # a class of the other Lightning package
            message += f"\n(lightning-sr runs on {package}; {PACKAGE_ENV}=<lightning|pytorch_lightning> chooses)"
        raise SystemExit(f"lightning-sr: {message}\n(the whole story: add --verbose)") from None


def short_message(error: BaseException) -> str:
    """The message that names the problem, out of jsonargparse's wrapping of it.

    jsonargparse wraps an error raised while parsing or building a class in several layers
    ("Does not validate against any of the Union subtypes ... Given value: Namespace(...)"); the
    innermost error raised by our own code, else the innermost one, says what is wrong.
    """
    chain = []
    while error is not None and error not in chain:
        chain.append(error)  # ``raise ... from None`` ends the chain: its message already says it all
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    ours = [e for e in chain if _raised_in(e, "lightning_sr")]
    named = [e for prefix in ("Problem with given class_path", 'Parser key "') for e in chain if str(e).startswith(prefix)]
    chosen = ours[-1] if ours else named[0] if named else chain[-1]
    lines = [line for line in str(chosen).splitlines() if not line.lstrip().startswith(("Given value", "Subtypes:"))]
    return "\n".join(lines[:8]) or type(chosen).__name__


def _raised_in(error: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def run() -> None:
    """Console-script entry: runs the CLI and exits 0 on success (``main`` returns the CLI)."""
    main()


if __name__ == "__main__":
    run()
