"""Cost of local certificates: `certify` of one sequence, local vs global, and scaling with T.

The model is the `shakespeare-char` size (d 256, 3 blocks, 4 heads, vocab 83): a trained run's
weights when `--model DIR` is given (its context is widened to the longest T: the weights do not
depend on it, only the §6a rounding constant does), else the preset at its init (weights at caps).
Global and local are timed side by side in the same run, on the same text, through
`certify.certify_tokens` (what `lipformer certify --method global|local` runs after the bounds):
wall time, and process CPU time (less sensitive to other load on a shared machine), with the
1-minute load average at the end of each row.

    .venv/bin/python scripts/bench_local_certify.py --model runs/sc-c20-vo4/final --lengths 64 128 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipformer import LipformerConfig, LipformerForCausalLM, certify  # noqa: E402


def load(model_dir: str | None, context: int) -> LipformerForCausalLM:
    if model_dir:
        trained = LipformerForCausalLM.from_pretrained(model_dir)
        config = LipformerConfig.from_dict({**trained.config.to_dict(), "max_position_embeddings": context})
        model = LipformerForCausalLM(config)
        model.load_state_dict(trained.state_dict())
    else:
        torch.manual_seed(0)
        model = LipformerForCausalLM(LipformerConfig(
            vocab_size=83, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=context, w_max={"q": 0.5, "k": 0.5, "v": 1.0, "o": 1.0, "mlp_in": 1.0,
                                                     "mlp_out": 1.0, "head": 1.0, "embed": 1.0}))
    return certify.float64_copy(model.eval())


def text_ids(T: int, vocab: int) -> list[int]:
    try:
        from lipformer.training.data import prepare_shakespeare
        val = Path(prepare_shakespeare()["val_bin"])
    except Exception:  # noqa: BLE001 — any failure: fall back to random tokens
        val = None
    if val is not None and val.is_file():
        import numpy as np
        tokens = np.fromfile(val, dtype=np.uint16)[256 + 1024:256 + 1024 + T]  # skip the .bin header
        if len(tokens) == T and int(tokens.max()) < vocab:
            return [int(t) for t in tokens]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (T,), generator=g).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained shakespeare-char folder (final/ or checkpoint/)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model, max(args.lengths))
    start, cpu = time.perf_counter(), time.process_time()
    bounds = model.bounds()
    print(json.dumps({"bounds_s": time.perf_counter() - start, "bounds_cpu_s": time.process_time() - cpu}), flush=True)
    rows = []
    for T in args.lengths:
        ids = text_ids(T, model.config.vocab_size)
        timed = {}
        for method in ("global", "local"):
            start, cpu = time.perf_counter(), time.process_time()
            certs = certify.certify_tokens(model, ids, bounds, method=method)
            timed[method] = (time.perf_counter() - start, time.process_time() - cpu, certs)
        g = torch.tensor([c.radius for c in timed["global"][2]])
        local = torch.tensor([c.radius for c in timed["local"][2]])
        ok = g > 0
        gain = float((local[ok] / g[ok]).median()) if ok.any() else float("nan")
        row = {"T": T, "global_s": timed["global"][0], "local_s": timed["local"][0],
               "global_cpu_s": timed["global"][1], "local_cpu_s": timed["local"][1],
               "median_radius_global": float(g.median()), "median_radius_local": float(local.median()),
               "median_gain": gain, "load_avg_1min": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model or "init"}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
