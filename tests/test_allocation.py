"""Per-kind step sizes (lipformer.optim.allocation) and zero init (LipformerConfig.zero_init)."""

import pytest
import torch

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.optim import ALLOCATIONS, build_optimizer, resolve_allocation
from lipformer.training.recipe import RecipeError, allocation_of, load_recipe


def tiny(**kw) -> LipformerForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)
    return LipformerForCausalLM(LipformerConfig(**{**cfg, **kw}))


def one_step(model, **opt_kw):
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (4, 16))
    opt = build_optimizer(model, **opt_kw)
    model(ids, labels=ids).loss.backward()
    opt.step()
    return opt


def test_resolve_presets_and_errors():
    assert resolve_allocation(None) == ALLOCATIONS["uniform"]
    modula = resolve_allocation("modula")
    assert modula["q"] == modula["k"] == modula["v"] == 0.94 and modula["o"] == modula["mlp_in"] == 0.31
    assert modula["head"] == modula["embed"] == 0.029
    partial = resolve_allocation({"q": 0.5})
    assert partial["q"] == 0.5 and partial["o"] == 1.0
    for bad in ("nope", {"query": 1.0}, {"q": 0.0}, {"q": float("nan")}, {"q": True}):
        with pytest.raises(ValueError):
            resolve_allocation(bad)


@pytest.mark.parametrize("name,extra", [("muon", {}), ("adamw", {}), ("lpsgdm", {"total_steps": 10})])
def test_allocated_step_equals_plain_step_at_scaled_lr(name, extra):
    """Each kind's weight after one allocated step is bit-identical to a plain step at scale·lr."""
    scales = {"q": 0.5, "o": 0.25, "head": 2.0, "embed": 0.125}
    lr, clr = 0.05, 0.01
    companion = {} if name == "adamw" else {"companion": "colnorm", "companion_lr": clr}
    allocated = tiny()
    one_step(allocated, name=name, lr=lr, allocation=scales, **companion, **extra)
    for kind, scale in [*scales.items(), ("v", 1.0)]:
        plain = tiny()
        base = clr if (kind == "embed" and name != "adamw") else lr
        plain_companion = dict(companion, companion_lr=clr * scale) if kind == "embed" and companion else companion
        one_step(plain, name=name, lr=lr * scale if kind != "embed" or name == "adamw" else lr,
                 **plain_companion, **extra)
        for (n, a), (_, b) in zip(allocated.named_parameters(), plain.named_parameters()):
            module_kind = "embed" if n.endswith("embed.weight") else n.split(".")[-2]
            module_kind = {"fc_in": "mlp_in", "fc_out": "mlp_out"}.get(module_kind, module_kind)
            if module_kind == kind:
                assert torch.equal(a, b), (name, kind, n, base)
    # control: the allocation did change something (q moved less than under the plain lr)
    plain = tiny()
    one_step(plain, name=name, lr=lr, **companion, **extra)
    assert not torch.equal(allocated.model.layers[0].attn.q.weight, plain.model.layers[0].attn.q.weight)


def test_position_offsets_get_their_own_scaled_step():
    """`position` scales the companion lr of the attention's position offsets only (a step equal to a
    plain AdamW step at scale · companion lr; every other tensor as without the scale)."""
    def step(scale):
        model = tiny(softmax_scale=0.0, position_bias=4)
        one_step(model, name="muon", lr=0.05, companion_lr=0.01,
                 allocation=None if scale is None else {"position": scale})
        return model

    plain, scaled = step(None), step(30.0)
    bias = [n for n, _ in plain.named_parameters() if n.endswith("position_bias")]
    assert len(bias) == 2
    params = dict(scaled.named_parameters())
    for n, p in plain.named_parameters():
        assert torch.equal(p, params[n]) != (n in bias), n
    reference = tiny(softmax_scale=0.0, position_bias=4)
    one_step(reference, name="muon", lr=0.05, companion_lr=0.3)    # every companion tensor at 30×
    ref = dict(reference.named_parameters())
    for n in bias:
        assert torch.equal(params[n], ref[n])


def test_groups_and_scheduler_keep_ratios():
    opt = build_optimizer(tiny(), "muon", lr=1.0, allocation="modula", companion="colnorm", companion_lr=0.5)
    lrs = sorted({round(g["lr"], 6) for g in opt.param_groups})
    assert lrs == sorted({0.94, 0.31, 0.029, round(0.5 * 0.029, 6)})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    for _ in range(3):
        opt.step()
        sched.step()
    assert sorted({round(g["lr"] / 0.7, 6) for g in opt.param_groups}) == lrs
    # step_bound reads the allocated lr: q's bound is 0.94/0.31 times o's (same shape, same schedule)
    attn = [g for g in opt.param_groups if abs(g["lr"] / 0.7 - 0.94) < 1e-9][0]["params"][0]
    out = [g for g in opt.param_groups if abs(g["lr"] / 0.7 - 0.31) < 1e-9][0]["params"][0]
    assert attn.shape == out.shape
    assert opt.step_bound(attn)[0] / opt.step_bound(out)[0] == pytest.approx(0.94 / 0.31)


def test_no_allocation_keeps_two_groups():
    """Without an allocation the group layout (and so old optimizer checkpoints) is unchanged."""
    opt = build_optimizer(tiny(), "muon", lr=0.02)
    assert len(opt.param_groups) == 2


def test_recipe_allocation_and_overrides():
    r = load_recipe(preset="tiny", overrides=["train.allocation=modula", "train.lr_scale.q=0.5"])
    table = allocation_of(r.train)
    assert table["q"] == 0.5 and table["k"] == 0.94 and table["head"] == 0.029
    assert allocation_of(load_recipe(preset="tiny").train) is None
    for bad in (["train.allocation=fast"], ["train.lr_scale.query=1"], ["train.lr_scale.q=-1"]):
        with pytest.raises(RecipeError):
            load_recipe(preset="tiny", overrides=bad)


def test_zero_init_and_save_load_bit_identical(tmp_path):
    model = tiny(zero_init=True)
    for name, p in model.named_parameters():
        zero = name.endswith(("attn.o.weight", "fc_out.weight", "head.weight"))
        assert bool((p == 0).all()) == zero, name
        if name.endswith(("q.weight", "fc_in.weight")):  # the others stay orthogonal at the cap
            s = torch.linalg.svdvals(p.detach().double())
            assert torch.allclose(s, s.new_full(s.shape, float(s[0])), rtol=1e-5)
    # train one step so the zero-init weights are not zero any more, then save and load:
    # from_pretrained must not re-zero them (transformers 5 re-runs _init_weights on the model)
    one_step(model, name="muon", lr=0.05)
    model.save_pretrained(tmp_path)
    loaded = LipformerForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.zero_init is True
    assert float(loaded.head.weight.abs().max()) > 0
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    # control: without the option the same weights start orthogonal, not zero
    assert float(tiny().head.weight.abs().max()) > 0
