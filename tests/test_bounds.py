"""Every module's certified bound against what gradient-based search can find.

The bound must be ≥ every empirical Lipschitz ratio (Jacobian power iteration, pair ascent) and
every observed output rms, on random weights, weights at their caps and weights above them.
"""

import math

import pytest
import torch

from lipformer.config import LipformerConfig
from lipformer.empirical import empirical_lipschitz, output_ascent, seq_norm
from lipformer.nn import project_to_ball
from lipformer.nn import (GELU_DIVISOR, GELU_LIPSCHITZ, GELU_MAX_SLOPE, MLP, Attention, Block,
                          CappedLinear, maxmin, rope_tables)
from lipformer.modeling import LipformerForCausalLM

SLACK = 1 + 1e-9  # float64 rounding of the forward itself
CFG = dict(vocab_size=11, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)


def config(**kw):
    return LipformerConfig(**{**CFG, **kw})


def perturb_weights(module, mode, seed=0):
    """'cap': weights as initialized (every σ at its cap); 'random': Gaussian at random scales
    (some above, some below the cap); 'qk': queries and keys pushed 3× over their caps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if mode == "random":
                w = torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.copy_(w / torch.linalg.matrix_norm(w, 2) * float(torch.empty(1).uniform_(0.3, 2.5, generator=g)))
            elif mode == "qk" and (".q." in f".{name}" or ".k." in f".{name}" or name.startswith(("q.", "k."))):
                p.mul_(3.0)
    return module


def inputs(shape, radius, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x * 10 if radius is None else project_to_ball(x * 10, radius)  # every token on the domain's sphere


def attention_fn(attn, T):
    cos, sin = rope_tables(torch.arange(T)[None], attn.head_dim, 10000.0, torch.float64)
    return lambda x: attn(x, (cos[:, None], sin[:, None]))


def test_gelu_constant_is_the_true_max_slope():
    z = torch.linspace(-6, 6, 200_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z)
    assert slope.max() <= GELU_MAX_SLOPE < slope.max() + 1e-9
    assert GELU_MAX_SLOPE > GELU_DIVISOR  # the paper's 1.1289 is rounded *down*: not exactly 1-Lipschitz
    assert GELU_LIPSCHITZ >= GELU_MAX_SLOPE / GELU_DIVISOR


@pytest.mark.parametrize("mode", ["cap", "random"])
@pytest.mark.parametrize("shape", [(32, 32), (32, 128), (128, 32)])
def test_linear_bound_is_exact(mode, shape):
    lin = perturb_weights(CappedLinear(shape[0], shape[1], 1.0, "q").double(), mode)
    bound = lin.bound(1.0).lipschitz
    emp = empirical_lipschitz(lin, inputs((1, 6, shape[0]), None), None)
    assert emp <= bound * SLACK and emp >= 0.99 * bound


def test_maxmin_keeps_norms_and_is_1_lipschitz():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(maxmin(z).norm(dim=-1), z.norm(dim=-1), rtol=1e-15, atol=0)
    w = z + 0.3 * torch.randn(500, 16, generator=g, dtype=torch.float64)
    ratio = (maxmin(z) - maxmin(w)).norm(dim=-1) / (z - w).norm(dim=-1)
    assert ratio.max() <= 1 + 1e-12
    assert ratio.min() < 0.999   # a control: it is not an isometry of differences (pairs swap)
    # a unit of the first half pairs with the same unit of the second half
    assert torch.equal(maxmin(torch.tensor([1.0, 5.0, 3.0, 2.0])), torch.tensor([3.0, 5.0, 1.0, 2.0]))


def test_maxmin_mlp_bounds_are_attained():
    """A maxmin MLP whose bounds are reached exactly: W_in = 2Q (orthonormal columns, RMS→RMS norm
    1), W_out = 2(PQ)ᵀ with P maxmin's permutation at x₀ (norm 4). Near x₀ the MLP is 4·I, so its
    Lipschitz constant, its output at a token of rms B and its local deviation all equal the
    bound's 4 — a bound that kept GELU's 1/1.1289 shrink, or any 10% cut, fails here."""
    mlp = MLP(config(activation="maxmin")).double()
    d, h = mlp.fc_in.d_in, mlp.fc_in.d_out
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(h, d, generator=g, dtype=torch.float64))
    x0 = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    x0 = x0 / x0.pow(2).mean().sqrt()                                       # rms 1
    z = 2 * Q @ x0[0, 0]
    P = torch.autograd.functional.jacobian(maxmin, z)                       # a permutation matrix
    assert torch.equal(P @ P.T, torch.eye(h, dtype=torch.float64))
    with torch.no_grad():
        mlp.fc_in.weight.copy_(2 * Q)
        mlp.fc_out.weight.copy_(2 * (P @ Q).T)
    J = torch.autograd.functional.jacobian(lambda x: mlp(x), x0).reshape(d, d)
    torch.testing.assert_close(J, 4 * torch.eye(d, dtype=torch.float64))
    b = mlp.bound(1.0)
    assert 4.0 <= b.lipschitz <= 4.0 * 1.001
    out_rms = float(mlp(x0).pow(2).mean().sqrt())
    assert out_rms == pytest.approx(4.0, rel=1e-12) and out_rms <= b.output * SLACK <= 4.0 * 1.001
    # local: a step small enough that no pair changes order moves the output by exactly 4×
    e = 1e-4
    delta = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    delta = e * delta / delta.norm()
    moved = float((mlp(x0 + delta) - mlp(x0)).norm())
    local = float(mlp.local_bound(x0[0], torch.tensor([[e]], dtype=torch.float64), 1.0, 1e-13)[0, 0])
    assert moved == pytest.approx(4 * e, rel=1e-9) and moved <= local <= 4 * e * 1.001


@pytest.mark.parametrize("mode", ["cap", "random"])
@pytest.mark.parametrize("radius", [0.5, 2.0])
@pytest.mark.parametrize("activation", ["gelu", "maxmin"])
def test_mlp_bound(mode, radius, activation):
    mlp = perturb_weights(MLP(config(activation=activation)).double(), mode)
    b = mlp.bound(radius)
    x = inputs((1, 6, 32), radius)
    assert empirical_lipschitz(mlp, x, radius) <= b.lipschitz * SLACK
    assert output_ascent(mlp, x, radius) <= b.output * SLACK


@pytest.mark.parametrize("mode", ["cap", "random", "qk"])
@pytest.mark.parametrize("radius", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_attention_bound(mode, radius, scale):
    attn = perturb_weights(Attention(config(softmax_scale=scale)).double(), mode)
    T = 6
    f = attention_fn(attn, T)
    b = attn.bound(radius)
    for seed in range(2):
        x = inputs((1, T, 32), radius, seed)
        emp = empirical_lipschitz(f, x, radius, seed=seed)
        assert emp <= b.lipschitz * SLACK, (emp, b.lipschitz)
        assert output_ascent(f, x, radius) <= b.output * SLACK


def sharp_offsets(module, seed=0):
    """Position offsets of scale 4: heads that pick a few distances (the bias carries no bound)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("position_bias"):
                p.copy_(4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.mark.parametrize("mode", ["cap", "random", "qk"])
@pytest.mark.parametrize("scale", [0.0, 4.0])
def test_attention_bound_with_a_position_bias(mode, scale):
    """The learned offsets do not depend on the input, so §4's bound stands unchanged; at softmax
    scale 0 attention is a fixed convex mixing and the bound is the value path alone."""
    attn = sharp_offsets(perturb_weights(Attention(config(softmax_scale=scale, position_bias=4)).double(), mode))
    T, radius = 6, 1.0
    f = attention_fn(attn, T)
    b = attn.bound(radius)
    if scale == 0:
        sv = torch.stack([torch.linalg.matrix_norm(w, 2) for w in attn.v.weight.detach().chunk(4)])
        value_only = float(torch.linalg.matrix_norm(attn.o.weight.detach(), 2) * sv.pow(2).sum().sqrt() / 3)
        assert b.lipschitz == pytest.approx(value_only, rel=1e-3)   # (sound σ's carry a small margin)
    for seed in range(2):
        x = inputs((1, T, 32), radius, seed)
        assert empirical_lipschitz(f, x, radius, seed=seed) <= b.lipschitz * SLACK
        assert output_ascent(f, x, radius) <= b.output * SLACK


def test_attention_bound_grows_with_the_input_bound():
    """The q·k term makes attention's constant depend on B: a bound valid at B=1 is wrong at B=4."""
    attn = perturb_weights(Attention(config(softmax_scale=4.0)).double(), "qk")
    f = attention_fn(attn, 6)
    emp_big = empirical_lipschitz(f, inputs((1, 6, 32), 4.0), 4.0, steps=300)
    assert emp_big <= attn.bound(4.0).lipschitz * SLACK
    assert emp_big > attn.bound(0.25).lipschitz  # so the domain really matters


@pytest.mark.parametrize("mode", ["cap", "random", "qk"])
def test_block_bound(mode):
    block = perturb_weights(Block(config()).double(), mode)
    cos, sin = rope_tables(torch.arange(6)[None], 8, 10000.0, torch.float64)
    f = lambda x: block(x, (cos[:, None], sin[:, None]))  # noqa: E731
    attn, mlp = block.bound(1.0)
    x = inputs((1, 6, 32), 1.0)
    assert empirical_lipschitz(f, x, 1.0) <= attn.lipschitz * mlp.lipschitz * SLACK
    assert output_ascent(f, x, 1.0) <= mlp.output * SLACK


@pytest.mark.parametrize("mode", ["cap", "random", "qk", "position", "maxmin"])
def test_model_body_and_total_bounds(mode):
    """From inputs_embeds with *no* constraint on them (the input ball handles any input)."""
    if mode == "position":   # position offsets on top of content scores, weights past their caps
        model = sharp_offsets(perturb_weights(LipformerForCausalLM(config(position_bias=5)).double(), "qk"))
    elif mode == "maxmin":   # the norm-preserving activation, position-only attention, random weights
        model = sharp_offsets(perturb_weights(LipformerForCausalLM(
            config(position_bias=5, softmax_scale=0.0, activation="maxmin")).double(), "random"))
    else:
        model = perturb_weights(LipformerForCausalLM(config()).double(), mode)
    bounds = model.bounds()
    x = inputs((1, 8, 32), 1.0) * 3.0  # far outside the ball, so the projection is active
    body = empirical_lipschitz(lambda e: model.model(inputs_embeds=e).last_hidden_state, x, None)
    total = empirical_lipschitz(lambda e: model(inputs_embeds=e).logits, x, None)
    assert body <= bounds.body * SLACK and total <= bounds.total * SLACK
    assert bounds.total == pytest.approx(bounds.body * model.head.bound(1.0).lipschitz)


@pytest.mark.parametrize("activation", ["gelu", "maxmin"])
def test_activation_bounds_hold_in_the_forward(activation):
    model = perturb_weights(LipformerForCausalLM(config(activation=activation)).double(), "random", seed=3)
    bounds = model.bounds()
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(float(seq_norm(o.detach()))))
             for layer in model.model.layers]
    for seed in range(5):
        model(inputs_embeds=inputs((2, 8, 32), 50.0, seed), use_cache=False)
    for h in hooks:
        h.remove()
    limits = [a["mlp_output"] for a in bounds.activations] * 5
    assert all(s <= lim * SLACK for s, lim in zip(seen, limits))
    assert seq_norm(model(inputs_embeds=inputs((1, 8, 32), 9.0)).logits) <= bounds.logits_bound * SLACK


def test_weight_table_names_match_the_state_dict_and_use_sound_sigmas():
    model = perturb_weights(LipformerForCausalLM(config()), "random", seed=1)
    table = model.bounds().weights
    names = set(model.state_dict())
    assert {w.name for w in table} <= names and len(table) == 2 + 6 * 2
    for w in table:
        W = model.state_dict()[w.name].double()
        if w.name == "model.embed.weight":
            assert w.sigma_upper >= W.pow(2).mean(-1).sqrt().max()
            continue
        exact = torch.linalg.svdvals(W).max()
        assert exact <= w.sigma_upper <= exact * 1.01
        assert w.factor == pytest.approx(math.sqrt(W.shape[1] / W.shape[0]) * w.sigma_upper)


def test_bounds_follow_weight_changes_made_through_data():
    """No stale σ: a bound computed after an in-place `.data` edit reflects the new weights."""
    model = LipformerForCausalLM(config())
    before = model.bounds().total
    model.head.weight.data.mul_(2.0)
    assert model.bounds().total == pytest.approx(2.0 * before, rel=1e-6)
