"""`lipformer` command line: a thin shell over the library.

Failure policy (DESIGN §8): bad input gets one line naming the problem and the fix, exit status 2,
no traceback unless --debug.
"""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same one-line policy
        raise UsageError(f"{message} (see `lipformer {self.prog.split()[-1]} --help`)"
                         if " " in self.prog else f"{message} (see `lipformer --help`)")


def _train_errors():
    """The exceptions that mean bad input to `train`/`demo` (imported lazily: training is optional)."""
    from lipformer.training.data import DataError
    from lipformer.training.recipe import RecipeError
    return (RecipeError, DataError)


def cmd_train(args: argparse.Namespace) -> int:
    from lipformer.training.distributed import init_from_env
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import Interrupted, TrainingStopped, run

    try:
        recipe = load_recipe(args.preset, args.config, args.overrides)
        if args.max_steps is not None and args.max_steps < 1:
            raise UsageError("--max-steps must be at least 1")
        init_from_env()  # under torchrun (WORLD_SIZE > 1): join the process group; else nothing
        result = run(recipe, args.out, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps)
    except _train_errors() as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:  # e.g. a full disk while writing a checkpoint: the previous one is kept
        where = f" ({exc.filename})" if exc.filename else ""
        raise UsageError(f"cannot write the run in {args.out}: {exc.strerror or exc}{where}; "
                         "free space or fix permissions, then run again with --resume") from exc
    except TrainingStopped as exc:
        print(f"lipformer: training stopped: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # checkpointed at exc.step; the shell's convention: 128 + signal number
        print(f"lipformer: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    summary = {k: result[k] for k in ("step", "loss", "val_loss", "val_acc", "lipschitz_total") if k in result}
    print("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if "final" in result:
        print(f"final model: {result['final']} (certified accuracy {result['certified_accuracy']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare Shakespeare, train the `demo` preset on CPU, certify, generate a sample."""
    import torch

    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import Interrupted, run

    try:
        recipe = load_recipe("demo", None, args.overrides)
        print("training the demo preset (Shakespeare, char level; a few minutes on 2 CPU cores)…")
        # a finished run is reused, a checkpointed one continued, anything else started afresh
        result = run(recipe, args.out, resume=True, overwrite=True)
    except _train_errors() as exc:
        raise UsageError(str(exc)) from exc
    except Interrupted as exc:
        print(f"lipformer: {exc} (or run the demo again)", file=sys.stderr)
        return 128 + int(exc.signum)
    model, tokenizer = _load(result["final"])
    b = model.bounds()
    print(f"val accuracy: {result.get('val_acc', float('nan')):.3f} (val loss {result.get('val_loss', float('nan')):.3f})")
    print(f"certified Lipschitz bound, inputs_embeds → logits: {b.total:.4f} (→ hidden states: {b.body:.4f})")
    print("certified accuracy: " + ", ".join(f"ε={k}: {v:.1%}" for k, v in result["certified_accuracy"].items()))
    torch.manual_seed(0)
    prompt = "ROMEO:"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=None, top_p=None,
                         pad_token_id=0)
    print("sample:\n" + prompt + tokenizer.decode(out[0, ids.size(1):].tolist()))
    print(f"(model in {result['final']}; try `lipformer certify {result['final']} --text 'ROMEO:' --attack`)")
    return 0


def _load(folder: str):
    """(model, tokenizer or None) from a saved folder, or a UsageError naming the problem."""
    import transformers

    from .modeling import LipformerForCausalLM, check_model_folder

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        check_model_folder(folder)
        if not os.path.isdir(folder):
            raise OSError(f"{folder} is not a folder; pass a directory written by save_pretrained / lipformer train")
        model = LipformerForCausalLM.from_pretrained(folder).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc).strip().splitlines()[-1]) from exc
    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 — a corrupt tokenizer file fails in many ways
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UsageError(f"cannot load the tokenizer in {folder} ({reason}); "
                             "re-save it with tokenizer.save_pretrained") from exc
    return model, tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise UsageError("the model folder has no tokenizer (tokenizer.json); save one with tokenizer.save_pretrained")
    if not text:
        raise UsageError("the text is empty; pass --text STR or --file PATH with some content")
    vocab = tokenizer.get_vocab()
    if all(len(t) == 1 for t in vocab):  # a char tokenizer: name the characters it cannot encode
        missing = sorted({c for c in text if c not in vocab})
        if missing:
            raise UsageError(f"characters outside the model's vocabulary: {''.join(missing)[:40]!r}; remove them")
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as exc:
        raise UsageError(f"cannot tokenize the text ({exc})") from exc
    if not ids:
        raise UsageError("the text encodes to no tokens")
    return ids


def cmd_certify(args: argparse.Namespace) -> int:
    import json

    from . import certify

    if args.text is not None and args.file is not None:
        raise UsageError("pass only one of --text or --file")
    model, tokenizer = _load(args.model_dir)
    text = args.text
    if args.file is not None:
        try:
            text = open(args.file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.file}: {exc}") from exc
    model64 = certify.float64_copy(model)
    bounds = model64.bounds()
    certs = attack = None
    if text is not None:
        ids = _encode(tokenizer, text)
        certs = certify.certify_tokens(model64, ids, bounds, progress=not args.json)
        if args.attack:
            attack = certify.attack(model64, ids, certs)
    elif args.attack:
        raise UsageError("--attack needs a text to attack: pass --text or --file")
    if args.json:
        out = certify.certificate_json(bounds, certs)
        if attack is not None:
            out["attack"] = attack
        print(json.dumps(out))
        return 0
    print(f"{'weight':40s} {'sigma_upper':>12s} {'w_max':>8s} {'factor':>9s}")
    for w in bounds.weights:
        print(f"{w.name:40s} {w.sigma_upper:12.6f} {w.w_max:8.4f} {w.factor:9.5f}")
    for a in bounds.activations:
        print(f"block {a['block']}: lipschitz ≤ {a['lipschitz']:.4f}, attention output rms ≤ "
              f"{a['attn_output']:.4f}, block output rms ≤ {a['mlp_output']:.4f}")
    print(f"input ball radius {bounds.input_radius:g}; hidden rms ≤ {bounds.hidden_bound:.4f}; "
          f"logits rms ≤ {bounds.logits_bound:.4f}; float64 evaluation error of hidden rms ≤ {bounds.hidden_error:.3g}")
    print(f"Lipschitz bound inputs_embeds → hidden: {bounds.body:.6g}")
    print(f"Lipschitz bound inputs_embeds → logits: {bounds.total:.6g}")
    if certs:
        show = certs if len(certs) <= 64 else certs[:32] + certs[-32:]
        print(f"{'index':>6s} {'token':>12s} {'prediction':>12s} {'margin':>10s} {'radius':>11s}")
        for c in show:
            tok = repr(tokenizer.decode([c.token]))[1:-1]
            pred = repr(tokenizer.decode([c.prediction]))[1:-1]
            print(f"{c.index:6d} {tok:>12s} {pred:>12s} {c.margin:10.4f} {c.radius:11.3e}")
        if len(certs) > len(show):
            print(f"({len(certs) - len(show)} positions not shown; use --json for all)")
        fractions = certify.certified_fractions(certs)
        print("certified fraction: " + ", ".join(f"ε={r}: {f:.1%}" for r, f in fractions.items()))
    if attack is not None:
        print(f"attack: {attack['attacked']} positions attacked inside their radius, "
              f"{attack['violations']} violations; closest margin left {attack['closest']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model_dir)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"lipformer model at {args.model_dir}: {n / 1e6:.3f}M parameters")
    print(f"  {c.num_hidden_layers} blocks × d {c.hidden_size}, {c.num_attention_heads} heads, MLP {c.intermediate_size}, "
          f"context {c.max_position_embeddings}, vocab {c.vocab_size}, residual α {c.residual_alpha:g}")
    print(f"  caps (RMS→RMS): " + ", ".join(f"{k} {v:g}" for k, v in c.w_max.items()))
    print(f"  constraint {c.constraint} ({c.cap_method}), linear {c.linear}; tokenizer: {'yes' if tokenizer else 'none'}")
    b = model.bounds()
    worst = max(b.weights, key=lambda w: w.factor / w.w_max)
    print(f"  Lipschitz bound: {b.total:.6g} (body {b.body:.6g}); largest factor/w_max: {worst.name} "
          f"{worst.factor / worst.w_max:.4f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    model, tokenizer = _load(args.model_dir)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        raise UsageError("--temperature must be a finite number >= 0 (0 means greedy)")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    ids = torch.tensor([_encode(tokenizer, args.prompt)])
    if ids.size(1) >= model.config.max_position_embeddings:
        ids = ids[:, -(model.config.max_position_embeddings - 1):]
    room = model.config.max_position_embeddings - ids.size(1)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    out = model.generate(ids, max_new_tokens=min(args.max_new_tokens, room), do_sample=sample,
                         temperature=args.temperature if sample else None, top_k=None, top_p=None,
                         pad_token_id=tokenizer.pad_token_id or 0)
    print(args.prompt + tokenizer.decode(out[0, ids.size(1):].tolist()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lipformer", description="Transformers with certified Lipschitz bounds.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    demo = sub.add_parser("demo", help="train the demo preset on Shakespeare, certify it, print a sample")
    demo.add_argument("--out", default="checkpoints/demo")
    demo.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=100")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a Lipschitz transformer from a preset or a TOML config")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a name in training/configs (tiny, demo, shakespeare-char, gpt2-small)")
    source.add_argument("--config", help="a TOML file with [model], [data], [train]")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--max-steps", type=int, help="stop after N steps (resume later with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=0.01 model.w_max.q=0.5")
    train.set_defaults(func=cmd_train)
    cert = sub.add_parser("certify", help="certified bounds of a saved model, and per-position radii for a text")
    cert.add_argument("model_dir")
    cert.add_argument("--text")
    cert.add_argument("--file")
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.add_argument("--attack", action="store_true", help="PGD attack inside each radius (violations must be 0)")
    cert.set_defaults(func=cmd_certify)
    ins = sub.add_parser("inspect", help="config, sizes and bounds summary of a saved model")
    ins.add_argument("model_dir")
    ins.set_defaults(func=cmd_inspect)
    gen = sub.add_parser("generate", help="sample text from a saved model")
    gen.add_argument("model_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and isinstance(getattr(args, "overrides", None), list):
            # `train --preset P a.b=1 --out X c.d=2`: argparse takes one run of positionals only
            args.overrides += [a for a in extra if not a.startswith("-")]
            extra = [a for a in extra if a.startswith("-")]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(args, "func", None):
            raise UsageError("missing command; try `lipformer demo` or `lipformer --help`")
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"lipformer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the train loop (which checkpoints first): nothing half-written
        if debug:
            raise
        print("lipformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
