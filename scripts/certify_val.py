"""Certified-and-correct accuracy of a trained position-only maxmin model at fixed radii, with the
linear-relaxation certificate (docs/lipschitz.md §10) next to the global one, on many val positions.

The training loop's final certificate searches each position's radius on a few sequences; at fixed
radii only the positions the global certificate leaves open need the relaxation, which makes tens
of sequences affordable. For every ε: a position counts when its prediction is correct and either
the global radius reaches ε or `linear_certify.certified_at` certifies it (each competing class
ruled out by the module-wise local radius or the relaxation). Results as one JSON object.

    python scripts/certify_val.py runs/full-mm --sequences 32 --eps 0.003,0.01
    python scripts/certify_val.py runs/full-mm --sequences 4 --eps 0.01 --refine 32   # §10d, slower
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (or a saved model folder)")
    p.add_argument("--preset", default="shakespeare-char", help="the preset whose val split to read")
    p.add_argument("--sequences", type=int, default=32, help="the first N val sequences of the first batch")
    p.add_argument("--eps", default="0.003,0.01")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="where the relaxation fails, bound the N costliest pairs per block by their own "
                        "backward passes (docs/lipschitz.md §10d; e.g. 32; slow); 0: off")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from pathlib import Path

    from lipformer import LipformerForCausalLM, certify
    from lipformer import linear_certify as lc
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    folder = Path(a.run) / "final" if (Path(a.run) / "final").is_dir() else Path(a.run)
    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(folder))
    if lc.unsupported(model):
        raise SystemExit(f"certify_val: {lc.unsupported(model)}")
    recipe = load_recipe(preset=a.preset, overrides=[f"model.max_position_embeddings={model.config.max_position_embeddings}"])
    _, val, _, _ = open_data(recipe)
    val.reset()
    x, y = val.next_batch()
    n = min(a.sequences, x.size(0))
    eps = [float(e) for e in a.eps.split(",")]
    bounds = model.bounds()
    counts = {f"{e:g}": {"global": 0, "best": 0} for e in eps}
    correct = total = 0
    start = time.time()
    for row in range(n):
        ids = x[row:row + 1]
        state = lc.prepare(model, ids)
        _, _, glob = certify.radii_from_hidden(state["clean"].hidden, model.head.weight, bounds)
        right = state["pred"] == y[row]
        correct += int(right.sum())
        total += right.numel()
        for e in eps:
            ok_g = right & (glob >= e)
            ok = ok_g | lc.certified_at(model, state, torch.tensor(e, dtype=torch.float64), right & ~ok_g,
                                        refine=a.refine)
            counts[f"{e:g}"]["global"] += int(ok_g.sum())
            counts[f"{e:g}"]["best"] += int(ok.sum())
    out = {"run": str(a.run), "positions": total, "accuracy": correct / total,
           "certified_accuracy": {k: {m: v / total for m, v in c.items()} for k, c in counts.items()},
           "lipschitz_body": bounds.body, "seconds": round(time.time() - start, 1), "refine": a.refine,
           "note": "best = global radius, or per class the module-wise local radius or the linear relaxation"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
