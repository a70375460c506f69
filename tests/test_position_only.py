"""The two training-speed kernels compute what the general code computes.

`Attention.position_only` forms softmax(bias) once per layer instead of running q·kᵀ·0 + a bias mask
through the attention kernel per sequence; `_MaxMin` keeps one comparison for its backward instead
of torch.maximum/minimum's. Both must be the same function (and, for maxmin, a valid gradient): the
certificate is a statement about the forward the model runs, and training must follow its gradient.
The general path is forced with an explicit causal mask (what "no mask" means), and a control
shows the comparison fails when the fast path is wrong.
"""

import pytest
import torch

import lipformer.nn as lnn
from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.nn import maxmin

CONFIG = dict(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
              softmax_scale=0.0, position_bias=8, residual_alpha=0.5, activation="maxmin",
              w_max={"v": 2, "o": 2, "mlp_in": 2, "mlp_out": 2, "head": 8})


def sharp_position_model(dtype=torch.float64) -> LipformerForCausalLM:
    """Position-only attention whose heads pick distances sharply: predictions depend on context."""
    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(**CONFIG)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.position_bias.copy_(4 * torch.randn_like(layer.attn.position_bias))
    return model


def general(model, ids=None, embeds=None, allowed=None):
    """The model's forward with attention through the kernel: an explicit (1, 1, T, T) causal bool mask."""
    T = (ids if ids is not None else embeds).size(1)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if allowed is None else allowed
    forward = lnn.Attention.forward

    def masked(self, x, rope, mask=None, cache=None, layer_idx=None, attend=None):
        assert mask is None and cache is None
        return forward(self, x, rope, allowed[None, None], cache, layer_idx, attend)

    lnn.Attention.forward = masked
    try:
        return model(input_ids=ids, inputs_embeds=embeds, use_cache=False).logits
    finally:
        lnn.Attention.forward = forward


def reference_maxmin(z):
    """maxmin through torch.maximum / torch.minimum: what the kernel must equal."""
    a, b = z.chunk(2, dim=-1)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=-1)


def count_fast_calls(monkeypatch) -> list:
    calls = []
    original = lnn.Attention.position_only
    monkeypatch.setattr(lnn.Attention, "position_only", lambda self, v: calls.append(1) or original(self, v))
    return calls


def test_fast_path_is_the_same_function_and_gradient(monkeypatch):
    model = sharp_position_model().train()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 20, 64, generator=g, dtype=torch.float64)
    embeds = embeds / embeds.pow(2).mean(-1, keepdim=True).sqrt()
    calls = count_fast_calls(monkeypatch)

    def value_and_grads(run):
        x = embeds.clone().requires_grad_()
        model.zero_grad()
        logits = run(x)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        return logits.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = value_and_grads(lambda x: model(inputs_embeds=x, use_cache=False).logits)
    assert len(calls) == 2   # one per layer: the fast path was taken
    slow = value_and_grads(lambda x: general(model, embeds=x))
    assert len(calls) == 2   # and not taken with a mask
    assert (fast[0] - slow[0]).abs().max() <= 1e-12 * slow[0].abs().max()
    assert torch.allclose(fast[1], slow[1], rtol=0, atol=1e-12)
    # every parameter gets a gradient on both paths (q and k exact zeros at scale 0: DDP needs them)
    assert fast[2].keys() == slow[2].keys() == {n for n, _ in model.named_parameters()} - {"model.embed.weight"}
    for name, grad in slow[2].items():
        assert torch.allclose(fast[2][name], grad, rtol=0, atol=1e-12), name
    assert all(fast[2][n].abs().max() == 0 for n in fast[2] if ".q." in n or ".k." in n)
    assert any(name.endswith("position_bias") and grad.abs().max() > 1e-3 for name, grad in fast[2].items())

    # control: attention that also sees the next key changes the logits, so the comparison can fail
    T = embeds.size(1)
    leaky = general(model, embeds=embeds.detach(), allowed=torch.ones(T, T, dtype=torch.bool).tril(1))
    assert (leaky - fast[0]).abs().max() > 1e-3


@torch.no_grad()
def test_fast_path_is_causal_and_used_only_where_it_applies(monkeypatch):
    model = sharp_position_model().eval()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    calls = count_fast_calls(monkeypatch)
    base = model(ids, use_cache=False).logits
    assert len(calls) == 2
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 40
    after = model(changed, use_cache=False).logits
    assert torch.equal(after[:, :9], base[:, :9])           # nothing before t sees token t
    assert (after[:, 9:] - base[:, 9:]).abs().max() > 1e-3   # and context matters after it

    calls.clear()
    model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0), use_cache=False)
    model(ids, use_cache=True)                              # a cache: keys' slots come from it
    model(ids, use_cache=False, output_attentions=True)     # weights per sequence are wanted
    assert calls == []


def test_fast_path_under_bf16_autocast_matches_within_rounding():
    model = sharp_position_model(torch.float32).train()
    ids = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(ids, use_cache=False).logits.float()
        slow = general(model, ids=ids).float()
    assert (fast - slow).abs().max() <= 0.05 * slow.abs().max()


def test_maxmin_backward_is_the_forwards_permutation():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    (maxmin(z) * w).sum().backward()
    ref = z.detach().clone().requires_grad_()
    (reference_maxmin(ref) * w).sum().backward()
    assert torch.equal(z.grad, ref.grad)   # no ties in random data: the same gradient exactly
    # at a tie the whole gradient goes to one unit: still a permutation, norms kept
    tie = torch.tensor([[2.0, -1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([[5.0, 7.0, 11.0, 13.0]], dtype=torch.float64)
    (maxmin(tie) * up).sum().backward()
    assert sorted(tie.grad.flatten().tolist()) == sorted(up.flatten().tolist())
    assert torch.autograd.gradgradcheck(maxmin, (z.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxmin_kernel_keeps_values_exactly(dtype):
    z = torch.randn(8, 6, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(maxmin(z), reference_maxmin(z))


def test_maxmin_forward_mode_and_torch_func_match_the_reference():
    """jvp, jacrev and vmap go through the kernel (a Jacobian-norm check of a bound may use any of
    them) and give the reference's derivatives; a wrong tangent rule is caught."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 8, generator=g, dtype=torch.float64)
    t = torch.randn(3, 8, generator=g, dtype=torch.float64)
    _, jvp = torch.func.jvp(maxmin, (z,), (t,))
    _, ref_jvp = torch.func.jvp(reference_maxmin, (z,), (t,))
    close = dict(rtol=0, atol=1e-15)   # torch.maximum's jvp mixes tangents by 0/1 weights: last-bit rounding
    torch.testing.assert_close(jvp, ref_jvp, **close)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(z, t)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(maxmin(dual)).tangent, ref_jvp, **close)
    jac = torch.func.vmap(torch.func.jacrev(reference_maxmin))(z)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(maxmin))(z), jac, **close)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(maxmin))(z), jac, **close)
    assert (jvp - t).abs().max() > 0.1   # control: an identity tangent rule would fail the comparison
