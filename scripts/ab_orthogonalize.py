"""Paired A/B of two versions of lipformer/spectral/newton_schulz.py (Gram path, bf16, classic, 5 steps)
against torch.optim.Muon's Newton–Schulz, in one process: rotated interleaved repeats, CPU time,
and the median of the per-repeat time ratios new/old (machine noise hits both alike).

    OMP_NUM_THREADS=1 python scripts/ab_orthogonalize.py NEW.py OLD.py [repeats]
    (OLD.py e.g. from `git show main:lipformer/spectral/newton_schulz.py > /tmp/old_ns.py`)
"""

import importlib.util
import statistics as st
import sys
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    torch.set_num_threads(1)
    new, old = load(sys.argv[1], "new"), load(sys.argv[2], "old")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    g = torch.Generator().manual_seed(0)
    shapes = {"768×3072": torch.randn(768, 3072, generator=g), "3072×768": torch.randn(3072, 768, generator=g)}
    cases = {}
    for s, G in shapes.items():
        run = lambda m, G=G: m.orthogonalize(G, 5, "classic", out_dtype=torch.bfloat16, method="gram")  # noqa: E731
        print(s, "bitwise equal:", torch.equal(run(old), run(new)))
        cases["torch " + s] = lambda G=G: _zeropower_via_newtonschulz(G, old.CLASSIC, 5, 1e-7)
        cases["old " + s] = lambda run=run: run(old)
        cases["new " + s] = lambda run=run: run(new)
    times = {k: [] for k in cases}
    for f in cases.values():
        f(), f()
    items = list(cases.items())
    for r in range(repeats):
        for k, f in items[r % len(items):] + items[:r % len(items)]:
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    for k, v in times.items():
        print(f"{k:14s} median {st.median(v) * 1e3:7.2f} ms")
    for s in shapes:
        torch_t = st.median(times["torch " + s])
        paired = st.median([a / b for a, b in zip(times["new " + s], times["old " + s])])
        print(f"{s}: speed vs torch old {torch_t / st.median(times['old ' + s]):.2f}× new "
              f"{torch_t / st.median(times['new ' + s]):.2f}×; paired time new/old {paired:.3f}")


if __name__ == "__main__":
    main()
