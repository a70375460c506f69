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
global certificate is cheap, so the accuracy and the global fraction over the whole set are exact;
what the sample estimates is only the share the relaxation adds on top (sampled positions certified
by the best check and not by the whole-set global pass), and `certified_accuracy[ε]["best"]` = the
global fraction + that share (`best_is_estimate`), with the 95% Wilson interval of the share in
`sample.best_wilson95`. The added share is a few percent, so its interval is about 2.5× narrower than
that of the plain sample fraction (`sample.certified`) at 500 positions.

The random windows are drawn with `--val-seed` (default 1), not with the preset's training seed: the
training loop draws its own val windows with `train.seed + 1`, so a run trained with `train.seed=1`
reports figures on windows of val seed 2 in its `final/certified_accuracy.json`, and the figures here
stay on one population when a preset's seed changes.

`--batches 0` makes the population every full window of the val split instead, read in order
(1,894 windows, 484,864 of its 485,037 positions at full size). The training loop's val batches are
random windows (fixed seed), 256 of them in 4 batches; neighbouring positions share a passage, so a
figure over those windows moves by a few tenths of a point with the draw. `--sample 1 --batches 0`
is a cheap way to get the exact accuracy and global certified fraction over the whole split.

Bad input (a folder without a model, a val split with other token ids, a negative count or radius,
an override outside data.*) is refused with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

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


class Refused(Exception):
    """Input this script will not run on: one line, exit status 2 (DESIGN §8)."""


def parse_eps(text: str) -> list[float]:
    try:
        eps = [float(e) for e in text.split(",")]
    except ValueError:
        raise Refused(f"--eps must be a comma-separated list of radii, got {text!r}") from None
    if not all(math.isfinite(e) and e > 0 for e in eps):
        raise Refused(f"every --eps radius must be finite and positive, got {text!r}")
    return eps


def validate(a) -> None:
    for name, least in (("sample", 0), ("batches", 0), ("sequences", 1), ("threads", 1), ("refine", 0),
                        ("attack", 0), ("val_seed", 1)):
        if getattr(a, name) < least:
            raise Refused(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(a, name)}")
    if a.batches == 0 and not a.sample:
        raise Refused("--batches 0 (the whole val split) needs --sample N; --sample 1 gives its exact accuracy "
                      "and global certified fraction")
    for o in a.overrides:   # the window length and the rest of the recipe are the model's, not the caller's
        if not o.startswith("data."):
            raise Refused(f"only data.* overrides choose the val split here, got {o!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (or a saved model folder)")
    p.add_argument("--preset", default="shakespeare-char", help="the preset whose val split to read")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the data (data.* only), e.g. "
                                                "data.dataset=char_dir data.path=FOLDER")
    p.add_argument("--sequences", type=int, default=32, help="the first N val sequences of the first batch")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="instead of the first sequences: N positions drawn uniformly from the first --batches "
                        "val batches (an unbiased estimate of the fraction over all of them)")
    p.add_argument("--batches", type=int, default=4,
                   help="with --sample: the val batches drawn from; 0: every full window of the val split, "
                        "read in order")
    p.add_argument("--seed", type=int, default=0, help="with --sample: the draw's seed")
    p.add_argument("--val-seed", type=int, default=1,
                   help="the seed of the random val windows (the training loop uses train.seed + 1); 1 is the "
                        "population of every figure in docs/results.md, whatever the preset's train.seed")
    p.add_argument("--eps", default="0.003,0.01", help="comma-separated radii (max-rms of inputs_embeds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="where the relaxation fails, bound the N costliest pairs per block by their own "
                        "backward passes (docs/lipschitz.md §10d; e.g. 32; slow); 0: off")
    p.add_argument("--attack", type=int, default=0, metavar="STEPS",
                   help="PGD (2 starts of STEPS steps) at each ε on the correct positions no certificate covers: "
                        "what is left unflipped bounds the robust accuracy from above")
    a = p.parse_intermixed_args(argv)
    from lipformer.training.data import DataError
    from lipformer.training.recipe import RecipeError

    try:
        validate(a)
        out = certify_val(a, parse_eps(a.eps))
    except (Refused, RecipeError, DataError, OSError) as exc:
        print(f"certify_val: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def open_model_and_split(a):
    """(float64 model, its bounds, the val dataset), refusing a model the relaxation does not support
    and a val split whose tokens are not the model's."""
    import transformers

    from lipformer import LipformerForCausalLM, certify
    from lipformer import linear_certify as lc
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    folder = Path(a.run) / "final" if (Path(a.run) / "final").is_dir() else Path(a.run)
    if not (folder / "config.json").is_file():
        raise Refused(f"{a.run} is neither a run folder with final/ nor a saved model folder")
    transformers.utils.logging.disable_progress_bar()   # a loading bar would split the one-line refusals
    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(folder))
    if lc.unsupported(model):
        raise Refused(lc.unsupported(model))
    T = model.config.max_position_embeddings
    recipe = load_recipe(preset=a.preset, overrides=[f"model.max_position_embeddings={T}", *a.overrides])
    # The loop draws its val windows with train.seed + 1; pinning the draw here keeps the population the
    # same when a preset's training seed changes (--val-seed 1 = a preset with the default seed 0).
    recipe.train = dataclasses.replace(recipe.train, seed=a.val_seed - 1)
    _, val, tokenizer, vocab = open_data(recipe)
    if vocab > model.config.vocab_size:
        raise Refused(f"the val split has {vocab} token ids, the model only {model.config.vocab_size}")
    if (folder / "tokenizer.json").is_file():   # same size is not enough: the same ids must mean the same text
        if transformers.AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
            raise Refused(f"the val split's vocabulary is not the one saved with the model in {folder}")
    return model, model.bounds(), val


def draw_sample(a, model, val):
    """(inputs, targets, chosen, population): the population's sequences (S, T), and the bool mask
    (S, T) of the a.sample positions drawn uniformly from it without replacement (seed a.seed)."""
    from lipformer.training.data.dataset import TokenDataset

    val.reset()
    if a.batches == 0:   # every full window of one in-order pass over the split's files
        val = TokenDataset(val.files, 1, val.seq_len, shuffle=False, vocab_size=model.config.vocab_size)
        population = f"every full {val.seq_len}-token window of the val split, in order"
    else:
        population = f"the first {a.batches} val batches (random windows, val seed {a.val_seed})"
    rows = [val.next_batch() for _ in range(a.batches or val.batches_per_epoch)]
    x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    S, T = x.shape
    if a.sample > S * T:
        raise Refused(f"--sample {a.sample} is more than the {S * T} positions of {population}")
    pick = torch.randperm(S * T, generator=torch.Generator().manual_seed(a.seed))[:a.sample]
    chosen = torch.zeros(S * T, dtype=torch.bool)
    chosen[pick] = True
    return x, y, chosen.reshape(S, T), population


def certify_val(a, eps: list[float]) -> dict:
    from lipformer import certify

    torch.set_num_threads(a.threads)
    model, bounds, val = open_model_and_split(a)
    val.reset()
    counts = {e: {"global": 0, "best": 0, "flipped": 0} for e in eps}
    correct = total = 0
    start = time.time()
    if not a.sample:
        x, y = val.next_batch()
        for row in range(min(a.sequences, x.size(0))):
            mask = torch.ones(x.size(1), dtype=torch.bool)
            right, res = check(model, bounds, x[row:row + 1], y[row], mask, eps, a.refine, a.attack)
            correct += tally(counts, right, res)
            total += right.numel()
        out = {"run": str(a.run),
               "population": f"the first {total // x.size(1)} sequences of the first val batch (val seed {a.val_seed})",
               "positions": total, "accuracy": correct / total,
               "certified_accuracy": {f"{e:g}": {m: c[m] / total for m in ("global", "best")}
                                      for e, c in counts.items()}}
        if a.attack:     # no certificate can certify more than the attack leaves standing
            out["robust_upper"] = {f"{e:g}": (correct - c["flipped"]) / total for e, c in counts.items()}
    else:
        x, y, chosen, population = draw_sample(a, model, val)
        S, T = x.shape
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
        gain = dict.fromkeys(eps, 0)   # sampled positions the best check certifies and `every` does not
        disagree = 0        # batched vs one-sequence float64 passes: rounding could differ (counted, expect 0)
        for row in chosen.any(1).nonzero().flatten().tolist():
            right, res = check(model, bounds, x[row:row + 1], y[row], chosen[row], eps, a.refine, a.attack)
            correct += tally(counts, right, res)
            for e in eps:
                gain[e] += int((res[e][1] & ~every[e][row]).sum())
                disagree += int((res[e][0] != (every[e][row] & chosen[row])).sum())
        total, N = a.sample, S * T
        base = {e: int(every[e].sum()) / N for e in eps}
        # Exact over the population: accuracy and the global certificate. Estimated: what the best check
        # adds on top (counted against the same global masks, so no position is counted twice).
        out = {"run": str(a.run), "population": population, "positions": N, "accuracy": right_all / N,
               "certified_accuracy": {f"{e:g}": {"global": base[e], "best": base[e] + gain[e] / total}
                                      for e in eps},
               "best_is_estimate": True}
        out["sample"] = {"positions": total, "seed": a.seed, "accuracy": correct / total,
                         "certified": {f"{e:g}": {m: c[m] / total for m in ("global", "best")}
                                       for e, c in counts.items()},
                         "accuracy_wilson95": wilson(correct, total),
                         "added_share": {f"{e:g}": gain[e] / total for e in eps},
                         "best_wilson95": {f"{e:g}": tuple(base[e] + w for w in wilson(gain[e], total)) for e in eps},
                         "global_disagreements": disagree}
        if a.attack:     # exact accuracy minus the sampled share the attack flips
            out["robust_upper"] = {f"{e:g}": (right_all / N - c["flipped"] / total) for e, c in counts.items()}
            out["sample"]["robust_upper_wilson95"] = {
                f"{e:g}": tuple(right_all / N - w for w in reversed(wilson(c["flipped"], total)))
                for e, c in counts.items()}
    out.update({"lipschitz_body": bounds.body, "seconds": round(time.time() - start, 1), "refine": a.refine,
                "note": "best = global radius, or per class the module-wise local radius or the linear relaxation"})
    return out


if __name__ == "__main__":
    from lipformer.training.allocator import retain_freed_memory
    retain_freed_memory()  # a whole process of large certificate batches: reuse their pages (allocator.py)
    raise SystemExit(main())
