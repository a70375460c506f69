"""The projection step keeps every constrained weight under its cap, measured soundly."""

import pytest
import torch

from lipformer import spectral
from lipformer.config import LipformerConfig
from lipformer.constraints import SpectralProjection
from lipformer.modeling import LipformerForCausalLM
from lipformer.nn import CappedLinear

TOL = 1 + 1e-3


def tiny(**kw):
    cfg = dict(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, w_max={"q": 0.5, "k": 0.5, "v": 1.0, "o": 1.0,
                                                  "mlp_in": 2.0, "mlp_out": 1.0, "head": 3.0, "embed": 1.5})
    return LipformerForCausalLM(LipformerConfig(**{**cfg, **kw}))


def within_caps(model):
    for m in model.modules():
        if isinstance(m, CappedLinear):
            assert float(spectral.sigma_upper(m.weight)) <= m.sigma_cap * TOL, (m.kind, m.sigma_cap)
    rms = model.model.embed.weight.pow(2).mean(-1).sqrt()
    assert float(rms.max()) <= model.model.embed.w_max * TOL


def train(model, optimizer, project, steps=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 17, (4, 12), generator=g)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 17), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        project()
        within_caps(model)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("method", ["auto", "eigh", "polar", "svd"])
def test_hard_cap_after_every_adamw_step(method):
    model = tiny(cap_method=method)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)  # large steps: weights leave their caps
    train(model, opt, SpectralProjection(model, opt))


def test_soft_cap_with_measured_step_keeps_caps():
    model = tiny(constraint="soft_cap")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train(model, opt, SpectralProjection(model, opt))


@pytest.mark.parametrize("constraint", ["normalize", "hammer", "spectral_wd", "none"])
def test_other_constraints_run_and_normalize_is_a_guarantee(constraint):
    model = tiny(constraint=constraint)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    project = SpectralProjection(model, opt)
    if constraint == "normalize":
        train(model, opt, project)
    else:
        ids = torch.randint(0, 17, (2, 8))
        model(ids).logits.square().mean().backward()
        opt.step()
        project()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hammer_sets_top_sigma_to_each_kinds_cap():
    model = tiny(constraint="hammer")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    SpectralProjection(model)()
    q = model.model.layers[0].attn.q
    top = torch.linalg.svdvals(q.weight.double()).max()
    assert abs(float(top) - q.sigma_cap) < 1e-3 or float(top) > q.sigma_cap  # only the top moved


def test_projection_rejects_unknown_names():
    with pytest.raises(ValueError, match="constraint"):
        SpectralProjection(tiny(), constraint="clip")
    with pytest.raises(ValueError, match="method"):
        SpectralProjection(tiny(), method="qr")


@pytest.mark.parametrize("name", ["muon", "root", "lpsgd", "lpsgdm", "lamb", "alto"])
@pytest.mark.parametrize("constraint", ["hard_cap", "soft_cap"])
def test_every_optimizer_with_the_projection_step(name, constraint):
    from lipformer.optim import build_optimizer
    model = tiny(constraint=constraint)
    opt = build_optimizer(model, name, lr=0.05 if name in ("muon", "root") else 0.01)
    losses = train(model, opt, SpectralProjection(model, opt), steps=6)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
