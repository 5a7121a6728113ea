"""Our Lightning classes, written once, built for the Lightning package a program uses.

Lightning ships as two packages with separate class hierarchies: the unified ``lightning``
(``lightning.pytorch``, what most LightningCLI projects import) and ``pytorch_lightning``. A
Trainer of one refuses the other's LightningModule, Callback or LightningDataModule, and each
LightningCLI rejects the other's class paths. So every Lightning class of ours is written once on
a *stand-in* base from this module (:class:`LightningModule`, :class:`LightningDataModule`,
:class:`Callback`, :class:`BasePredictionWriter`, :class:`LightningCLI`,
:class:`ModelParallelStrategy`) and built on demand as a
subclass of that base's real class in one package by :func:`for_package`.

Why not one class deriving from both packages' bases: Lightning decides which hooks a class
implements by comparing code objects (``is_overridden``), so a class with both bases looks to one
of the two Trainers as if it overrode every hook (``configure_sharded_model`` and
``configure_model`` together are an error), and defining it would import both packages. Why not
``lightning_utilities``' pick-one-at-import helpers: with both packages installed they always pick
the same one, whatever the program imports.

Which package a class is built for:

1. ``$LIGHTNING_SR_PACKAGE`` (``lightning`` or ``pytorch_lightning``) when set;
2. else the package chosen with :func:`use_package` (the ``lightning-sr`` command chooses the one
   it runs on);
3. else the package the program imported (if it imported both, the first one, with a warning);
4. else ``lightning`` if it is installed, else ``pytorch_lightning``.

The public names (``lightning_sr.SpeculativeRejectionModule``, ``lightning_sr.callbacks.*``, ...)
and the full class paths in the defining modules
(``lightning_sr.modules.generation.SpeculativeRejectionModule``,
``lightning_sr.callbacks.predictions.JSONLPredictionWriter``, ...) resolve by that rule when they
are looked up, so any class path of ours in a project's own LightningCLI gets the class of that
project's package, and in a process that uses both packages the same path gives each package's
class while that package is active. ``lightning_sr.lightning.<Name>`` and
``lightning_sr.pytorch_lightning.<Name>`` name one package's class explicitly.

How a full class path resolves: when a public class of ours (``_lazy.LIGHTNING_CLASSES``) is
written, its defining module becomes a :class:`_DefiningModule`, whose attribute lookups
(``getattr``, ``from ... import``, jsonargparse's ``import_object``, pickle's check) resolve the
class; the module's own code reads its globals, which keep the written class, and
:func:`written_class` gives it to other code of ours (the explicit names, the CLI). Built classes
keep their ``__module__`` (``lightning_sr.lightning``, ``lightning_sr.pytorch_lightning``), so the
class paths written in saved configs and checkpoint hyperparameters do not change. Pickle, which
checks ``getattr(module, qualname) is cls``, saves a written class through a :mod:`copyreg`
reducer (by :func:`written_class`) and an instance by its written class and package
(``__reduce_ex__``). Base classes written to be subclassed (the stand-ins here,
``lightning_sr.data.exchanges.ExchangeDataModule``) do not resolve: our subclasses and a
project's are written on them for both packages.

Which names are subclasses of a package's base: ``issubclass(C, lightning.pytorch.LightningModule)``
is decided by ``C.__mro__`` alone (the real bases' metaclass is plain ``type``: no
``__subclasscheck__`` to answer otherwise, no ABC ``register``), and a class's MRO is fixed when its
``class`` statement runs. So every name above is, once the package is known, a subclass of its
package's base; the written class is a subclass of neither, and so is a name looked up before any
Lightning package is chosen (an import at the top of a program, before its own ``import
pytorch_lightning``): that is the written class, which builds the right one when it is
instantiated. An instance is always of the built class (``isinstance`` holds). A name, once bound,
keeps the class it got: code that runs under both packages looks our classes up when it uses them,
or binds them before any Lightning package (as the test suite's imports do) and so keeps the
written class. The written class cannot be a subclass at import without being built for one
package when it is defined: that would choose before a program's own later ``import
pytorch_lightning`` (isort order puts ours first), and would fix one package for a process that
runs both (the test suite does).
"""

from __future__ import annotations

import copyreg
import importlib
import os
import sys
import warnings
from importlib.util import find_spec
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from typing_extensions import override

from lightning_sr._lazy import LIGHTNING_CLASSES

PACKAGES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}
"""Our name of each Lightning package (as in ``$LIGHTNING_SR_PACKAGE``) and its module."""
PACKAGE_ENV = "LIGHTNING_SR_PACKAGE"

_BUILT: dict[tuple[type, str], type] = {}
_IMPORTED_HERE: set[str] = set()  # packages this module imported (not the program)
_CHOSEN: list[str] = []  # set by use_package
_WARNED_BOTH = False


class _DefiningModule(ModuleType):
    """The module that writes a public Lightning class of ours (``lightning_sr.modules.generation``,
    ...). Looked up as its attribute (``getattr``, ``from ... import``, jsonargparse's class paths),
    the class is resolved (:func:`resolve`) like the public names; the module's own code reads its
    globals, which keep the written class."""

    @override
    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in LIGHTNING_CLASSES and _is_public_written(value):
            return resolve(value)
        return value


def _is_public_written(cls: Any) -> bool:
    """Whether ``cls`` is one of our public Lightning classes as written, in its defining module."""
    return (
        isinstance(cls, type)
        and getattr(cls, "_lightning_package", "") is None
        and LIGHTNING_CLASSES.get(cls.__qualname__) == cls.__module__
    )


def written_class(name: str) -> type:
    """Our public Lightning class ``name`` as written, built for no package: what its defining
    module's own code sees (the module's attribute is resolved, see :class:`_DefiningModule`)."""
    return vars(importlib.import_module(LIGHTNING_CLASSES[name]))[name]


if TYPE_CHECKING:  # type checkers and IDEs see the unified package's classes
    from lightning.pytorch import Callback, LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import BasePredictionWriter
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import ModelParallelStrategy
else:

    class _BuildsOnDemand(type):
        """Class attributes a written class lacks (``load_from_checkpoint``, ...) come from the
        class built for the active package."""

        def __getattr__(cls, name: str) -> Any:
            if name.startswith("__") or cls._lightning_package is not None:
                raise AttributeError(name)
            return getattr(for_package(cls, active_package()), name)

    class _StandIn(metaclass=_BuildsOnDemand):
        """Base of a class written once; instantiating it builds it for the active package."""

        _real_base = ""  # where the real base lives inside a Lightning package
        _lightning_package = None  # the package a built class is built for

        @override
        def __new__(cls, *args: Any, **kwargs: Any):
            if cls._lightning_package is None:
                cls = for_package(cls, active_package())
            return super().__new__(cls)

        @override
        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            if _is_public_written(cls):
                module = sys.modules[cls.__module__]
                if not isinstance(module, _DefiningModule):
                    module.__class__ = _DefiningModule  # its attribute resolves, its globals do not

        @override
        def __reduce_ex__(self, protocol: int):
            """Pickle an instance by its written class and package, not by the built class's name
            (which a class written outside lightning-sr has nowhere to be found by): ``ddp_spawn``
            pickles the module and callbacks. The written class itself pickles as pickle saves a
            class, or, for ours, whose module attribute is the built class, by :func:`_reduce_class`."""
            reduced = super().__reduce_ex__(protocol)
            built = type(self)
            if built._lightning_package is None or not isinstance(reduced, tuple) or reduced[0] is not copyreg.__newobj__:
                return reduced
            _, (cls, *args), *rest = reduced
            return (_new_built, (built.__bases__[0], built._lightning_package, *args), *rest)

    class LightningModule(_StandIn):
        """Stand-in for ``LightningModule``."""

        _real_base = "LightningModule"

    class LightningDataModule(_StandIn):
        """Stand-in for ``LightningDataModule``."""

        _real_base = "LightningDataModule"

    class Callback(_StandIn):
        """Stand-in for ``Callback``."""

        _real_base = "Callback"

    class BasePredictionWriter(Callback):
        """Stand-in for ``callbacks.BasePredictionWriter``."""

        _real_base = "callbacks.BasePredictionWriter"

    class LightningCLI(_StandIn):
        """Stand-in for ``cli.LightningCLI``."""

        _real_base = "cli.LightningCLI"

    class ModelParallelStrategy(_StandIn):
        """Stand-in for ``strategies.ModelParallelStrategy``."""

        _real_base = "strategies.ModelParallelStrategy"

    def _reduce_class(cls: type) -> Any:
        """How pickle saves a class on a stand-in base (registered with :mod:`copyreg`): a public
        written class of ours by :func:`written_class` (pickle's own check, ``getattr(module,
        qualname) is cls``, fails for it: that attribute is the built class); any other one by
        reference, as pickle always does."""
        if _is_public_written(cls):
            return written_class, (cls.__qualname__,)
        return cls.__qualname__

    copyreg.pickle(_BuildsOnDemand, _reduce_class)


def _new_built(written: type, package: str, *args: Any) -> Any:
    """An empty instance of ``written`` built for ``package``: how a pickled instance comes back."""
    cls = for_package(written, package)
    return cls.__new__(cls, *args)


def use_package(package: str) -> None:
    """Make our classes follow ``package`` in this process, whatever is imported (our CLI does)."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {list(PACKAGES)}, got {package!r}")
    _CHOSEN[:] = [package]


def installed_packages() -> list[str]:
    """The Lightning packages that can be imported here, ``lightning`` first."""
    return [name for name in PACKAGES if sys.modules.get(name, ...) is not None and find_spec(name) is not None]


def active_package() -> str:
    """The package our classes are built for now (the rule in the module docstring)."""
    chosen = os.environ.get(PACKAGE_ENV)
    if chosen:
        if chosen not in PACKAGES:
            raise ValueError(f"${PACKAGE_ENV} must be one of {list(PACKAGES)}, got {chosen!r}")
        return chosen
    if _CHOSEN:
        return _CHOSEN[0]
    modules = {module: name for name, module in PACKAGES.items()}
    imported = [modules[m] for m in _imported_by_program()]
    if len(imported) > 1:
        global _WARNED_BOTH
        if not _WARNED_BOTH:
            _WARNED_BOTH = True
            warnings.warn(
                f"both lightning.pytorch and pytorch_lightning are imported; lightning-sr's classes "
                f"follow {PACKAGES[imported[0]]}, imported first. Set {PACKAGE_ENV} or use "
                f"lightning_sr.lightning.<Name> / lightning_sr.pytorch_lightning.<Name> to choose.",
                stacklevel=3,
            )
    if imported:
        return imported[0]
    installed = installed_packages()
    if not installed:
        raise ImportError("lightning-sr's Lightning classes need Lightning: pip install lightning")
    return installed[0]


def _imported_by_program() -> list[str]:
    """Modules of the Lightning packages the program imported, in import order (not ours)."""
    ours = {PACKAGES[name] for name in _IMPORTED_HERE}
    return [m for m, value in list(sys.modules.items()) if m in PACKAGES.values() and value is not None and m not in ours]


def import_package(package: str):
    """The package's module (``lightning.pytorch`` or ``pytorch_lightning``), imported if needed."""
    module = PACKAGES[package]
    if module not in sys.modules:
        _IMPORTED_HERE.add(package)
    return importlib.import_module(module)


def for_package(cls: type, package: str) -> type:
    """``cls``, written on a stand-in base, as a subclass of that base's class in ``package``.

    Built once per (class, package); a class already built for a package is returned as it is.
    """
    if getattr(cls, "_lightning_package", None) is not None:
        return cls
    key = (cls, package)
    if key not in _BUILT:
        stand_in = next(base for base in cls.__mro__ if vars(base).get("_real_base"))
        submodule, _, name = stand_in._real_base.rpartition(".")
        module = import_package(package)
        if submodule:
            module = importlib.import_module(f"{module.__name__}.{submodule}")
        real_base = getattr(module, name)
        metaclass = type(cls)
        if not issubclass(metaclass, type(real_base)):  # e.g. a Strategy: an abc.ABC
            metaclass = type(f"{metaclass.__name__}And{type(real_base).__name__}", (metaclass, type(real_base)), {})
        _BUILT[key] = metaclass(
            cls.__name__,
            (cls, real_base),
            {
                "__module__": f"lightning_sr.{package}",  # where pickle finds it again
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_lightning_package": package,
            },
        )
    return _BUILT[key]


def resolve(cls: type) -> type:
    """What a public name stands for now: ``cls`` built for the program's package, or ``cls``
    itself while no Lightning package is chosen yet (it builds itself when instantiated)."""
    if os.environ.get(PACKAGE_ENV) or _CHOSEN or _imported_by_program():
        return for_package(cls, active_package())
    return cls


OptimizerCallable = Callable[[Iterable], Optimizer]
"""Builds an optimizer from parameters; LightningCLI's type for an injected optimizer."""
LRSchedulerCallable = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]
"""Builds a learning-rate scheduler for an optimizer; LightningCLI's type for an injected scheduler."""
