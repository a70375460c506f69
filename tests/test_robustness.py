"""Bad input, faults and fuzzing across the user-facing entries (DESIGN §8, docs/robustness.md).

Every refusal is one line on stderr, exit status 2, no traceback, and leaves the files as they were.
The CLI runs in-process (`lipformer.cli.main`) except where a process must be killed.
"""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.cli import main
from lipformer.tokenization import char_tokenizer
from lipformer.training.data import DataError, load_tokens, read_shard

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
VOCAB = TEXT + "ROMEO:"  # (the demo's prompt)
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n") * 20
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny model (context 16) with its char tokenizer, saved as an HF folder."""
    tok = char_tokenizer(VOCAB)
    torch.manual_seed(0)
    config = LipformerConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16)
    folder = tmp_path_factory.mktemp("model")
    LipformerForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys, *needles) -> str:
    """main(argv) exits 2 with one line (containing every needle) and no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if not l.startswith("train:")]  # (tqdm's progress bar)
    assert len(lines) == 1 and lines[0].startswith("lipformer: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write(name, data):
    return lambda d, cfg: (d / name).write_bytes(data)


def _config(**changes):
    return lambda d, cfg: (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def _drop_tensor(d, cfg):
    from safetensors.torch import save_file
    tensors = load_file(str(d / "model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(d / "model.safetensors"))


def _pickle_only(d, cfg):
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")


CORRUPTIONS = {
    "missing safetensors": (lambda d, cfg: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "empty safetensors": (_write("model.safetensors", b""), "unreadable or truncated"),
    "truncated safetensors": (lambda d, cfg: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:3000]), "unreadable or truncated"),
    "safetensors header with no tensors": (_write("model.safetensors", (2).to_bytes(8, "little") + b"{}"),
                                           "no tensors"),
    "safetensors header not an object": (_write("model.safetensors", (2).to_bytes(8, "little") + b"[]"),
                                         "not a JSON object"),
    "a tensor missing": (_drop_tensor, "missing keys"),
    "pickle checkpoint only": (_pickle_only, "pickle checkpoints are refused"),
    "another model type": (_config(model_type="gpt2"), "'gpt2' model, not a lipformer"),
    "config.json random bytes": (_write("config.json", bytes(range(256)) * 3), "not valid JSON"),
    "config.json not an object": (_write("config.json", b"[1, 2, 3]"), "not an object"),
    "config.json negative hidden_size": (_config(hidden_size=-4), "hidden_size must be a positive integer"),
    "config.json hidden_size a string": (_config(hidden_size="abc"), "hidden_size must be an integer"),
    "config.json NaN rope_theta": (_config(rope_theta=float("nan")), "rope_theta must be a finite number"),
    "config.json bad constraint": (_config(constraint="zzz"), "constraint must be one of"),
    "config.json w_max a list": (_config(w_max=[1]), "w_max must be a mapping"),
    "config.json vocab differs from weights": (_config(vocab_size=99), "shapes do not match"),
    "tokenizer.json random bytes": (_write("tokenizer.json", b"\xff\xfe" * 100), "cannot load the tokenizer"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_model_folder_is_refused_in_one_line_and_left_as_it_was(case, saved, tmp_path, capsys):
    import shutil
    damage, message = CORRUPTIONS[case]
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    damage(folder, json.loads((saved / "config.json").read_text()))
    before = snapshot(folder)
    for argv in (["inspect", folder], ["certify", folder, "--text", "First"],
                 ["generate", folder, "--prompt", "Fi", "--max-new-tokens", "2"]):
        refused(argv, capsys, message)
    assert snapshot(folder) == before
    if not case.startswith("tokenizer"):  # the library entry: one-line OSError
        with pytest.raises(OSError) as info:
            LipformerForCausalLM.from_pretrained(folder)
        assert "\n" not in str(info.value).strip() and message in str(info.value)
    with pytest.raises(Exception):  # --debug re-raises: the traceback is there when asked for
        main(["--debug", "inspect", str(folder)])
    assert snapshot(folder) == before


def test_long_input_is_certified_whole_and_generate_keeps_the_prompt(saved, capsys):
    tok = char_tokenizer(VOCAB)
    text = TEXT * 3  # 3 × 60 characters, context 16
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert main(["certify", str(saved), "--json", "--text", text]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["index"] for p in doc["positions"]] == list(range(len(ids)))  # every position, one forward
    assert [p["token"] for p in doc["positions"]] == ids
    assert main(["generate", str(saved), "--prompt", text, "--max-new-tokens", "50", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(text) and len(out.rstrip("\n")) > len(text)  # the prompt kept, at least one new token


@pytest.mark.parametrize("argv, message", [
    (["generate", "{m}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{m}", "--prompt", "Zq~"], "outside the model's vocabulary"),
    (["generate", "{m}", "--prompt", "Fi", "--temperature", "-1"], "--temperature"),
    (["generate", "{m}", "--prompt", "Fi", "--temperature", "nan"], "--temperature"),
    (["generate", "{m}", "--prompt", "Fi", "--seed", "-5"], "--seed"),
    (["generate", "{m}", "--prompt", "Fi", "--max-new-tokens", "x"], "invalid int value"),
    (["certify", "{m}", "--file", "{m}/nope.txt"], "cannot read"),
    (["certify", "{m}", "--text", "Fi", "--file", "{m}/config.json"], "only one of --text or --file"),
    (["certify", "{m}", "--attack"], "--attack needs a text"),
    (["inspect", "{m}", "--frobnicate"], "unrecognized arguments"),
    (["fly"], "invalid choice"),
    ([], "missing command"),
])
def test_bad_flags_and_text(argv, message, saved, capsys):
    before = snapshot(saved)
    refused([a.format(m=saved) for a in argv], capsys, message)
    assert snapshot(saved) == before


@pytest.mark.parametrize("extra, message", [
    (["model.w_max.q=abc"], "w_max caps are numbers"),
    (["model.foo=1"], "unknown [model] keys ['foo']"),
    (["model.hidden_size=-8"], "hidden_size must be a positive integer"),
    (["model.hidden_size=30"], "divisible by num_attention_heads"),
    (["train.lr=-1"], "lr must be >= 0"),
    (["train.lr=nan"], "lr must be a finite number"),
    (["train.optimizer=sgdx"], "unknown [train] optimizer"),
    (["train.log_every=0"], "log_every must be >= 1"),
    (["train.certify_radii=abc"], "certify_radii must be a list"),
    (["train.dtype=float16"], "dtype must be float32 or bfloat16"),
])
def test_bad_recipe_values_are_refused_before_the_output_folder_is_touched(extra, message, corpus, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    refused(["train", "--preset", "tiny", "data.dataset=char_dir", f"data.path={corpus}", "--out", out, *extra],
            capsys, message)
    assert not out.exists()


def test_overrides_may_follow_options(corpus, tmp_path, monkeypatch, capsys):
    """`train --preset tiny a.b=1 --out X c.d=2`: both runs of overrides reach the recipe."""
    seen = {}
    monkeypatch.setattr("lipformer.training.train.run", lambda recipe, out, **kw: seen.update(r=recipe) or {"step": 1})
    assert main(["train", "--preset", "tiny", "data.dataset=char_dir", "--out", str(tmp_path / "r"),
                 f"data.path={corpus}", "train.lr=0.125", "--max-steps", "1", "train.seed=3"]) == 0
    assert seen["r"].train.lr == 0.125 and seen["r"].train.seed == 3 and seen["r"].data.path == str(corpus)


def test_output_folder_of_a_different_run_is_refused_by_the_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "data.dataset=char_dir", f"data.path={corpus}", "train.eval_every=0",
            "--out", str(out)]
    assert main([*base, "--max-steps", "2"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    refused([*base, "--max-steps", "2"], capsys, "already holds a run", "--resume", "--overwrite")
    refused([*base, "model.hidden_size=64", "--resume"], capsys, "different [model]")
    assert snapshot(out) == before
    assert main([*base, "--max-steps", "2", "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# fuzzing

_ints = st.one_of(st.integers(-3, 70), st.sampled_from([2 ** 31, -(2 ** 40)]))
_values = st.one_of(_ints, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.booleans(),
                    st.none(), st.lists(st.integers(-2, 3), max_size=2),
                    st.dictionaries(st.sampled_from(["q", "head", "zz"]), st.floats(-1, 3), max_size=2))
_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "max_position_embeddings", "rope_theta", "softmax_scale", "residual_alpha", "w_max", "input_radius",
           "constraint", "cap_method", "linear", "poet_block_size", "poet_neumann_terms", "use_cache",
           "tie_word_embeddings", "pad_token_id", "position_bias", "activation"]


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=4))
def test_fuzz_config_values_are_valid_or_one_line_value_errors(kwargs):
    try:
        config = LipformerConfig(**kwargs)
    except ValueError as exc:
        message = str(exc)
        assert message and "\n" not in message
        # the message names the field it refuses
        assert any(name in message for name in [*_FIELDS, "head size"]), message
        return
    assert config.hidden_size % config.num_attention_heads == 0 and config.hidden_size > 0
    assert all(v > 0 for v in config.w_max.values()) and 0 < config.residual_alpha <= 1
    LipformerConfig.from_dict(config.to_dict())  # what it saves loads back


@pytest.fixture(scope="module")
def cli_world(saved, corpus, tmp_path_factory):
    """Folders the CLI fuzz may name: a good model, a missing one, a corrupt one, a text file."""
    import shutil
    root = tmp_path_factory.mktemp("cli")
    bad = root / "bad"
    shutil.copytree(saved, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 7)
    (root / "text.txt").write_text("First")
    return {"GOOD": str(saved), "BAD": str(bad), "MISSING": str(root / "missing"), "TXT": str(root / "text.txt"),
            "CORPUS": str(corpus), "OUT": str(root / "out")}


_TOKENS = ["inspect", "certify", "generate", "train", "demo", "GOOD", "BAD", "MISSING", "--text", "--file", "TXT",
           "--json", "--attack", "--prompt", "Fir", "", "Zq~", "--max-new-tokens", "3", "0", "-1", "abc",
           "--temperature", "0.5", "nan", "--seed", "--preset", "tiny", "nope", "--config", "--out", "OUT",
           "--resume", "--overwrite", "--max-steps", "data.dataset=char_dir", "data.path=CORPUS", "train.lr=0.01",
           "train.lr=x", "model.hidden_size=30", "model.w_max.q=abc", "lr=1", "--help", "-h", "--frob", "="]


@FUZZ
@given(argv=st.lists(st.sampled_from(_TOKENS), min_size=0, max_size=8))
def test_fuzz_cli_arguments_exit_0_or_2_without_a_traceback(argv, cli_world, monkeypatch, capsys):
    # training itself is stubbed: this fuzzes parsing and validation, not the optimizer
    monkeypatch.setattr("lipformer.training.train.run", lambda recipe, out, **kw: {
        "step": 1, "final": cli_world["GOOD"], "certified_accuracy": {"0.001": 0.0}})
    argv = [cli_world.get(a, a).replace("CORPUS", cli_world["CORPUS"]) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # only --help / -h exit this way (argparse prints the help)
        assert exc.code == 0 and ("--help" in argv or "-h" in argv)
        return
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    assert "Traceback" not in captured.err
    if code == 2:
        lines = [l for l in captured.err.strip().splitlines() if not l.startswith(("train:", "certify:"))]
        assert len(lines) == 1 and lines[0].startswith("lipformer: error: "), (argv, captured.err)


@FUZZ
@given(data=st.binary(max_size=2048), name=st.sampled_from(["model.safetensors", "config.json", "tokenizer.json"]))
def test_fuzz_random_bytes_in_a_model_folder(data, name, saved, tmp_path_factory, capsys):
    import shutil
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(saved, folder)
    (folder / name).write_bytes(data)
    refused(["inspect", folder], capsys)
    assert (folder / name).read_bytes() == data


@FUZZ
@given(data=st.one_of(st.binary(max_size=3000),
                 # a real shard header followed by random bytes: the size check must catch it
                 st.binary(max_size=600).map(lambda b: np.array([20240520, 1, len(b) // 2 + 5] + [0] * 253,
                                                                "<i4").tobytes() + b)))
def test_fuzz_random_bytes_as_token_shards(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "x_train_000.bin"
    path.write_bytes(data)
    for reader in (read_shard, load_tokens):
        try:
            tokens = reader(path)
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert tokens.dtype == np.uint16
    assert path.read_bytes() == data


def test_damaged_char_corpus_is_refused_before_training(corpus, tmp_path, capsys):
    """Random bytes in train.bin (ids past the vocabulary) would crash inside the embedding."""
    import shutil
    damaged = tmp_path / "char"
    shutil.copytree(corpus, damaged)
    size = (damaged / "train.bin").stat().st_size
    (damaged / "train.bin").write_bytes(random.Random(0).randbytes(size))
    before = snapshot(damaged)
    refused(["train", "--preset", "tiny", "data.dataset=char_dir", f"data.path={damaged}", "--out",
             tmp_path / "run"], capsys, "do not match its meta.json")
    assert snapshot(damaged) == before and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# faults

def _recipe_args(corpus, out, *extra):
    return ["train", "--preset", "tiny", "--out", str(out), "data.dataset=char_dir", f"data.path={corpus}",
            "train.eval_every=0", *extra]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(corpus, tmp_path, monkeypatch, capsys):
    """torch.save fails with ENOSPC on the second checkpoint: one line, step-2 checkpoint intact, resumable."""
    from lipformer.training.train import find_checkpoint
    out = tmp_path / "run"
    args = _recipe_args(corpus, out, "train.max_steps=6", "train.checkpoint_every=2")
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            real_save(obj, f, *a, **kw)  # a partial file, as a full disk leaves it
            with open(f, "r+b") as h:
                h.truncate(100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    line = refused(args, capsys, "No space left on device", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = find_checkpoint(out)
    assert ckpt is not None and torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 2
    assert LipformerForCausalLM.from_pretrained(ckpt) is not None
    assert main([*args, "--resume"]) == 0  # and the resumed run ends where an unbroken one does
    assert main(_recipe_args(corpus, tmp_path / "straight", "train.max_steps=6", "train.checkpoint_every=2")) == 0
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(tmp_path / "straight" / "final" /
                                                                             "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), line


def test_kill_9_at_random_points_then_resume_is_bit_identical(corpus, tmp_path):
    """SIGKILL the trainer three times (checkpoints every step, so kills land inside writes too),
    `--resume` after each; the final weights equal an uninterrupted run's, bit for bit."""
    from lipformer.training.train import find_checkpoint
    steps = 36
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count (so float sums) in every process

    def train(out, *extra, wait=True):
        cmd = [sys.executable, "-m", "lipformer.cli", *_recipe_args(corpus, out, f"train.max_steps={steps}",
                                                                    "train.checkpoint_every=1"), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if wait:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode()[-1000:]
        return proc

    def step_of(out):
        ckpt = find_checkpoint(out)
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] if ckpt else 0

    rng = random.Random(9)
    out = tmp_path / "killed"
    kills = []
    for target in (4, 14, 24):
        proc = train(out, *(["--resume"] if kills else []), wait=False)
        deadline = time.time() + 120
        while step_of(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a step or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(step_of(out))
    assert kills[-1] < steps, f"the run finished before the last kill ({kills})"
    train(out, "--resume")
    train(tmp_path / "straight")
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kills
