"""Certified-and-correct accuracy of a trained position-only maxmin model at fixed radii, with the
linear-relaxation certificate (docs/lipschitz.md §10) next to the global one, on many val positions.

The training loop's final certificate searches each position's radius on a few sequences; at fixed
radii only the positions the global certificate leaves open need the relaxation, which makes tens
of sequences affordable. For every ε: a position counts when its prediction is correct and either
the global radius reaches ε or `linear_certify.certified_at` certifies it (each competing class
ruled out by the module-wise local radius or the relaxation). Results as one JSON object.

    python scripts/certify_val.py runs/full-mm --sequences 32 --eps 0.003,0.01
    python scripts/certify_val.py runs/full-mm --sequences 4 --eps 0.01 --refine 32   # §10d, slower
    python scripts/certify_val.py runs/full-mm --sample 512 --eps 0.01 --refine 128
    python scripts/certify_val.py RUN --preset tiny data.dataset=char_dir data.path=FOLDER   # another val split

`--sample N` estimates the fraction over every position of the first `--batches` val batches (the
set the training loop's `certified_accuracy_global_all` counts; 4 × 64 × 256 = 65,536 at full size)
from N positions drawn uniformly from it without replacement: the first sequences of the split are
an easier slice, and the refined check is too slow for all of them on a CPU. Each sampled
position's certificate is sound; the fraction over the whole set is a statistical estimate. The
global certificate is cheap, so its fraction over the whole set is exact (`global_all`); what the
sample estimates is only the share the relaxation adds on top (positions certified by the best
check and not by the global radius), and `best_estimate` = global_all + that share, with the 95%
Wilson interval of the share. The added share is a few percent, so its interval is about 2.5× narrower
than that of the plain sample fraction (also reported) at 500 positions.

`--batches 0` makes the population the whole val split instead, read in order (every full batch:
475,136 positions at full size). The training loop's val batches are random windows (fixed seed),
256 of them in 4 batches; neighbouring positions share a passage, so a figure over those windows
moves by a few tenths of a point with the draw. `--sample 1 --batches 0` is a cheap way to get the
exact accuracy and global certified fraction over the whole split.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def flips(model, ids, pred, open_, e: float, steps: int, seeds=(0, 1)) -> torch.Tensor:
    """(T,) bool: positions of `open_` whose prediction a PGD attack (`certify.attack`, one random
    start per seed) changes with a perturbation of max-rms e."""
    from lipformer import certify

    out = torch.zeros_like(open_)
    where = open_.nonzero().flatten().tolist()
    for i in range(0, len(where), 16):
        targets = [certify.PositionCertificate(index=t, token=int(ids[0, t]), prediction=int(pred[t]), margin=0.0,
                                               radius=e) for t in where[i:i + 16]]
        for seed in seeds:
            out[certify.attack(model, ids[0].tolist(), targets, steps=steps, max_positions=16, seed=seed)["flipped"]] = True
    return out


def check(model, bounds, ids, y, positions, eps: list[float], refine: int, attack: int = 0):
    """For one sequence: (correct, {ε: (global ok, best ok, flipped)}) at the bool mask `positions`
    (T,), every mask restricted to those positions; `flipped` (with attack > 0 PGD steps): correct,
    not certified, and changed by an attack at ε. Radii largest first: a position certified at ε is
    certified at every smaller ε."""
    from lipformer import certify
    from lipformer import linear_certify as lc

    state = lc.prepare(model, ids)
    _, _, glob = certify.radii_from_hidden(state["clean"].hidden, model.head.weight, bounds)
    right = (state["pred"] == y) & positions
    settled = torch.zeros_like(right)
    out = {}
    for e in sorted(eps, reverse=True):
        ok_g = right & (glob >= e)
        open_ = right & ~ok_g & ~settled
        if open_.any():
            settled |= lc.certified_at(model, state, torch.tensor(e, dtype=torch.float64), open_, refine=refine)
        best = ok_g | settled
        flipped = flips(model, ids, state["pred"], right & ~best, e, attack) if attack else torch.zeros_like(best)
        out[e] = (ok_g, best, flipped)
    return right, out


def tally(counts: dict, right, res: dict) -> int:
    """Add one sequence's masks from `check` to counts[ε]; returns its number of correct positions."""
    for e, masks in res.items():
        for name, mask in zip(("global", "best", "flipped"), masks):
            counts[e][name] += int(mask.sum())
    return int(right.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (or a saved model folder)")
    p.add_argument("--preset", default="shakespeare-char", help="the preset whose val split to read")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the data, e.g. data.dataset=char_dir "
                                                "data.path=FOLDER")
    p.add_argument("--sequences", type=int, default=32, help="the first N val sequences of the first batch")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="instead of the first sequences: N positions drawn uniformly from the first --batches "
                        "val batches (an unbiased estimate of the fraction over all of them)")
    p.add_argument("--batches", type=int, default=4,
                   help="with --sample: the val batches drawn from; 0: the whole val split, read in order")
    p.add_argument("--seed", type=int, default=0, help="with --sample: the draw's seed")
    p.add_argument("--eps", default="0.003,0.01")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="where the relaxation fails, bound the N costliest pairs per block by their own "
                        "backward passes (docs/lipschitz.md §10d; e.g. 32; slow); 0: off")
    p.add_argument("--attack", type=int, default=0, metavar="STEPS",
                   help="PGD (2 starts of STEPS steps) at each ε on the correct positions no certificate covers: "
                        "what is left unflipped bounds the robust accuracy from above")
    a = p.parse_intermixed_args(argv)
    torch.set_num_threads(a.threads)
    from pathlib import Path

    from lipformer import LipformerForCausalLM, certify
    from lipformer import linear_certify as lc
    from lipformer.training.data.dataset import TokenDataset
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    folder = Path(a.run) / "final" if (Path(a.run) / "final").is_dir() else Path(a.run)
    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(folder))
    if lc.unsupported(model):
        raise SystemExit(f"certify_val: {lc.unsupported(model)}")
    recipe = load_recipe(preset=a.preset, overrides=[f"model.max_position_embeddings={model.config.max_position_embeddings}", *a.overrides])
    _, val, _, _ = open_data(recipe)
    val.reset()
    eps = [float(e) for e in a.eps.split(",")]
    bounds = model.bounds()
    counts = {e: {"global": 0, "best": 0, "flipped": 0} for e in eps}
    correct = total = 0
    start = time.time()
    if a.sample:
        if a.batches == 0:   # every full batch of one in-order pass over the split's files
            val = TokenDataset(val.files, val.batch_size, val.seq_len, shuffle=False)
        rows = [val.next_batch() for _ in range(a.batches or val.batches_per_epoch)]
        x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        S, T = x.shape
        if a.sample > S * T:
            raise SystemExit(f"certify_val: --sample {a.sample} is more than the {S * T} positions of {a.batches} batches")
        pick = torch.randperm(S * T, generator=torch.Generator().manual_seed(a.seed))[:a.sample]
        chosen = torch.zeros(S * T, dtype=torch.bool)
        chosen[pick] = True
        chosen = chosen.reshape(S, T)
        every = {e: torch.zeros(S, T, dtype=torch.bool) for e in eps}   # the global certificate, every position
        right_all = 0
        with torch.no_grad():
            for i in range(0, S, 16):
                hidden = model.model(x[i:i + 16], use_cache=False).last_hidden_state
                pred, _, radius = certify.radii_from_hidden(hidden, model.head.weight, bounds)
                ok = pred == y[i:i + 16].reshape(-1)
                right_all += int(ok.sum())
                for e in eps:
                    every[e][i:i + 16] = (ok & (radius >= e)).reshape(-1, T)
        everywhere = {e: int(every[e].sum()) for e in eps}
        disagree = 0        # batched vs one-sequence float64 passes: rounding could differ (counted, expect 0)
        for row in chosen.any(1).nonzero().flatten().tolist():
            right, res = check(model, bounds, x[row:row + 1], y[row], chosen[row], eps, a.refine, a.attack)
            correct += tally(counts, right, res)
            disagree += sum(int((res[e][0] != (every[e][row] & chosen[row])).sum()) for e in eps)
        total = a.sample
    else:
        x, y = val.next_batch()
        for row in range(min(a.sequences, x.size(0))):
            mask = torch.ones(x.size(1), dtype=torch.bool)
            right, res = check(model, bounds, x[row:row + 1], y[row], mask, eps, a.refine, a.attack)
            correct += tally(counts, right, res)
            total += right.numel()
    out = {"run": str(a.run), "positions": total, "accuracy": correct / total,
           "certified_accuracy": {f"{e:g}": {m: c[m] / total for m in ("global", "best")} for e, c in counts.items()},
           "lipschitz_body": bounds.body, "seconds": round(time.time() - start, 1), "refine": a.refine,
           "note": "best = global radius, or per class the module-wise local radius or the linear relaxation"}
    if a.attack:     # no certificate can certify more than the attack leaves standing
        out["robust_upper"] = {f"{e:g}": (correct - c["flipped"]) / total for e, c in counts.items()}
    if a.sample:
        out["sample"] = {"drawn_from": S * T, "batches": a.batches, "seed": a.seed,
                         "accuracy_wilson95": wilson(correct, total),
                         "certified_wilson95": {f"{e:g}": {m: wilson(c[m], total) for m in ("global", "best")}
                                                for e, c in counts.items()},
                         "global_all": {f"{e:g}": everywhere[e] / (S * T) for e in eps},
                         "global_disagreements": disagree}
        for e in eps:
            gain = counts[e]["best"] - counts[e]["global"]   # best ⊇ global position by position
            lo, hi = wilson(gain, total)
            base = everywhere[e] / (S * T)
            out["sample"].setdefault("best_estimate", {})[f"{e:g}"] = {
                "value": base + gain / total, "wilson95": (base + lo, base + hi), "added_share": gain / total}
        out["sample"]["accuracy_all"] = right_all / (S * T)
        if a.attack:     # the same split for the attack: exact accuracy minus the sampled flipped share
            for e in eps:
                lo, hi = wilson(counts[e]["flipped"], total)
                acc = right_all / (S * T)
                out["sample"].setdefault("robust_upper_estimate", {})[f"{e:g}"] = {
                    "value": acc - counts[e]["flipped"] / total, "wilson95": (acc - hi, acc - lo)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
