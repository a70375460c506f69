"""The parts of scripts/gpu_check.sh, one per subcommand; each prints `RESULT key=value ...` lines.

    python scripts/gpu_check.py shards DIR            # synthetic llm.c shards (copy task, uint16)
    python scripts/gpu_check.py throughput DIR        # (a) tokens/s + MFU, (b) projection share
    python scripts/gpu_check.py generation            # (c) cached vs uncached greedy generation
    python scripts/gpu_check.py certify               # (d) 1024-token certificate, CUDA vs CPU float64

Every subcommand but `shards` needs CUDA and exits 3 with one line when there is none.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 50304, 768, 12, 12, 1024  # training/configs/gpt2-small.toml


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def copy_task(n_seq: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of a random half followed by the same half again: predicting the second half needs
    the context, so a model that learned it proves generation and caching depend on context."""
    half = torch.randint(0, vocab, (n_seq, seq // 2), generator=gen)
    return torch.cat([half, half], 1)


def cmd_shards(args) -> None:
    from lipformer.training.data.shards import write_shard
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for name, rows in (("synth_val_000000.bin", 64), ("synth_train_000001.bin", 512)):
        write_shard(out / name, copy_task(rows, SEQ, VOCAB, gen).flatten().numpy())
    result(part="shards", dir=out, files=len(list(out.glob("*.bin"))))


def need_cuda() -> torch.device:
    if not torch.cuda.is_available():
        print("no CUDA device visible: this part needs a GPU", file=sys.stderr)
        sys.exit(3)
    return torch.device("cuda")


def timed_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def cmd_throughput(args) -> None:
    dev = need_cuda()
    from transformers import GPT2Config, GPT2LMHeadModel

    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.constraints import SpectralProjection
    from lipformer.optim import build_optimizer
    from lipformer.training.data import TokenDataset

    torch.backends.cuda.matmul.allow_tf32 = True
    data = TokenDataset(str(Path(args.dir) / "synth_train_*.bin"), args.batch, SEQ, seed=0, shuffle=True,
                        vocab_size=VOCAB)
    x, y = (t.to(dev) for t in next(iter(data)))
    tokens = x.numel()

    def make_step(model, opt, project=None):
        fwd = torch.compile(model) if args.compile else model

        def loss_fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

        proj_times = []

        def step():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if project is not None:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                project()
                torch.cuda.synchronize()
                proj_times.append(time.perf_counter() - t0)
        return step, proj_times

    torch.manual_seed(0)
    hf = GPT2LMHeadModel._from_config(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS,
                                                 n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                      attn_implementation="sdpa").to(dev).train()
    lip = LipformerForCausalLM(LipformerConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                               num_attention_heads=HEADS, max_position_embeddings=SEQ,
                                               constraint="hard_cap")).to(dev).train()
    lip_opt = build_optimizer(lip, "muon", lr=0.05)
    runs = {"gpt2_adamw": (hf, *make_step(hf, torch.optim.AdamW(hf.parameters(), lr=3e-4, fused=True))),
            "lipformer_muon_hardcap": (lip, *make_step(lip, lip_opt, SpectralProjection(lip, lip_opt)))}
    peak = float(os.environ.get("GPU_PEAK_TFLOPS", "989")) * 1e12  # H200 SXM dense bf16
    for name, (model, step, proj) in runs.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # includes compilation
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        proj.clear()
        times = timed_steps(step, args.steps)
        med = statistics.median(times)
        n = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * n + 12 * LAYERS * HIDDEN * SEQ  # PaLM's estimate, attention included
        share = statistics.median([p / t for p, t in zip(proj, times)]) if proj else 0.0
        result(part="a", model=name, params=n, batch=args.batch, step_ms=f"{med * 1e3:.1f}",
               tokens_per_s=f"{tokens / med:.0f}", mfu=f"{flops_per_token * tokens / med / peak:.3f}",
               warmup_s=f"{warm:.1f}", projection_share=f"{share:.3f}")
        del model
        torch.cuda.empty_cache()


def trained_small_model(dev: torch.device, steps: int):
    """A 4 × 256 lipformer trained on the copy task (vocab 512, seq 128) until it copies."""
    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.constraints import SpectralProjection
    from lipformer.optim import build_optimizer

    torch.manual_seed(0)
    cfg = LipformerConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=128, constraint="hard_cap")
    model = LipformerForCausalLM(cfg).to(dev).train()
    opt = build_optimizer(model, "muon", lr=0.05)
    project = SpectralProjection(model, opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = copy_task(32, 128, 512, gen).to(dev)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        project()
    return model.eval(), float(loss.detach())


def cmd_generation(args) -> None:
    dev = need_cuda()
    model, loss = trained_small_model(dev, args.train_steps)
    gen = torch.Generator().manual_seed(2)
    rows = copy_task(8, 128, 512, gen).to(dev)
    prompt = rows[:, :64 + 8]  # the random half and the first 8 of its repeat
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=48, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=48, do_sample=False, use_cache=False)
    copied = float((cached[:, 72:120] == rows[:, 72:120]).float().mean())  # chance: 1/512
    result(part="c", train_loss=f"{loss:.3f}", copy_accuracy=f"{copied:.3f}",
           context_dependent=copied > 0.5, cached_equals_uncached=bool(torch.equal(cached, uncached)))


def cmd_certify(args) -> None:
    dev = need_cuda()
    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.certify import certify_tokens, float64_copy

    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=args.layers,
                                                 num_attention_heads=HEADS, max_position_embeddings=SEQ))
    ids = copy_task(1, SEQ, VOCAB, torch.Generator().manual_seed(3))[0].tolist()
    out = {}
    for device in ("cuda", "cpu"):
        m = float64_copy(model).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            certs = certify_tokens(m, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        out[device] = (time.perf_counter() - t0, certs)
        del m
    (tg, cg), (tc, cc) = out["cuda"], out["cpu"]
    same_pred = all(a.prediction == b.prediction for a, b in zip(cg, cc))
    rel = max(abs(a.radius - b.radius) / max(abs(b.radius), 1e-300) for a, b in zip(cg, cc))
    exact = all(a.radius == b.radius for a, b in zip(cg, cc))
    result(part="d", tokens=len(ids), layers=args.layers, cuda_s=f"{tg:.2f}", cpu_s=f"{tc:.2f}",
           predictions_equal=same_pred, radii_bitwise_equal=exact, radii_max_rel_diff=f"{rel:.2e}",
           radii_within_1e_9=rel <= 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shards")
    s.add_argument("dir")
    s = sub.add_parser("throughput")
    s.add_argument("dir")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--no-compile", dest="compile", action="store_false")
    s = sub.add_parser("generation")
    s.add_argument("--train-steps", type=int, default=300)
    s = sub.add_parser("certify")
    s.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    {"shards": cmd_shards, "throughput": cmd_throughput, "generation": cmd_generation,
     "certify": cmd_certify}[args.cmd](args)


if __name__ == "__main__":
    main()
