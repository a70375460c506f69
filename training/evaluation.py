"""Evaluation during and after training: val loss/accuracy and certified-and-correct accuracy."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lipformer import certify

from .recipe import RecipeError


def autocast(dtype: str, device: torch.device):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise RecipeError(f"train.dtype must be float32 or bfloat16, got {dtype!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    """Does this CPU run bf16 matmuls natively (oneDNN's check: AVX512 or AMX)? Without, torch emulates
    them: on a 2-core AVX2 EPYC a bf16 matmul ran 7× slower than float32 and a bf16-autocast
    `shakespeare-char` step 28× slower (docs/benchmarks.md, "bf16 on a CPU without native bf16")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # the private op moved: nothing known, so change nothing
        return True


@torch.no_grad()
def evaluate(model, val, batches: int, dtype: str, device) -> dict:
    """Validation loss and next-token accuracy on `batches` batches, from a fixed position."""
    state = val.state_dict()
    val.reset()
    model.eval()
    losses, correct, total = [], 0, 0
    for _ in range(batches):
        x, y = (t.to(device) for t in val.next_batch())
        with autocast(dtype, device):
            logits = model(x, use_cache=False).logits
        losses.append(float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))))
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    model.train()
    val.load_state_dict(state)
    return {"val_loss": sum(losses) / len(losses), "val_acc": correct / total}


@torch.no_grad()
def certified_accuracy(model, val, radii, batches: int = 4, local_sequences: int = 4) -> dict:
    """Fraction of val next-token predictions that are correct AND certified at radius ε.

    `certified_accuracy` uses the best sound certificate on the first `local_sequences` val
    sequences: the local or global radius (docs/lipschitz.md §9, §6), and for position-only maxmin
    models the linear relaxation (§10), checked at each ε for the correct positions the others leave
    open. `certified_accuracy_local`, `_global` and `_module` (the larger of those two) are on the
    same positions, and `certified_accuracy_global_all` is the global radius on every position of
    `batches` val batches.
    """
    m64 = certify.float64_copy(model).cpu()
    bounds = m64.bounds()
    state = val.state_dict()
    val.reset()
    keys = [f"{r:g}" for r in radii]
    linear = certify.linear_certify.unsupported(m64) is None
    hits = {name: dict.fromkeys(keys, 0) for name in ("best", "module", "local", "global", "global_all")}
    correct = total = local_total = 0
    for _ in range(batches):
        x, y = val.next_batch()
        if x.size(1) > m64.config.max_position_embeddings:
            raise ValueError("certified_accuracy: val sequences are longer than the bounds allow")
        hidden = m64.model(x.cpu(), use_cache=False).last_hidden_state
        # positions are independent: certify every (row, t) of the batch in one call
        pred, _, radius = certify.radii_from_hidden(hidden, m64.head.weight, bounds)
        ok = pred == y.reshape(-1)
        correct += int(ok.sum())
        total += y.numel()
        _count(hits["global_all"], radii, ok, radius)
        for row in range(min(x.size(0), local_sequences - local_total // x.size(1))):
            certs = certify.certify_tokens(m64, x[row].tolist(), bounds, method="local")
            right = torch.tensor([c.prediction for c in certs]) == y[row].cpu()
            loc, glob = (torch.tensor([getattr(c, f) for c in certs]) for f in ("radius_local", "radius_global"))
            module = torch.maximum(loc, glob)
            for name, r in (("local", loc), ("global", glob), ("module", module)):
                _count(hits[name], radii, right, r)
            relaxed = certify.linear_certify.prepare(m64, x[row:row + 1].cpu()) if linear else None
            # largest radius first: a prediction certified on a ball is certified on every smaller
            # ball, so a position the relaxation settles at r is not checked again below r
            settled = torch.zeros_like(right)
            for r, key in sorted(zip(radii, keys), reverse=True):
                open_ = right & (module < r) & ~settled
                if relaxed is not None and open_.any():
                    settled |= certify.linear_certify.certified_at(
                        m64, relaxed, torch.tensor(r, dtype=torch.float64), open_)
                hits["best"][key] += int((right & ((module >= r) | settled)).sum())
            local_total += len(certs)
    val.load_state_dict(state)
    share = lambda counts, n: {k: v / max(1, n) for k, v in counts.items()}  # noqa: E731
    return {"accuracy": correct / total, "certified_accuracy": share(hits["best"], local_total),
            "certified_accuracy_module": share(hits["module"], local_total),
            "certified_accuracy_local": share(hits["local"], local_total),
            "certified_accuracy_global": share(hits["global"], local_total),
            "certified_accuracy_global_all": share(hits["global_all"], total),
            "lipschitz_total": bounds.total, "lipschitz_body": bounds.body, "positions": total,
            "local_positions": local_total}


def _count(counts: dict, radii, correct: torch.Tensor, radius: torch.Tensor) -> None:
    for r in radii:
        counts[f"{r:g}"] += int((correct & (radius >= r)).sum())


def bigram_accuracy(train, val) -> float:
    """Next-token accuracy on `val` of the table "most frequent next token after each token", counted
    on `train`: what reading only the previous token achieves, so a model above it uses more context."""
    import numpy as np

    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    vocab = int(max(train.max(initial=0), val.max(initial=0))) + 1
    counts = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab)
    table = counts.argmax(1)
    return float((table[val[:-1]] == val[1:]).mean()) if len(val) > 1 else float("nan")
