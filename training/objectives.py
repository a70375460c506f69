"""Training objectives: cross-entropy, and the certified-margin ("bottom logit") losses.

    ce             F.cross_entropy(z, y) — the plain language-model loss.
    margin_global  GloRo-style: every competing logit z_j (j ≠ y) is raised by the most a
                   perturbation of radius ε_train could raise it relative to z_y under the *global*
                   certificate, and cross-entropy is taken on those "bottom" logits:
                       z̃_j = z_j + ‖w_y − w_j‖₂ · e,   e = √d · L_body · ε_train,   z̃_y = z_y.
                   z̃ is exactly the quantity the certificate checks (docs/lipschitz.md §6: position
                   t is certified at ε iff z_y − z_j − ‖w_y − w_j‖·e > 0 for all j), so the loss
                   rewards margins that survive the certificate, not raw margins. At ε_train = 0 it
                   is cross-entropy.
    margin_local   the same with the per-token local deviation bound e_{N,t}(ε_train) of
                   docs/lipschitz.md §9 in place of √d·L_body·ε_train: a differentiable surrogate
                   (training/local_surrogate.py) centred on this batch's own activations, which
                   the forward records through hooks (`Objective.recording`). It rewards confident
                   attention far from ties instead of forcing the score range down.

`stability` w_s > 0 adds w_s·(the mean over maxmin pairs and positions of relu(1 − |δ|/r)), δ = z_a − z_b
the pair's difference and r = ‖w_a − w_b‖·e_l its reach under the body bound's radius e_l = √d·L_l·ε_train
at that MLP's input (L_l the bound up to there): the ReLU-stability loss of Xiao et al. (2019) for
the pairs a perturbation could reorder. Every such pair costs the linear-relaxation certificate
(docs/lipschitz.md §10) its triangle relaxation; a pair it cannot reorder passes exactly. The reach is
taken at ε_train unless `stability_eps` gives the term a radius of its own (ramped alike): the margin's
radius is what costs clean accuracy, the pairs' radius is what the refined certificate needs at the
radius it is asked for, and the two need not be the same. With ε_train = 0 and `stability_eps` > 0 the
loss is cross-entropy plus the stability term.

The margin loss may be mixed with plain cross-entropy, (1 − w)·CE(z) + w·CE(z̃) (`margin_weight`
w, IBP's κ), so that the clean prediction keeps a direct signal while the bound is far too large.
ε_train may be ramped linearly from 0 over the first `eps_warmup` steps (GloRo / IBP practice: a
full-size margin from step 0 pushes a model at init toward the trivial constant predictor).

`margin_on = "correct"` takes the margin loss only at the positions the clean logits already predict
correctly and plain cross-entropy at the others (MACER's choice, Zhai et al. 2020). A language model
is wrong on about half of its positions, and there the margin loss is large and mostly a push on
L_body (∂/∂e of CE(z̃) is Σ_j p̃_j‖w_y − w_j‖, near its maximum when p̃_y is small): the positions that
can never count as certified-and-correct would set how much accuracy is traded for radius. The mask
is taken without gradient, so it only selects which loss each position gets.

L_body for *training* is a differentiable estimate, not the certificate: the same composition as
`lipformer.nn.compose_bounds` (docs/lipschitz.md §4–5), but with each σ_max from a few
power iterations from a fixed start, σ ≈ uᵀWv, whose gradient uvᵀ is the gradient of σ_max. Power iteration can only
underestimate σ, so this L_body is ≤ the sound one (by the iteration's error: small for weights at
their caps, whose spectra are flat). That is fine for a training signal: the certificate of the trained weights is
recomputed afterwards with sound σ upper bounds (`model.bounds()`), never from this estimate.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from lipformer.nn import ATTENTION_DIVISOR

OBJECTIVES = ("ce", "margin_global", "margin_local")


class PowerSigma:
    """Differentiable σ_max estimates: uᵀWv with u, v from `iters` no-grad power steps.

    Every call starts from the same fixed vector, so the estimate is a function of the weights
    alone: a resumed run computes exactly what an uninterrupted one does (a warm start carried
    between steps would have to be checkpointed). Matrix–vector products only, negligible next to
    the forward pass.
    """

    def __init__(self, iters: int = 12):
        self.iters = iters

    def sigma(self, weight: Tensor, heads: int | None = None) -> Tensor:
        """σ_max of `weight`, or of each of its `heads` row blocks (a (heads,) tensor)."""
        W = weight if heads is None else weight.view(heads, -1, weight.size(-1))
        Wd = W.detach().float()
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(Wd.shape[:-2] + Wd.shape[-1:], generator=g).to(Wd.device)
        with torch.no_grad():
            for _ in range(self.iters):
                u = F.normalize(torch.einsum("...mn,...n->...m", Wd, v), dim=-1)
                v = F.normalize(torch.einsum("...mn,...m->...n", Wd, u), dim=-1)
        return torch.einsum("...m,...mn,...n->...", u.to(W.dtype), W, v.to(W.dtype))


def body_lipschitz(model, sigma, at_mlp: list | None = None) -> Tensor:
    """L_body of docs/lipschitz.md §5 as a differentiable tensor, σ's from `sigma(weight, heads)`;
    with `at_mlp`, the bound up to each block's MLP input is appended to it.

    Mirrors `lipformer.nn.compose_bounds` (dense layers): tests/test_objectives.py checks it equals
    `model.bounds().body` when `sigma` is exact.
    """
    cfg = model.config
    H, c, a = cfg.num_attention_heads, cfg.softmax_scale, cfg.residual_alpha
    B = torch.tensor(float(model.model.ball.radius))
    L = torch.ones(())
    for layer in model.model.layers:
        att = layer.attn
        sq, sk, sv = (sigma(m.weight, H) for m in (att.q, att.k, att.v))
        so = sigma(att.o.weight)
        per_head = sv * (1 + 2 * c * H * sq * sk * B * B)
        L_att = so * per_head.pow(2).sum().sqrt() / ATTENTION_DIVISOR
        out_att = so * sv.pow(2).sum().sqrt() * B / ATTENTION_DIVISOR
        L = L * ((1 - a) + a * L_att)
        B = (1 - a) * B + a * out_att
        if at_mlp is not None:
            at_mlp.append(L)
        n_in = math.sqrt(layer.mlp.fc_in.d_in / layer.mlp.fc_in.d_out) * sigma(layer.mlp.fc_in.weight)
        n_out = math.sqrt(layer.mlp.fc_out.d_in / layer.mlp.fc_out.d_out) * sigma(layer.mlp.fc_out.weight)
        L = L * ((1 - a) + a * n_in * layer.mlp.act_lipschitz * n_out)
        B = (1 - a) * B + a * n_out * n_in * B * layer.mlp.act_shrink
    return L


STABILITY_STRIDE = 4


def pair_instability(model, preactivations: list, eps: float, sigma, position_stride: int = STABILITY_STRIDE) -> Tensor:
    """Mean over maxmin pairs, positions and blocks of relu(1 − |δ|/r) (see the module docstring):
    0 when no perturbation of size ε could reorder a pair under the body bound, up to 1 at a tie.

    preactivations: per block, the output z of its MLP's fc_in as the forward computed it (recorded
    by `Objective.recording`), so the term adds elementwise work only: recomputing z here in float32
    (the first version) doubled the cost of a full-size step on a CPU. The mean over positions is
    taken on every `position_stride`-th position of each sequence (of sequences at least twice that
    long): an estimate of the full mean over the same windows at a quarter of the elementwise work,
    which at the full preset's size was still 0.5 s of a 1.25 s step when taken over all of them."""
    reach = []
    body_lipschitz(model, sigma, reach)
    root_d = math.sqrt(model.config.hidden_size)
    total = 0.0
    for z, L, layer in zip(preactivations, reach, model.model.layers):
        W = layer.mlp.fc_in.weight
        if z.dim() >= 2 and z.size(-2) >= 2 * position_stride:
            z = z[..., ::position_stride, :]
        a, b = z.chunk(2, dim=-1)
        delta = (a - b).to(torch.promote_types(z.dtype, torch.float32))   # bf16 → float32 for the ratio
        a_w, b_w = W.chunk(2, dim=0)
        r = ((a_w - b_w).to(delta.dtype).norm(dim=-1) * (root_d * eps) * L.to(delta.dtype)).clamp(min=1e-12)
        # mean of relu(1 − |δ|/r) = mean over pairs of (mean over positions of relu(r − |δ|)) / r
        shortfall = torch.relu(r - delta.abs()).reshape(-1, r.numel()).mean(dim=0)
        total = total + (shortfall / r).mean()
    return total / len(preactivations)


def bottom_logit_loss(logits: Tensor, targets: Tensor, head_weight: Tensor, deviation: Tensor,
                      reduction: str = "mean") -> Tensor:
    """Cross-entropy on z̃_j = z_j + ‖w_y − w_j‖·e (j ≠ y), z̃_y = z_y.

    logits (..., V), targets (...), head_weight (V, d), deviation: e, a scalar or a tensor
    broadcastable to targets' shape (per-position bounds on ‖Δh‖₂ of the final hidden state).
    reduction: as in F.cross_entropy ("none": one loss per position, flattened).
    """
    z = logits.float().reshape(-1, logits.size(-1))
    y = targets.reshape(-1)
    W = head_weight.float()
    dist = torch.cdist(W, W)  # ‖w_i − w_j‖₂, zero on the diagonal so z̃_y = z_y
    e = deviation.float().reshape(-1, 1) if deviation.dim() else deviation.float()
    return F.cross_entropy(z + dist[y] * e, y, reduction=reduction)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), the mean over positions (Hinton et al. 2015; the T² keeps
    the gradient's scale independent of T). Zero exactly when the student's distribution is the teacher's."""
    V = student_logits.size(-1)
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


class Distillation:
    """(1 − β)·task_loss + β·distillation_loss against a frozen teacher run on the same batch.

    The teacher is any causal LM over the same vocabulary; it is run without gradient, in eval mode,
    under the caller's autocast. It shapes the training signal only: the student's certificate is
    computed from the student's weights alone, so a teacher with no bound at all is fine.
    """

    def __init__(self, teacher, weight: float = 0.5, temperature: float = 1.0):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor) -> Tensor:
        return self.teacher(input_ids, use_cache=False).logits

    def __call__(self, task_loss: Tensor, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        kd = distillation_loss(student_logits, teacher_logits, self.temperature)
        return (1 - self.weight) * task_loss + self.weight * kd


MARGIN_ON = ("all", "correct")


class Objective:
    """loss(model, logits, targets, step) for one recipe.

    margin_local needs the activations of the forward that produced `logits`: run that forward
    inside `with objective.recording(model):` (a no-op for the other objectives).
    """

    def __init__(self, name: str = "ce", eps: float = 0.0, power_iters: int = 12, eps_warmup: int = 0,
                 weight: float = 1.0, stability: float = 0.0, margin_on: str = "all", stability_eps: float = 0.0):
        if name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
        if margin_on not in MARGIN_ON:
            raise ValueError(f"margin_on must be one of {', '.join(MARGIN_ON)}, got {margin_on!r}")
        self.margin_on = margin_on
        if not (math.isfinite(stability) and stability >= 0):
            raise ValueError(f"stability weight must be >= 0, got {stability}")
        self.stability = float(stability)
        if not (math.isfinite(stability_eps) and stability_eps >= 0):
            raise ValueError(f"stability_eps must be >= 0, got {stability_eps}")
        self.stability_eps = float(stability_eps)
        self.name, self.eps, self.power = name, float(eps), PowerSigma(power_iters)
        self.eps_warmup, self.weight = int(eps_warmup), float(weight)
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"margin weight must be in [0, 1], got {weight}")
        self._seen = self._preacts = None

    def eps_at(self, step: int | None, eps: float | None = None) -> float:
        """ε_train (or another radius `eps` on the same ramp) at `step` (0-based): linear from 0 over
        eps_warmup steps; None: the full radius."""
        eps = self.eps if eps is None else eps
        if step is None or self.eps_warmup <= 0:
            return eps
        return eps * min(1.0, (step + 1) / self.eps_warmup)

    @contextmanager
    def recording(self, model):
        """Record what the loss needs of the forward run inside: the sublayer inputs (margin_local)
        and the MLPs' pre-activations (a stability term)."""
        if self.name != "margin_local" and not self.stability:
            yield
            return
        preacts = [None] * len(model.model.layers)

        def grab(i):
            def hook(module, args, output):
                preacts[i] = output
            return hook

        hooks = [layer.mlp.fc_in.register_forward_hook(grab(i)) for i, layer in enumerate(model.model.layers)] \
            if self.stability else []
        try:
            if self.name == "margin_local":
                from .local_surrogate import recording
                with recording(model) as seen:
                    yield
                self._seen = seen
            else:
                yield
        finally:
            for h in hooks:
                h.remove()
        self._preacts = preacts if self.stability else None

    def __call__(self, model, logits: Tensor, targets: Tensor, step: int | None = None) -> Tensor:
        eps = self.eps_at(step)
        reach_eps = self.eps_at(step, self.stability_eps or self.eps)   # the stability term's own radius
        extra = 0.0
        if self.stability and reach_eps > 0:
            if self._preacts is None or self._preacts[0] is None:
                raise RuntimeError("stability: run the forward inside `with objective.recording(model):`")
            if model.config.activation != "maxmin":
                raise ValueError("train.stability needs model.activation = 'maxmin' (it acts on maxmin's pairs)")
            preacts, self._preacts = self._preacts, None
            extra = self.stability * pair_instability(model, preacts, reach_eps, self.power.sigma)
        return self._loss(model, logits, targets, eps) + extra

    def _loss(self, model, logits: Tensor, targets: Tensor, eps: float) -> Tensor:
        if self.name == "ce" or eps == 0.0:
            self._seen = None
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        if self.name == "margin_global":
            e = math.sqrt(model.config.hidden_size) * body_lipschitz(model, self.power.sigma) * eps
        else:
            if self._seen is None or self._seen.attn[0] is None:
                raise RuntimeError("margin_local: run the forward inside `with objective.recording(model):`")
            from .local_surrogate import local_deviation
            seen, self._seen = self._seen, None   # one loss per recorded forward; frees the activations
            e = local_deviation(model, seen, eps, self.power.sigma)
        if self.margin_on == "correct":
            z, y = logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
            ce_t = F.cross_entropy(z, y, reduction="none")
            margin_t = bottom_logit_loss(logits, targets, model.head.weight, e, reduction="none")
            margin = torch.where(z.detach().argmax(-1) == y, margin_t, ce_t).mean()
            if self.weight == 1.0:
                return margin
            return (1 - self.weight) * ce_t.mean() + self.weight * margin
        margin = bottom_logit_loss(logits, targets, model.head.weight, e)
        if self.weight == 1.0:
            return margin
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return (1 - self.weight) * ce + self.weight * margin


__all__ = ["MARGIN_ON", "OBJECTIVES", "Distillation", "Objective", "PowerSigma", "body_lipschitz", "bottom_logit_loss", "distillation_loss",
           "pair_instability"]
