"""Save a copy of a model whose head is scaled to another cap: the same predictions, another L.

Multiplying the head by a positive constant multiplies every logit, so the argmax — and so the
accuracy and every certified radius — is unchanged, while the sound L of the logits scales by that
constant. A head capped at 16 (which cross-entropy needs to learn, docs/results.md) therefore says
nothing about how sensitive the *classifier* is; this script writes the head-cap-1 copy whose sound L
is comparable with MIT's caps-1.0 accounting, checks that its predictions equal the original's on
val batches, and prints both bounds.

    python scripts/rescale_head.py runs/full-pb-ce/final runs/full-pb-ce/head1 --cap 1
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a saved model folder")
    p.add_argument("out", help="where to save the rescaled copy (must not exist)")
    p.add_argument("--cap", type=float, default=1.0, help="the new head cap (RMS→RMS)")
    p.add_argument("--batches", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from copy import deepcopy
    from pathlib import Path

    from lipformer import LipformerForCausalLM
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    if Path(a.out).exists():
        raise SystemExit(f"{a.out} exists; choose a new folder")
    model = LipformerForCausalLM.from_pretrained(a.model).eval()
    copy = deepcopy(model)
    factor = a.cap / model.config.w_max["head"]
    with torch.no_grad():
        copy.head.weight.mul_(factor)
    copy.config.w_max["head"] = a.cap
    copy.head.w_max = a.cap
    recipe = load_recipe(preset="shakespeare-char", overrides=[
        f"model.max_position_embeddings={model.config.max_position_embeddings}", "train.batch_size=16"])
    _, val, _, _ = open_data(recipe)
    val.reset()
    same = total = right = 0
    with torch.no_grad():
        for _ in range(a.batches):
            x, y = val.next_batch()
            p0, p1 = model(x).logits.argmax(-1), copy(x).logits.argmax(-1)
            same += int((p0 == p1).sum())
            right += int((p1 == y).sum())
            total += p0.numel()
    copy.save_pretrained(a.out)
    import shutil
    for f in Path(a.model).glob("tokenizer*"):   # the same tokenizer, so certify/generate work on the copy
        shutil.copy(f, Path(a.out) / f.name)
    b0, b1 = model.bounds(), copy.bounds()
    print(json.dumps({"factor": factor, "same_predictions": same / total, "positions": total, "val_acc": right / total,
                      "L_total_before": b0.total, "L_total_after": b1.total, "L_body": b1.body}))
    return 0 if same == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
