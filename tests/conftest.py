import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # user_callbacks.py, importable by class path

from lightning_sr.testing import make_tokenizer, tiny_llama, tiny_reward_model  # noqa: E402


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
