"""Training-step tokens/s: lipformer + Muon + hard cap vs HF GPT2LMHeadModel + AdamW (DESIGN §9).

Equal width, depth, heads, MLP width (4d), sequence and batch; char vocabulary (83). One step =
forward, cross-entropy, backward, optimizer step, zero_grad — plus, for lipformer, the projection
step `SpectralProjection.__call__` (hard cap, polar method) whose share of the step is reported.

    baseline   transformers.GPT2LMHeadModel (dropout 0, sdpa attention, tied head) + torch.optim.AdamW
    lipformer  LipformerForCausalLM + lipformer.optim Muon (AdamW companion on the embedding)
               + SpectralProjection(model, optimizer) with constraint hard_cap, one row per
               `--cap-methods` entry (default: auto, which is eigh on CPU, and polar)

Median of `--repeats` interleaved steps (the order alternates) after `--warmup` steps each, float32.

    .venv/bin/python scripts/bench_train_step.py                      # d 256, 4 layers, 4 heads, seq 256, batch 8
    .venv/bin/python scripts/bench_train_step.py --hidden 768 --layers 12 --heads 12 --seq 1024
Appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench import add_common_args, machine  # noqa: E402

from lipformer import LipformerConfig, LipformerForCausalLM  # noqa: E402
from lipformer.constraints import SpectralProjection  # noqa: E402
from lipformer.optim import build_optimizer  # noqa: E402
from lipformer.spectral import resolve_cap_method  # noqa: E402




def make_gpt2(args):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4), None


def make_lipformer(args, cap_method: str):
    cfg = LipformerConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, max_position_embeddings=args.seq,
                          constraint="hard_cap", cap_method=cap_method)
    model = LipformerForCausalLM(cfg).train()
    opt = build_optimizer(model, "muon", lr=0.05)
    return model, opt, SpectralProjection(model, opt)


def step(model, opt, project, x, y) -> tuple[float, float]:
    """(step seconds, of which projection seconds)."""
    t0 = time.perf_counter()
    logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tp = 0.0
    if project is not None:
        t1 = time.perf_counter()
        project()
        tp = time.perf_counter() - t1
    return time.perf_counter() - t0, tp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="width d (default 256)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--vocab", type=int, default=83, help="vocabulary (default 83, Shakespeare char)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per model, interleaved (default 9)")
    p.add_argument("--cap-methods", default="auto,polar",
                   help="comma-separated hard_cap methods, one lipformer row each; the first one is judged "
                        "against the goals (default auto,polar)")
    add_common_args(p, ROOT)
    args = p.parse_args()
    methods = [m.strip() for m in args.cap_methods.split(",") if m.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    runs = {"GPT2LMHeadModel + AdamW": make_gpt2(args)}
    for method in methods:
        resolved = resolve_cap_method(method, "cpu")
        label = method if resolved == method else f"{method} = {resolved}"
        runs[f"lipformer + Muon + hard cap ({label})"] = make_lipformer(args, method)
    times = {k: [] for k in runs}
    proj = {k: [] for k in runs}
    for name, (model, opt, project) in runs.items():
        for _ in range(args.warmup):
            step(model, opt, project, x, y)
    order = list(runs)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):  # alternate so drift hits all alike
            t, tp = step(*runs[name], x, y)
            times[name].append(t)
            proj[name].append(tp)

    tokens = args.batch * args.seq
    base = statistics.median(times[order[0]])
    rows = ["| model | params | median step ms | tokens/s | speed vs GPT2+AdamW | projection ms | projection share |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in order:
        model, _, project = runs[name]
        med = statistics.median(times[name])
        n_params = sum(q.numel() for q in model.parameters())
        if project is None:
            proj_ms, share = "—", "—"
        else:
            proj_ms = f"{statistics.median(proj[name]) * 1e3:.1f}"
            share = f"{statistics.median([tp / t for tp, t in zip(proj[name], times[name])]):.1%}"
        rows.append(f"| {name} | {n_params:,} | {med * 1e3:.1f} | {tokens / med:,.0f} | {base / med:.2f}× | "
                    f"{proj_ms} | {share} |")
    print("\n".join(rows))
    lip = order[1]
    speed = base / statistics.median(times[lip])
    share = statistics.median([tp / t for tp, t in zip(proj[lip], times[lip])])
    if args.no_append:
        return
    flags = [f"--{k.replace('_', '-')} {getattr(args, k)}"
             for k in ("hidden", "layers", "heads", "seq", "batch", "threads", "cap_methods")
             if getattr(args, k) != p.get_default(k)]
    text = f"""
## Training step: lipformer + Muon + hard cap vs GPT2LMHeadModel + AdamW ({datetime.date.today()})

Machine: {machine()}.

Equal shape for both: d {args.hidden}, {args.layers} layers, {args.heads} heads, MLP 4d, seq {args.seq}, batch {args.batch}
({tokens} tokens/step), vocab {args.vocab}, float32. Baseline: `transformers.GPT2LMHeadModel` (dropout 0, sdpa,
tied head, biases and LayerNorms) + `torch.optim.AdamW`. lipformer: `LipformerForCausalLM` + `build_optimizer(model,
"muon")` + `SpectralProjection` (hard_cap by the method in the row's name) after every step. One step = forward + CE + backward + optimizer
step + zero_grad (+ projection). Median of {args.repeats} interleaved steps after {args.warmup} warm-up steps each.

{chr(10).join(rows)}

- Speed goal ≥ 1.0× (tokens/s of lipformer over GPT2+AdamW), judged on `{lip}`: {'met' if speed >= 1.0 else '**missed**'} ({speed:.2f}×).
- Projection share goal ≤ 10%: {'met' if share <= 0.10 else '**missed**'} ({share:.1%} of the lipformer step, median per step).
  The projection's cost is per matrix and independent of the batch, so its share falls as tokens
  per step grow (a larger `--batch`/`--seq`, or grad accumulation).
- Rerun: `.venv/bin/python scripts/bench_train_step.py{' ' + ' '.join(flags) if flags else ''}` (appends a new section here).
"""
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
