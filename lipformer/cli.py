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


class _Help(argparse.HelpFormatter):
    """Shows each option's default (when it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own errors: same one-line policy
        raise UsageError(f"{message} (see `lipformer {self.prog.split()[-1]} --help`)"
                         if " " in self.prog else f"{message} (see `lipformer --help`)")


def _train_errors():
    """The exceptions that mean bad input to `train`/`demo` (imported lazily: training is optional)."""
    from lipformer.training.data import DataError
    from lipformer.training.recipe import RecipeError
    return (RecipeError, DataError)


def cmd_train(args: argparse.Namespace) -> int:
    from lipformer.training.allocator import retain_freed_memory
    from lipformer.training.distributed import init_from_env
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import Interrupted, TrainingStopped, run

    try:
        recipe = load_recipe(args.preset, args.config, args.overrides)
        if args.owns_process:   # the console command is the run: no fresh pages each step (allocator.py)
            retain_freed_memory()
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
        print(f"final model: {result['final']}")
        print("certified accuracy (correct and provably unchanged by any input perturbation of size ε)"
              + _certified_lines(result, ": ", "; "))
    return 0


def _certified_lines(result: dict, first: str, sep: str) -> str:
    """The certified fractions with the positions they were measured on: the best sound certificate
    (local, global or linear relaxation) on the first val positions, and the global radius alone on
    every evaluated position."""
    def fmt(fractions):
        return ", ".join(f"ε={k}: {v:.1%}" for k, v in fractions.items())
    n = result.get("local_positions")
    text = first + fmt(result["certified_accuracy"]) + (f" (best radius, first {n} val positions)" if n else "")
    if result.get("certified_accuracy_global_all") and result.get("positions"):
        text += sep + fmt(result["certified_accuracy_global_all"]) + \
            f" (global radius, all {result['positions']} evaluated val positions)"
    return text


def _command() -> str:
    """How to run `lipformer` from this shell: the bare name only when it is on PATH (it is not
    unless the venv is active), else the venv's script, else `python -m lipformer.cli`."""
    import shutil
    from pathlib import Path

    script = Path(sys.executable).with_name("lipformer")
    found = shutil.which("lipformer")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "lipformer"
    if script.exists():
        return os.path.relpath(script) if not os.path.relpath(script).startswith("../..") else str(script)
    return f"{sys.executable} -m lipformer.cli"


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare Shakespeare, train the `demo` preset on CPU, certify, generate a sample."""
    import torch

    from . import certify
    from lipformer.training.allocator import retain_freed_memory
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import Interrupted, run

    try:
        recipe = load_recipe("demo", None, args.overrides)
        if args.owns_process:   # the console command is the run: no fresh pages each step (allocator.py)
            retain_freed_memory()
        m, t = recipe.model, recipe.train
        print(f"training the demo preset: a character-level model ({m.get('num_hidden_layers')} blocks × d "
              f"{m.get('hidden_size')}) on Shakespeare's plays, {t.max_steps} steps on the CPU "
              "(a few minutes on 2 cores; Ctrl-C saves it, and running the demo again continues)")
        # a finished run is reused, a checkpointed one continued, anything else started afresh
        result = run(recipe, args.out, resume=True, overwrite=True)
    except _train_errors() as exc:
        raise UsageError(str(exc)) from exc
    except Interrupted as exc:
        print(f"lipformer: {exc} (or run the demo again)", file=sys.stderr)
        return 128 + int(exc.signum)
    model, tokenizer = _load(result["final"])
    model64 = certify.float64_copy(model)
    b = model64.bounds()
    print(f"\nresults (model saved in {result['final']}):")
    if "val_acc" in result:
        print(f"  val accuracy {result['val_acc']:.3f} (val loss {result['val_loss']:.3f}): the share of held-out "
              "characters the model predicts right from the text before them")
    if "bigram_accuracy" in result:
        print(f"  bigram reference {result['bigram_accuracy']:.3f}: a table of the most frequent next character after each "
              "character (counted on the train split) scores this on the val text; the model's lead over it "
              "is what it learned from longer context")
    print(f"  ε: a perturbation size, the RMS of the change to one position's input embedding (the largest over "
          f"positions); a token's embedding has RMS ≤ {b.input_radius:g}, so ε=0.01 is 1% of a token")
    print(f"  Lipschitz bound {b.total:.4g} (inputs_embeds → logits; {b.body:.4g} to the last hidden states): "
          f"certified, not estimated — a perturbation of size ε moves the logits by at most {b.total:.3g}·ε")
    if result.get("certified_accuracy"):
        print("  certified accuracy: val positions predicted right whose prediction provably no perturbation "
              "of size ε can change" + _certified_lines(result, "\n    ", "\n    "))
    worst = max(b.weights, key=lambda w: w.factor / w.w_max)
    ratio = worst.factor / worst.w_max
    # The projection meets a cap only to its tolerance, and the sound σ bound sits a rounding margin
    # above the true σ: say so rather than claim "within" at 1.0001. The bound uses the σ, not the cap.
    where = ("within its cap" if ratio <= 1 else
             f"within {ratio - 1:.1e} of its cap (the projection's tolerance plus the σ bound's rounding margin; "
             "the certificate uses the sound bound, not the cap)")
    print(f"  weight norms: every weight's sound bound is {where} (largest factor/w_max "
          f"{ratio:.6f}, {worst.name}); `certify` lists sigma_upper = the ℓ2 spectral norm "
          "and factor = √(d_in/d_out)·sigma_upper, the RMS→RMS norm that w_max caps, so sigma_upper may exceed "
          "w_max on non-square weights")
    vocab = tokenizer.get_vocab()  # a corpus of your own (data.path=...) may have no "ROMEO:"
    prompt = "ROMEO:" if all(c in vocab for c in "ROMEO:") else next(
        t for t in sorted(vocab, key=vocab.get) if len(t) == 1 and t.isprintable() and not t.isspace())
    ids = _encode(tokenizer, prompt)
    certs = certify.certify_tokens(model64, ids, b)
    attack = certify.attack(model64, ids, certs)
    if attack["attacked"]:
        print(f"  attack on {prompt!r}: {attack['attacked']} positions attacked with PGD inside their certified "
              f"radius, {attack['violations']} predictions changed; the closest call kept "
              f"{attack['closest']:.0%} of its original margin (the certificate holds while this stays above 0)")
    torch.manual_seed(0)
    new = _sample(model, torch.tensor([ids]), 200, 0.8, 0)
    print("\nsample (200 characters, temperature 0.8):\n" + prompt + tokenizer.decode(new[0].tolist()))
    cmd = _command()
    print(f"\nnext: {cmd} certify {result['final']} --text {prompt!r} --attack    (per-character radii)\n"
          f"      {cmd} generate {result['final']} --prompt 'JULIET:'\n"
          f"      {cmd} --help")
    return 0


def _sample(model, ids, new_tokens: int, temperature: float, pad_token_id: int):
    """`new_tokens` sampled after `ids` (greedy at temperature 0), as a (1, n) tensor.

    HF generate with its KV cache over the whole text, however long: no window, so every token is
    the model's prediction on everything before it — the function `certify` certifies.
    """
    import torch

    sample = temperature > 0
    # an explicit mask: HF would otherwise infer one from pad_token_id and hide prompt tokens equal to it
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_k=None, top_p=None,
                         pad_token_id=pad_token_id)
    return out[:, ids.size(1):]


def _check_not_a_run_folder(folder: str) -> None:
    """A `lipformer train` output folder holds models in final/ and checkpoint/, not at its top."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    inside = [os.path.join(folder, n) for n in ("final", "checkpoint", "checkpoint.old")
              if os.path.isfile(os.path.join(folder, n, "config.json"))]
    if inside:
        raise UsageError(f"{folder} is a training run folder, not a model; pass "
                         + " or ".join(f"{p} ({'the finished model' if p.endswith('final') else 'the latest checkpoint'})"
                                       for p in inside[:2]))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Text files or folders → GPT-2 token shards for `data.dataset=shards`."""
    if args.shard_size < 1 or (args.val_tokens is not None and args.val_tokens < 1):
        raise UsageError("--shard-size and --val-tokens must be at least 1")
    from lipformer.training.data import DataError, prepare_shards

    try:
        shards = prepare_shards(args.inputs, args.out, shard_size=args.shard_size, val_tokens=args.val_tokens,
                                prefix=args.prefix, overwrite=args.overwrite, progress=True)
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        print("lipformer: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    train = [p for p in shards if "_train_" in p.name]
    pattern = os.path.join(args.out, shards[0].name.split("_val_")[0] + "_train_*.bin")
    print(f"{len(shards)} shards in {args.out}: {shards[0].name} (val) and {len(train)} train shards; train with\n"
          f"  lipformer train --preset gpt2-small --out runs/gpt2 data.path='{pattern}'")
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


def _read_utf8(path: str) -> str:
    """The file's exact text: bytes decoded as UTF-8, no newline translation (positions match the file)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (invalid byte {data[exc.start]:#04x} at offset {exc.start}); "
                         "convert it to UTF-8") from exc


def _report_certificate(folder: str, stream) -> None:
    """One line: does the saved certificate.json describe these weights? (The bounds shown are recomputed.)"""
    from .modeling import certificate_status

    state, line = certificate_status(folder)
    print(f"certificate: {state}: {line}", file=stream)


def _visible(token: str) -> str:
    """A token as a table cell: spaces as ␣, newlines and other control characters escaped (\\n)."""
    return repr(token.replace(" ", "␣"))[1:-1]


def cmd_certify(args: argparse.Namespace) -> int:
    import json

    from . import certify

    if args.text is not None and args.file is not None:
        raise UsageError("pass only one of --text or --file")
    text = args.text if args.file is None else _read_utf8(args.file)
    if args.attack and text is None:
        raise UsageError("--attack needs a text to attack: pass --text or --file")
    model, tokenizer = _load(args.model_dir)
    ids = _encode(tokenizer, text) if text is not None else []
    # after every check that can refuse the input: an error stays a single line
    _report_certificate(args.model_dir, sys.stderr if args.json else sys.stdout)
    model64 = certify.float64_copy(model)
    why = certify.linear_certify.unsupported(model64)
    if args.method == "linear" and why:
        raise UsageError(f"--method linear needs a position-only maxmin model, and here {why}; "
                         "use --method best (the default)")
    certs = attack = None
    bounds = model64.bounds(positions=len(ids))  # the float64 allowance for this text's length
    if text is not None:
        certs = certify.certify_tokens(model64, ids, bounds, method=args.method)
        if args.attack:
            attack = certify.attack(model64, ids, certs)
    if args.json:
        out = certify.certificate_json(bounds, certs)
        if attack is not None:
            out["attack"] = attack
        print(json.dumps(out))
        return 0
    print(f"{'weight':40s} {'sigma_upper':>12s} {'w_max':>8s} {'factor':>9s}")
    for w in bounds.weights:
        print(f"{w.name:40s} {w.sigma_upper:12.6f} {w.w_max:8.4f} {w.factor:9.5f}")
    print("(sigma_upper: sound upper bound on the ℓ2 spectral norm; factor = √(d_in/d_out)·sigma_upper is the "
          "RMS→RMS norm, the one capped at w_max)")
    for a in bounds.activations:
        print(f"block {a['block']}: lipschitz ≤ {a['lipschitz']:.4f}, attention output rms ≤ "
              f"{a['attn_output']:.4f}, block output rms ≤ {a['mlp_output']:.4f}")
    print(f"input ball radius {bounds.input_radius:g}; hidden rms ≤ {bounds.hidden_bound:.4f}; "
          f"logits rms ≤ {bounds.logits_bound:.4f}; float64 evaluation error of hidden rms ≤ {bounds.hidden_error:.3g}")
    print(f"Lipschitz bound inputs_embeds → hidden: {bounds.body:.6g}")
    print(f"Lipschitz bound inputs_embeds → logits: {bounds.total:.6g}")
    if certs:
        show = certs if len(certs) <= 64 else certs[:32] + certs[-32:]
        print(f"{'index':>6s} {'token':>12s} {'prediction':>12s} {'margin':>10s} {'radius':>11s} "
              f"{'local':>11s} {'global':>11s} {'linear':>11s}")
        na = lambda r: f"{'-':>11s}" if r is None else f"{r:11.3e}"  # noqa: E731
        for c in show:
            tok, pred = _visible(tokenizer.decode([c.token])), _visible(tokenizer.decode([c.prediction]))
            print(f"{c.index:6d} {tok:>12s} {pred:>12s} {c.margin:10.4f} {c.radius:11.3e} "
                  f"{na(c.radius_local)} {na(c.radius_global)} {na(c.radius_linear)}")
        if len(certs) > len(show):
            print(f"({len(certs) - len(show)} positions not shown; use --json for all)")
        fractions = certify.certified_fractions(certs)
        print("certified fraction: " + ", ".join(f"ε={r}: {f:.1%}" for r, f in fractions.items()))
    if attack is not None:
        print(f"attack: {attack['attacked']} positions attacked inside their radius, "
              f"{attack['violations']} violations; closest margin left {attack['closest']}")
        print("(closest margin left: the smallest fraction of a position's margin the attack left; "
              "the certificate holds while it stays above 0)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model_dir)
    _report_certificate(args.model_dir, sys.stdout)
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
    if not args.prompt:  # checked before the (slow) model load
        raise UsageError("--prompt is empty; give the text to continue, e.g. --prompt 'ROMEO:'")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        raise UsageError("--temperature must be a finite number >= 0 (0 means greedy)")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    import torch

    model, tokenizer = _load(args.model_dir)
    ids = torch.tensor([_encode(tokenizer, args.prompt)])
    context = model.config.max_position_embeddings
    if ids.size(1) + args.max_new_tokens > context:
        print(f"lipformer: note: the model was trained on {context}-token contexts; past that it still reads the "
              "whole text (RoPE has no length limit), exactly what `certify` certifies", file=sys.stderr)
    torch.manual_seed(args.seed)
    new = _sample(model, ids, args.max_new_tokens, args.temperature, tokenizer.pad_token_id or 0)
    print(args.prompt + tokenizer.decode(new[0].tolist()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lipformer", description="Transformers with certified Lipschitz bounds.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    demo = sub.add_parser("demo", help="train the demo preset on Shakespeare, certify it, print a sample")
    demo.add_argument("--out", default="checkpoints/demo", help="run folder (a finished demo there is reused)")
    demo.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=100")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a Lipschitz transformer from a preset or a TOML config")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a name in training/configs (tiny, demo, shakespeare-char, gpt2-small)")
    source.add_argument("--config", help="a TOML file with [model], [data], [train]")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--max-steps", type=int, help="stop after N steps (resume later with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                       "(refused when there is none, unless --overwrite is also given)")
    train.add_argument("--overwrite", action="store_true", help="replace the run in --out (with --resume: only "
                       "when it has no checkpoint)")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=0.01 model.w_max.q=0.5")
    train.set_defaults(func=cmd_train)
    cert = sub.add_parser("certify", help="certified bounds of a saved model, and per-position radii for a text")
    cert.add_argument("model_dir")
    cert.add_argument("--text")
    cert.add_argument("--file")
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.add_argument("--attack", action="store_true", help="PGD attack inside each radius (violations must be 0)")
    cert.add_argument("--method", choices=("best", "local", "global", "linear"), default="best",
                      help="radius from the local bound around the text, the global bound, the linear relaxation "
                           "(position-only maxmin models), or the largest that applies (default)")
    cert.set_defaults(func=cmd_certify)
    ins = sub.add_parser("inspect", help="config, sizes and bounds summary of a saved model")
    ins.add_argument("model_dir", help="a saved model folder, e.g. RUN/final")
    ins.set_defaults(func=cmd_inspect)
    gen = sub.add_parser("generate", help="sample text from a saved model")
    gen.add_argument("model_dir", help="a saved model folder, e.g. RUN/final")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200,
                     help="tokens to add; past the model's context each is predicted from the last context-many")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    gen.set_defaults(func=cmd_generate)
    prep = sub.add_parser("prepare", help="tokenize text files into GPT-2 shards for data.dataset=shards "
                                          "(llm.c format; rerun the same command to resume)")
    prep.add_argument("inputs", nargs="+", help="text files, or folders whose *.txt files are read (one document "
                                                "per file, UTF-8)")
    prep.add_argument("--out", required=True, help="folder for PREFIX_val_000000.bin, PREFIX_train_000001.bin, …")
    prep.add_argument("--prefix", help="shard name prefix (default: the first input's name)")
    prep.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    prep.add_argument("--val-tokens", type=int,
                      help="tokens in the val shard (default: one shard, or 10%% of a corpus smaller than that)")
    prep.add_argument("--overwrite", action="store_true", help="replace shards with the same prefix in --out")
    prep.set_defaults(func=cmd_prepare)
    for choice in sub._choices_actions:  # each page opens with its one-line summary
        sub.choices[choice.dest].description = sub.choices[choice.dest].description or choice.help
    return parser


def main(argv: list[str] | None = None) -> int:
    owns_process = argv is None   # the console command, not `main([...])` inside someone's process
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
        if getattr(args, "model_dir", None):  # before any command imports torch: answered at once
            _check_not_a_run_folder(args.model_dir)
        args.owns_process = owns_process
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
