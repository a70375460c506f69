"""Empirical *lower* bounds on Lipschitz constants, to test certified upper bounds against.

Everything here searches for a large ratio ‖f(X) − f(Y)‖ / ‖X − Y‖ (or a large Jacobian
norm) in the sequence norm ‖X‖ = max_t rms(x_t). A certified bound must never be below what
these find; the ratio of the two measures how tight the certificate is.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .nn import project_to_ball

Fn = Callable[[Tensor], Tensor]


def rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(-1).sqrt()


def seq_norm(x: Tensor) -> Tensor:
    """max over tokens (and batch) of the token rms."""
    return rms(x).amax()


def _into_ball(x: Tensor, radius: float | None) -> Tensor:
    return x if radius is None else project_to_ball(x, radius)  # None: the whole space


def _unit_rows(g: Tensor) -> Tensor:
    """The extreme point of the unit sequence-norm ball that best aligns with g: each row at rms 1."""
    return g / rms(g).clamp(min=1e-30)[..., None]


def jacobian_ascent(f: Fn, x: Tensor, iters: int = 30, restarts: int = 3, seed: int = 0) -> float:
    """Lower bound on the sequence-norm operator norm of f's Jacobian at x.

    A power method for the max-rms → max-rms norm: push a direction through the Jacobian (JVP),
    take the worst output token, pull its direction back (VJP), and move to the ball's extreme
    point (every input token at rms 1) that aligns with that gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(restarts):
        d = _unit_rows(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        for _ in range(iters):
            # autograd.functional uses the double-backward trick: works where forward AD does not (SDPA)
            _, jd = torch.autograd.functional.jvp(f, x, d)
            r = rms(jd)
            best = max(best, float(r.amax()))
            idx = torch.argmax(r.reshape(-1))
            cot = torch.zeros_like(jd).reshape(-1, jd.size(-1))
            cot[idx] = jd.reshape(-1, jd.size(-1))[idx]
            _, g = torch.autograd.functional.vjp(f, x, cot.reshape(jd.shape))
            d = _unit_rows(g)
    return best


def pair_ascent(f: Fn, x0: Tensor, radius: float | None, steps: int = 200, lr: float = 0.02,
                seed: int = 0, separation: float = 0.05) -> float:
    """Lower bound on the Lipschitz constant over {rms ≤ radius}: gradient ascent on input pairs.

    Both points move (Adam) and are projected back into the domain after every step, so the
    constant found is valid for the domain the certified bound assumes.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = float(seq_norm(x0)) or 1.0
    x = _into_ball(x0.clone(), radius).requires_grad_(True)
    y = _into_ball(x0 + separation * scale * torch.randn(x0.shape, generator=gen, dtype=x0.dtype),
                         radius).detach().requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=lr * scale)
    best = 0.0
    for _ in range(steps):
        num = seq_norm(f(x) - f(y))
        den = seq_norm(x - y).clamp(min=1e-12)
        ratio = num / den
        best = max(best, float(ratio.detach()))
        opt.zero_grad()
        (-ratio).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(_into_ball(x, radius))
            y.copy_(_into_ball(y, radius))
    return best


def output_ascent(f: Fn, x0: Tensor, radius: float | None, steps: int = 100, lr: float = 0.05) -> float:
    """Lower bound on sup ‖f(x)‖ over {rms ≤ radius}: projected gradient ascent on the output."""
    scale = float(seq_norm(x0)) or 1.0
    with torch.enable_grad():
        x = _into_ball(x0.clone(), radius).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr * scale)
        best = 0.0
        for _ in range(steps):
            out = seq_norm(f(x))
            best = max(best, float(out.detach()))
            opt.zero_grad()
            (-out).backward()
            opt.step()
            with torch.no_grad():
                x.copy_(_into_ball(x, radius))
    return best


def empirical_lipschitz(f: Fn, x0: Tensor, radius: float | None, seed: int = 0, steps: int = 200) -> float:
    """The best of Jacobian ascent at x0 and pair ascent around it (both lower bounds)."""
    # the math attention kernel is built from differentiable ops, so double backward (JVPs) works
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        return max(jacobian_ascent(f, _into_ball(x0, radius), seed=seed),
                   pair_ascent(f, x0, radius, steps=steps, seed=seed))
