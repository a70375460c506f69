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


def fit_capped(model, ids, steps: int, lr: float = 3e-2) -> tuple[float, float]:
    """Train `model` on one batch of ids with AdamW + the hard-cap projection after every step (a
    fixture model that has really learned something); returns (first loss, last loss)."""
    from lipformer.constraints import SpectralProjection

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    project = SpectralProjection(model, opt)
    first = last = None
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else float(loss.detach())
        last = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        project()
    return first, last
