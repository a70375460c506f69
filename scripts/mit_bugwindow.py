"""Does MIT's caps-1.0 accuracy need the May 7–9 2025 forward? A proxy through lipformer's loop.

In Arongil/lipschitz-transformers between 5103286 (May 7) and b725f15 (May 9) `Mul` had
sensitivity 1 and `forward = x * sensitivity`, so every scalar multiplier was a no-op: the residual
(1−α)x + α·f(x) became x + f(x), the attention's 1/3 and the softmax scale vanished (docs/results.md,
"MIT comparison"). This script trains the same recipe twice through `lipformer.training.train.run`:

    real       lipformer's architecture (convex residual α = 1/(2N), W_o/3) — what the bound describes
    bugwindow  the May 7–9 forward: x + attn(x), x + mlp(x), no /3 (softmax scale 1 in both)

The bugwindow variant exists only inside this process (a patch of `Block.forward`); its sound
global bound is recomputed here for a sum residual (L ≤ Π(1 + L_f)). Its certificate from the
training loop is not used: the library's bound describes the real forward.

    python scripts/mit_bugwindow.py --out runs/bugwindow --steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from lipformer import nn as lnn
from lipformer.training.recipe import load_recipe
from lipformer.training.train import run

sys.path.insert(0, str(Path(__file__).parent))
from mit_accounting import mit_lipschitz  # noqa: E402


@contextlib.contextmanager
def bugwindow_forward():
    """Block.forward = x + attn(x), then x + mlp(x); attention output W_o·attn(V) without /3."""
    old_forward, old_div = lnn.Block.forward, lnn.ATTENTION_DIVISOR

    def forward(self, x, rope, mask=None, cache=None, layer_idx=None):
        x = x + self.attn(x, rope, mask, cache, layer_idx)
        return x + self.mlp(x)

    lnn.Block.forward, lnn.ATTENTION_DIVISOR = forward, 1.0
    try:
        yield
    finally:
        lnn.Block.forward, lnn.ATTENTION_DIVISOR = old_forward, old_div


@torch.no_grad()
def sum_residual_bound(model) -> float:
    """Sound global L (inputs_embeds → logits) of the bugwindow forward: x + f(x) per sublayer,
    attention without /3. Uses each module's own bound (σ from the sound `sigma_upper`)."""
    B = model.model.ball.radius
    L = 1.0
    for layer in model.model.layers:
        for branch in (layer.attn, layer.mlp):
            b = branch.bound(B)  # called inside bugwindow_forward: ATTENTION_DIVISOR is 1 there
            L *= 1.0 + b.lipschitz
            B = B + b.output
    return L * model.head.norm_upper()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bugwindow")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variants", default="real,bugwindow")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="extra recipe overrides (section.key=value)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["model.hidden_size=128", "model.num_hidden_layers=3", "model.num_attention_heads=4",
            "model.max_position_embeddings=64", "train.batch_size=32", f"train.max_steps={a.steps}",
            "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=8", "train.checkpoint_every=0",
            "train.log_every=50"]
    for variant in a.variants.split(","):
        recipe = load_recipe(preset="shakespeare-char", overrides=base + list(a.overrides))
        recipe.train.certify_radii = [0.001, 0.01, 0.03]
        t0 = time.time()
        with bugwindow_forward() if variant == "bugwindow" else contextlib.nullcontext():
            res = run(recipe, out / variant, overwrite=True, progress=False, log=lambda *_: None)
            from lipformer import LipformerForCausalLM
            model = LipformerForCausalLM.from_pretrained(out / variant / "final").double()
            sound = sum_residual_bound(model) if variant == "bugwindow" else model.bounds().total
            from lipformer.training.evaluation import evaluate
            from lipformer.training.train import open_data
            _, val, _, _ = open_data(recipe)
            ev = evaluate(model.float(), val, 16, "float32", torch.device("cpu"))
        row = {"variant": variant, "overrides": list(a.overrides), "steps": a.steps, **ev,
               "sound_L": sound, "mit_L_NOT_SOUND": mit_lipschitz(model),
               "certified_accuracy": res.get("certified_accuracy") if variant == "real" else None,
               "seconds": time.time() - t0}
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
