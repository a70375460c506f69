"""Is a model's *certified* accuracy above what any 1-character predictor can score, on the same positions?

For the first N val sequences (seq 64 as in the d 128 proxy, or --seq): accuracy, certified-and-correct at
ε ∈ {1e-3, 3e-3, 1e-2, 3e-2} with the best sound radius (local or global, docs/lipschitz.md §9), its
standard error over sequences (positions within a sequence are correlated), and two references on
exactly those positions — the train-counted most-frequent-next-character table, and the oracle
table fitted on these very positions (the best any function of the current character alone can do).

    python scripts/certified_context.py runs/f300/c8-mlpin4 --sequences 128
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with final/ (trained by scripts/sweep_front.py)")
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=64, help="sequence length (256 for the full-size preset)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lipformer import LipformerForCausalLM, certify
    from lipformer.training import data as D
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    recipe = load_recipe(preset="shakespeare-char", overrides=[f"model.max_position_embeddings={a.seq}",
                                                              "train.batch_size=32"])
    train, val, _, vocab = open_data(recipe)
    tokens = np.concatenate([np.asarray(D.load_tokens(f)) for f in train.files]).astype(np.int64)
    table = torch.tensor(np.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab)
                         .reshape(vocab, vocab).argmax(1))
    model = certify.float64_copy(LipformerForCausalLM.from_pretrained(f"{a.run}/final"))
    bounds = model.bounds()
    val.reset()
    xs, right, radius, t0 = [], [], [], time.time()
    while len(right) < a.sequences:
        x, y = val.next_batch()
        for row in range(min(x.size(0), a.sequences - len(right))):
            certs = certify.certify_tokens(model, x[row].tolist(), bounds, method="best")
            right.append(torch.tensor([c.prediction for c in certs]) == y[row])
            radius.append(torch.tensor([c.radius for c in certs]))
            xs.append((x[row], y[row]))
    ok, r = torch.cat(right), torch.cat(radius)
    cur, nxt = torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs])
    counts = np.zeros((vocab, vocab), dtype=np.int64)
    np.add.at(counts, (cur.numpy(), nxt.numpy()), 1)
    per_seq = torch.stack([(o & (rr >= 1e-3)).double().mean() for o, rr in zip(right, radius)])
    per_seq_2 = torch.stack([(o & (rr >= 1e-2)).double().mean() for o, rr in zip(right, radius)])
    out = {"run": a.run, "sequences": a.sequences, "positions": ok.numel(), "acc": float(ok.double().mean()),
           "table_acc": float((table[cur] == nxt).double().mean()),
           "oracle_table_acc": float(counts.max(1).sum() / len(cur)),
           "certified_best": {f"{e:g}": float((ok & (r >= e)).double().mean()) for e in (1e-3, 3e-3, 1e-2, 3e-2)},
           "certified_1e-3_stderr": float(per_seq.std() / len(per_seq) ** 0.5),
           "certified_1e-3_where_table_wrong": float((ok & (r >= 1e-3) & (table[cur] != nxt)).double().mean()),
           "certified_1e-2_stderr": float(per_seq_2.std() / len(per_seq_2) ** 0.5),
           "certified_1e-2_where_table_wrong": float((ok & (r >= 1e-2) & (table[cur] != nxt)).double().mean()),
           "median_radius_best": float(r.median()), "seconds": time.time() - t0}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
