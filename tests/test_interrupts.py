"""Runs a user interrupts and comes back to: Ctrl-C / SIGTERM, --resume edge cases, a second demo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lipformer.cli import main
from lipformer.training.checkpoint import find_checkpoint, read_metrics
from lipformer.training.recipe import load_recipe
from lipformer.training.train import run

CORPUS = ("ROMEO:\nWhat says the man? Speak, and be brief.\n\nQUEEN:\nHe says the night is long, my lord.\n"
          "\nKING:\nThen let it end.\n") * 30


def args(corpus, out, *extra):
    return ["train", "--preset", "tiny", "--out", str(out), "data.dataset=char_dir", f"data.path={corpus}",
            "train.eval_every=0", *extra]


def step_of(out) -> int:
    return int(torch.load(find_checkpoint(out) / "trainer_state.pt", weights_only=True)["step"])


def same_weights(a, b) -> bool:
    a, b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    return err.strip()


def test_signals_checkpoint_the_current_step_and_resume_is_bit_identical(corpus, tmp_path):
    """A real SIGINT, then a SIGTERM, to a running `lipformer train` (no periodic checkpoints: only the
    interrupt saves); each exits 128+signal with one line, and the resumed run's final weights equal an
    uninterrupted run's bit for bit."""
    steps = 200
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float sums in every process
    cmd = [sys.executable, "-m", "lipformer.cli",
           *args(corpus, "OUT", f"train.max_steps={steps}", "train.checkpoint_every=0", "train.log_every=1")]

    def train(out, *extra):
        return subprocess.Popen([c.replace("OUT", str(out)) for c in cmd] + list(extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)

    out = tmp_path / "interrupted"
    interrupted_at = []
    for sig, extra in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume"])):
        proc = train(out, *extra)
        reached = (interrupted_at or [0])[-1] + 3
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and \
                max((r["step"] for r in read_metrics(out / "metrics.jsonl")), default=0) < reached:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err[-800:]
        step = step_of(out)
        assert reached <= step < steps
        assert err.strip().splitlines()[-1] == f"lipformer: interrupted at step {step}; continue with --resume"
        assert "Traceback" not in err
        interrupted_at.append(step)
    resumed = train(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-800:]
    straight = train(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-800:]
    assert same_weights(out / "final", tmp_path / "straight" / "final"), interrupted_at
    # one metrics row per step, in order, like the uninterrupted run's
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))


def test_resume_without_a_checkpoint_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*args(corpus, out), "--resume"]) == 2
    one_line_error(capsys, "--resume", "does not exist", "without --resume")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*args(corpus, out), "--resume"]) == 2
    one_line_error(capsys, "has no checkpoint", "--overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}
    # --resume --overwrite: no checkpoint, so a fresh run; then a checkpoint, so it continues
    assert main([*args(corpus, out, "train.max_steps=6"), "--resume", "--overwrite", "--max-steps", "3"]) == 0
    assert step_of(out) == 3 and not (out / "notes.txt").exists()
    capsys.readouterr()
    assert main([*args(corpus, out, "train.max_steps=6"), "--resume", "--overwrite"]) == 0
    assert "resumed from" in capsys.readouterr().out and step_of(out) == 6


def test_max_steps_at_or_below_the_checkpoint_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*args(corpus, out, "train.max_steps=10"), "--max-steps", "4"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    for n in ("4", "2"):
        assert main([*args(corpus, out, "train.max_steps=10"), "--resume", "--max-steps", n]) == 2
        one_line_error(capsys, f"--max-steps {n} is not past the checkpoint's step 4")
    # a recipe whose schedule ends before the checkpoint would follow another learning-rate schedule
    assert main([*args(corpus, out, "train.max_steps=3"), "--resume"]) == 2
    one_line_error(capsys, "step 4, past train.max_steps 3")
    assert snapshot(out) == before
    assert main([*args(corpus, out, "train.max_steps=10"), "--resume", "--max-steps", "5"]) == 0
    assert step_of(out) == 5


def test_resume_trims_metrics_written_after_the_checkpoint(corpus, tmp_path):
    """A SIGKILL after step 9 with the checkpoint at 8 leaves rows 9 in metrics.jsonl; the resumed run
    redoes step 9, and the file must not go back in time."""
    r = load_recipe("tiny", None, ["data.dataset=char_dir", f"data.path={corpus}", "train.max_steps=12",
                                   "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=4"])
    quiet = {"progress": False, "log": lambda *a: None}
    run(r, tmp_path / "run", max_steps=8, **quiet)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "loss": 123.0}) + "\n" + '{"step": 10, "lo')  # and a torn line
    run(r, tmp_path / "run", resume=True, **quiet)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [x["step"] for x in rows] == list(range(1, 13))
    assert all(x["loss"] != 123.0 for x in rows)


def test_a_finished_run_is_reused_not_retrained(corpus, tmp_path):
    r = load_recipe("tiny", None, ["data.dataset=char_dir", f"data.path={corpus}", "train.max_steps=6",
                                   "train.eval_every=3"])
    quiet = {"progress": False, "log": lambda *a: None}
    first = run(r, tmp_path / "run", **quiet)
    before = snapshot(tmp_path / "run")
    again = run(r, tmp_path / "run", resume=True, **quiet)
    assert snapshot(tmp_path / "run") == before
    for key in ("step", "val_acc", "val_loss", "final", "certified_accuracy"):
        assert again[key] == first[key], key


def test_demo_twice_reuses_the_run_and_never_prints_nan(corpus, tmp_path, capsys):
    small = ["data.dataset=char_dir", f"data.path={corpus}", "model.hidden_size=32", "model.num_hidden_layers=1",
             "model.max_position_embeddings=32", "train.batch_size=4", "train.max_steps=4", "train.eval_every=2",
             "train.eval_batches=1", "train.warmup_steps=1"]
    outputs = []
    for _ in range(2):
        assert main(["demo", "--out", str(tmp_path / "d"), *small]) == 0
        outputs.append(capsys.readouterr().out)
    for text in outputs:
        assert "nan" not in text.lower()
    accuracy = [[ln for ln in text.splitlines() if ln.strip().startswith("val accuracy")] for text in outputs]
    assert accuracy[0] and accuracy[0] == accuracy[1]
    assert "already finished" in outputs[1]
    reference = next(ln for ln in outputs[0].splitlines() if "bigram reference" in ln)
    assert 0 < float(reference.split()[2].rstrip(":")) < 1
    # the certified fractions name the positions they were measured on, and the rerun prints the same
    certified = [[ln.strip() for ln in text.splitlines() if "val positions)" in ln] for text in outputs]
    assert len(certified[0]) == 2 and certified[0] == certified[1]
    assert "best radius, first" in certified[0][0] and "global radius, all" in certified[0][1]
    # "within its cap" only when the largest factor/w_max printed beside it is ≤ 1; otherwise the excess is named
    norms = next(ln for ln in outputs[0].splitlines() if "weight norms:" in ln)
    ratio = float(norms.split("largest factor/w_max ")[1].split(",")[0])
    assert ("within its cap" in norms and ratio <= 1) or " of its cap (the projection's tolerance" in norms, norms
