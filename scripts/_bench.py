"""Shared by the benchmark scripts: the machine line every recorded result carries, their common options,
and `step_parts` for the scripts that time the training loop's own `train_step`."""

import os
import platform

import torch


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load:.1f} at the end")


def add_common_args(parser, root) -> None:
    """--threads, --append, --no-append: the options every recorded benchmark shares."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a descheduled OpenMP thread "
                             "stalls every op; 0 = torch's choice)")
    parser.add_argument("--append", default=str(root / "docs" / "benchmarks.md"), help="markdown file to append to")
    parser.add_argument("--no-append", action="store_true", help="print only")


def step_parts(model, t):
    """What the training loop's `train_step` takes besides the data, built as `lipformer train` builds it:
    (parallel wrapper, optimizer, scheduler, projection, objective or None)."""
    from lipformer.constraints import SpectralProjection
    from training.objectives import Objective
    from training.parallel import Parallel
    from training.train import build_optimizer_for

    par = Parallel.for_run(model, t.parallel, torch.device("cpu"), compile=t.compile)
    optimizer, scheduler = build_optimizer_for(model, t)
    objective = None if t.objective == "ce" else Objective(t.objective, t.eps, eps_warmup=t.eps_warmup,
                                                              weight=t.margin_weight, stability=t.stability,
                                                              margin_on=t.margin_on, stability_eps=t.stability_eps)
    return par, optimizer, scheduler, SpectralProjection(model, optimizer), objective


def append_section(args, text: str) -> None:
    """Append a dated markdown section to --append, unless --no-append."""
    if args.no_append:
        return
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


def preset_step(preset: str, overrides: list[str]):
    """A preset's training step as `lipformer train` builds it, from the preset's seed:
    (train.* settings, the train split, (parallel wrapper, optimizer, scheduler, projection, objective))."""
    from lipformer import LipformerConfig, LipformerForCausalLM
    from training.recipe import load_recipe
    from training.train import open_data

    run = load_recipe(preset, overrides=overrides)
    train_data, _, _, vocab = open_data(run)
    torch.manual_seed(run.train.seed)
    model = LipformerForCausalLM(LipformerConfig(**{**run.model, "vocab_size": vocab})).train()
    return run.train, train_data, step_parts(model, run.train)
