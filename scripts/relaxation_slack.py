"""Where the linear-relaxation certificate loses the margin it needs, position by position.

For sampled val positions that are correct, not certified by the global radius and not by the plain
relaxation at ε (docs/lipschitz.md §10), against the class whose plain relaxation bound is lowest:

- `refined[N]`: the sound lower bound on the margin with the N costliest pairs per block refined
  (`linear_certify.refine_intervals`, §10d), and what it took. Does a larger budget still pay?
- `frozen[b]`, `frozen["all"]`: the bound with block b's maxmin pairs (or every block's) held at
  their clean order, everything else as in the plain check. **Not a certificate**: it is the
  first-order bound for those pairs, the most that perfectly tight intervals could give them
  (roughly: a tight interval can still leave a pair undecided). It shows which block's pairs cost
  the margin most.
- `refined_frozen_last[k]`: on top of the largest N's refined intervals, the k pairs of the last
  block that cost the bound most held at their clean order (not a certificate either). If a few
  pairs carried the slack, splitting them (branch and bound) would certify the position; if it
  takes all of them, the slack is spread thin.

One JSON object per analysed position, then a summary line (how many bounds are > 0 under each).

    python scripts/relaxation_slack.py runs/full-ew2000-w05-s1 --sample 500 --limit 12 --refine 128,512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import certify_val as cv  # noqa: E402  (the sibling script: same model loading, same sample)


def frozen(state, blocks) -> dict:
    """Refined-interval dict (docs/lipschitz.md §10d's format) that pins every pair of `blocks` to a
    zero-width interval at its computed value: the pair's order is taken as fixed. NOT sound."""
    out = {}
    for b in blocks:
        half = state["blocks"][b]["delta"].size(1)
        zero = torch.zeros(state["T"], half, dtype=torch.float64)
        out[b] = (zero, zero)
    return out


def analyse(model, state, t: int, cls: int, eps, budgets: list[int], ks: list[int]) -> dict:
    from lipformer import linear_certify as lc

    tt, cc, ee = torch.tensor([t]), torch.tensor([cls]), eps.expand(1)

    def bound(refined=None) -> float:
        return round(float(lc.margin_lower_bounds(model, state, tt, cc, ee, refined)), 4)

    nb = len(state["blocks"])
    row = {"position": t, "class": cls, "plain": bound(),
           "frozen": {**{str(b): bound(frozen(state, [b])) for b in range(nb)},
                      "all": bound(frozen(state, range(nb)))},
           "refined": {}}
    refined = None
    for n in budgets:
        start = time.time()
        refined = lc.refine_intervals(model, state, tt, cc, eps, n)
        row["refined"][str(n)] = [bound(refined), round(time.time() - start, 1)]
    if refined is not None and ks:
        last, row["refined_frozen_last"] = nb - 1, {}
        for k in ks:
            chosen = {"top": k}                      # marks the k costliest undecided last-block pairs
            lc.margin_lower_bounds(model, state, tt, cc, ee, refined, chosen)
            inf = torch.full_like(state["blocks"][last]["delta"], float("inf"))      # no refined interval: module-wise
            down, up = (x.clone() for x in refined.get(last, (inf, inf)))
            mark = chosen.get(last, torch.zeros_like(down, dtype=torch.bool))
            down[mark], up[mark] = 0.0, 0.0
            row["refined_frozen_last"][str(k)] = bound({**refined, last: (down, up)})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (or a saved model folder)")
    p.add_argument("--preset", default="shakespeare-char", help="the preset whose val split to read")
    p.add_argument("overrides", nargs="*", help="data.* overrides, as for certify_val.py")
    p.add_argument("--sample", type=int, default=500, help="positions drawn as certify_val.py --sample draws them")
    p.add_argument("--batches", type=int, default=4, help="as certify_val.py --batches")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed")
    p.add_argument("--val-seed", type=int, default=1, help="the val windows' seed, as certify_val.py --val-seed")
    p.add_argument("--eps", type=float, default=0.01, help="the radius (max-rms of inputs_embeds)")
    p.add_argument("--limit", type=int, default=12, help="analyse at most this many failing positions")
    p.add_argument("--refine", default="128,512", help="comma-separated pair budgets N, increasing")
    p.add_argument("--freeze-last", default="1,8,1000", help="comma-separated k for refined_frozen_last")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_intermixed_args(argv)
    try:
        budgets = [int(n) for n in a.refine.split(",") if n] if a.refine else []
        ks = [int(k) for k in a.freeze_last.split(",") if k] if a.freeze_last else []
    except ValueError:
        print("relaxation_slack: error: --refine and --freeze-last take comma-separated integers", file=sys.stderr)
        return 2
    from lipformer.training.data import DataError
    from lipformer.training.recipe import RecipeError

    try:
        if not (a.eps > 0 and a.sample >= 1 and a.limit >= 1 and all(n > 0 for n in budgets + ks)):
            raise cv.Refused("--eps, --sample, --limit and every budget must be positive")
        cv.validate(argparse.Namespace(sample=a.sample, batches=a.batches, sequences=1, threads=a.threads,
                                       refine=0, attack=0, val_seed=a.val_seed, overrides=a.overrides))
        rows = slack(a, budgets, ks)
    except (cv.Refused, RecipeError, DataError, OSError) as exc:
        print(f"relaxation_slack: error: {exc}", file=sys.stderr)
        return 2
    n = len(rows)
    summary = {"analysed": n, "eps": a.eps, "positive": {
        "plain": sum(r["plain"] > 0 for r in rows),
        **{f"frozen[{b}]": sum(r["frozen"][b] > 0 for r in rows) for b in (rows[0]["frozen"] if rows else {})},
        **{f"refined[{m}]": sum(r["refined"][m][0] > 0 for r in rows) for m in map(str, budgets)},
        **{f"refined_frozen_last[{k}]": sum(r.get("refined_frozen_last", {}).get(k, -1) > 0 for r in rows)
           for k in map(str, ks)}},
        "note": "frozen* are first-order bounds, NOT certificates; refined[N] are sound"}
    print(json.dumps(summary))
    return 0


def slack(a, budgets: list[int], ks: list[int]) -> list[dict]:
    from lipformer import certify
    from lipformer import linear_certify as lc

    torch.set_num_threads(a.threads)
    model, bounds, val = cv.open_model_and_split(a)
    x, y, chosen, _ = cv.draw_sample(a, model, val)
    eps = torch.tensor(a.eps, dtype=torch.float64)
    rows = []
    for s in chosen.any(1).nonzero().flatten().tolist():
        state = lc.prepare(model, x[s:s + 1])
        _, _, glob = certify.radii_from_hidden(state["clean"].hidden, model.head.weight, bounds)
        open_ = (state["pred"] == y[s]) & chosen[s] & (glob < a.eps)
        if not open_.any():
            continue
        failing = open_ & ~lc.certified_at(model, state, eps, open_)
        for t in failing.nonzero().flatten().tolist():
            V = state["D"].size(1)
            classes = torch.tensor([j for j in range(V) if j != int(state["pred"][t])])
            plain = lc.margin_lower_bounds(model, state, torch.full_like(classes, t), classes,
                                           eps.expand(classes.numel()))
            worst = int(classes[plain.nan_to_num(-float("inf")).argmin()])     # the class the plain check loses to
            row = {"sequence": s, **analyse(model, state, t, worst, eps, budgets, ks)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if len(rows) >= a.limit:
                return rows
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
