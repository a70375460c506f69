"""Is there a local certificate to gain in a maxmin MLP? Per token, the norm of the MLP sublayer's
Jacobian at the actual input against what the global bound charges for it.

Where no pair of maxmin's inputs is tied, its Jacobian at z_t = W_in x_t is a permutation P_t, so
the MLP's Jacobian is J_t = W_out P_t W_in and the residual sublayer's is (1−α)I + αJ_t. The global
bound charges σ(W_out)·σ(W_in) and (1−α) + α·σ(W_out)·σ(W_in). If ‖J_t‖ were well below the product
on real inputs, a local certificate that linearizes maxmin (fixing the pairs the perturbation cannot
reorder) would pay less than the global one; a ratio near 1 says it cannot. A diagnostic of
*measured* norms at sampled points (not a bound): it decides whether such a certificate is worth
building.

    python scripts/mlp_local_norm.py runs/full-mm --sequences 2 --stride 8
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (a maxmin model)")
    p.add_argument("--preset", default="shakespeare-char", help="the preset whose val split to read")
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--stride", type=int, default=8, help="every stride-th position of each sequence")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from lipformer import LipformerForCausalLM, certify
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(f"{a.run}/final"))
    if model.config.activation != "maxmin":
        raise SystemExit("mlp_local_norm: the model's activation is not maxmin")
    recipe = load_recipe(preset=a.preset, overrides=[f"model.max_position_embeddings={model.config.max_position_embeddings}"])
    _, val, _, _ = open_data(recipe)
    val.reset()
    x, _ = val.next_batch()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [blk.mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, blk in enumerate(model.model.layers)]
    with torch.no_grad():
        model.model(x[:a.sequences], use_cache=False)
    for h in hooks:
        h.remove()
    alpha = model.config.residual_alpha
    rows = []
    with torch.no_grad():
        for i, blk in enumerate(model.model.layers):
            W_in, W_out = blk.mlp.fc_in.weight, blk.mlp.fc_out.weight
            product = float(torch.linalg.matrix_norm(W_out, 2) * torch.linalg.matrix_norm(W_in, 2))
            half = W_in.size(0) // 2
            tokens = inputs[i][:, ::a.stride].reshape(-1, W_in.size(1))
            z = tokens @ W_in.T
            first = (z[:, :half] >= z[:, half:]).double()[..., None]           # which half wins each pair
            top, bottom = W_in[:half], W_in[half:]
            J_act_in = torch.cat((first * top + (1 - first) * bottom, (1 - first) * top + first * bottom), dim=1)
            J = W_out @ J_act_in                                                # (tokens, d, d)
            eye = torch.eye(J.size(-1), dtype=J.dtype)
            mlp = torch.linalg.matrix_norm(J, 2) / product
            sub = torch.linalg.matrix_norm((1 - alpha) * eye + alpha * J, 2) / ((1 - alpha) + alpha * product)
            q = lambda t: [round(float(v), 3) for v in t.quantile(torch.tensor([0.0, 0.5, 1.0], dtype=t.dtype))]  # noqa: E731
            rows.append({"layer": i, "sigma_out_sigma_in": round(product, 4), "tokens": int(J.size(0)),
                         "mlp_local_over_global_min_median_max": q(mlp),
                         "sublayer_local_over_global_min_median_max": q(sub)})
    print(json.dumps({"run": a.run, "alpha": alpha, "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
