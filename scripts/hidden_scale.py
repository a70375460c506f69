"""Signal vs worst case at the head: how big the final hidden states are, how far each correct
prediction sits from its nearest decision boundary (D_t), and the global certificate's e_N(ε).

For a run of the d 128 proxy (seq 64) on its first 16 val sequences. D_t = min_j (z_y − z_j)/‖w_y − w_j‖
is the ℓ2 distance the final hidden state may move before the argmax can change; the global
certificate at ε allows it to move e_N = √d·L_body·ε. A position is certified at ε when D_t > e_N.

    python scripts/hidden_scale.py runs/pb/pb-c0-a0.5-h16 --eps 0.01
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--sequences", type=int, default=16)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from lipformer import LipformerForCausalLM, certify
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    recipe = load_recipe(preset="shakespeare-char", overrides=["model.max_position_embeddings=64", "train.batch_size=32"])
    _, val, _, vocab = open_data(recipe)
    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(f"{a.run}/final"))
    bounds = model.bounds()
    val.reset()
    x, y = val.next_batch()
    x, y = x[:a.sequences], y[:a.sequences]
    with torch.no_grad():
        h = model.model(x, use_cache=False).last_hidden_state
        z = model.head(h)
        W = model.head.weight
        pred = z.argmax(-1)
        ok = pred == y
        gap = z.gather(-1, pred[..., None]) - z
        dist = (W[pred][..., None, :] - W[None, None]).norm(dim=-1)
        D = (gap / dist.clamp(min=1e-300)).masked_fill(torch.nn.functional.one_hot(pred, vocab).bool(), math.inf)
        D = D.min(-1).values
    e_N = math.sqrt(h.size(-1)) * bounds.body * a.eps
    quant = lambda t: [round(float(v), 4) for v in t.quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=t.dtype))]  # noqa: E731
    print(json.dumps({"run": a.run, "L_body": bounds.body, "eps": a.eps, "e_N_global": e_N,
                      "hidden_rms_median": float(h.pow(2).mean(-1).sqrt().median()),
                      "D_t_correct_quantiles_10_25_50_75_90": quant(D[ok]),
                      "share_of_correct_with_D_above_e_N": float((D[ok] > e_N).double().mean())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
