import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # user_callbacks.py, importable by class path

from lightning_sr.lightning_packages import PACKAGE_ENV, PACKAGES  # noqa: E402
from lightning_sr.testing import make_tokenizer, tiny_llama, tiny_reward_model  # noqa: E402


class LightningPackage:
    """One Lightning package under test: ``L.Trainer``, ``L.sub("cli").LightningCLI``, ..."""

    def __init__(self, name: str):
        self.name = name
        self.module = importlib.import_module(PACKAGES[name])

    def __getattr__(self, attr):
        return getattr(self.module, attr)

    def sub(self, path: str):
        return importlib.import_module(f"{self.module.__name__}.{path}")

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(autouse=True)
def _one_lightning_package(monkeypatch):
    """Both packages are imported in this process: our classes follow ``lightning`` unless a test
    asks for the ``L`` matrix below. pytest's own options are not the CLI's command line."""
    monkeypatch.setenv(PACKAGE_ENV, "lightning")
    monkeypatch.setattr(sys, "argv", ["lightning-sr"])


@pytest.fixture(params=list(PACKAGES))
def L(request, monkeypatch):
    """Run the test once with ``lightning.pytorch`` and once with ``pytorch_lightning``."""
    monkeypatch.setenv(PACKAGE_ENV, request.param)
    return LightningPackage(request.param)


@pytest.fixture(scope="session")
def soak():
    """``benchmarks/fault_soak.py`` as a module: real ``lightning-sr`` runs, killed and resumed."""
    spec = importlib.util.spec_from_file_location("fault_soak", Path(__file__).parents[1] / "benchmarks" / "fault_soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_soak"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def workspace(soak, tmp_path_factory):
    """Tiny generator and reward folders, a prompt file and a preference file, for CLI runs."""
    return soak.make_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return make_tokenizer(chat_template=True)


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture
def reward_pair():
    return tiny_reward_model()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on machines without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
