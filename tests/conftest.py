import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("lipformer", deadline=None, max_examples=40, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lipformer"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """A char corpus (train/val .bin + meta) built from the requesting test module's CORPUS text."""
    from lipformer.training.data import build_char_corpus

    folder = tmp_path_factory.mktemp("corpus") / "char"
    build_char_corpus([request.module.CORPUS], folder)
    return str(folder)
