"""Training end to end on a corpus the test makes: resume bit-identity, crash safety, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lipformer.training.recipe import RecipeError, load_recipe
from lipformer.training.train import find_checkpoint, run

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n") * 20


def recipe(corpus, *extra):
    return load_recipe("tiny", None, ["data.dataset=char_dir", f"data.path={corpus}", "train.max_steps=12",
                                      "train.eval_every=6", "train.checkpoint_every=4", *extra])


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_trains_end_to_end(corpus, tmp_path):
    result = run(recipe(corpus), tmp_path / "run", progress=False, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert result["val_acc"] > 0.15 and result["lipschitz_total"] > 0
    final = tmp_path / "run" / "final"
    for name in ("model.safetensors", "tokenizer.json", "certificate.json", "certified_accuracy.json"):
        assert (final / name).is_file()
    assert (tmp_path / "run" / "metrics.png").is_file()


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(corpus, tmp_path, optimizer):
    r = recipe(corpus, f"train.optimizer={optimizer}", "train.lr=0.01")
    run(r, tmp_path / "straight", progress=False, log=lambda *a: None)
    run(r, tmp_path / "split", max_steps=5, progress=False, log=lambda *a: None)
    run(r, tmp_path / "split", resume=True, progress=False, log=lambda *a: None)
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "split" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_args_reach_the_optimizer(corpus, tmp_path, monkeypatch):
    import functools

    import lipformer.optim.alto as alto

    seen = {}
    init = alto.ALTO.__init__

    @functools.wraps(init)  # keeps the signature the recipe check reads
    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(alto.ALTO, "__init__", spy)
    r = recipe(corpus, "train.optimizer=alto", "train.lr=0.003", "train.optimizer_args.preset=small_batch")
    run(r, tmp_path / "alto", max_steps=2, progress=False, log=lambda *a: None)
    assert seen["preset"] == "small_batch"


def test_ns_dtype_by_name_and_the_float32_default_on_a_cpu_without_native_bf16(corpus, monkeypatch):
    """A recipe names the Newton–Schulz dtype ("float32"); unnamed, it is bf16 (torch.optim.Muon's
    default) where the CPU has native bf16 and float32 where bf16 would be emulated."""
    import lipformer.training.train as train_module
    from lipformer import LipformerConfig, LipformerForCausalLM

    def ns_dtypes(*overrides, native):
        monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: native)
        r = recipe(corpus, *overrides)
        model = LipformerForCausalLM(LipformerConfig(**{**r.model, "vocab_size": 40}))
        optimizer, _ = train_module.build_optimizer_for(model, r.train)
        return {g["ns_dtype"] for g in optimizer.param_groups if "ns_dtype" in g}

    assert ns_dtypes(native=True) == {torch.bfloat16}
    assert ns_dtypes(native=False) == {torch.float32}
    assert ns_dtypes("train.optimizer_args.ns_dtype=bfloat16", native=False) == {torch.bfloat16}  # named: kept
    assert ns_dtypes("train.optimizer_args.ns_dtype=float32", native=True) == {torch.float32}
    assert ns_dtypes("train.optimizer_args.ns_dtype=none", native=True) == {None}
    assert ns_dtypes("train.optimizer=adamw", native=False) == set()  # no Newton–Schulz: nothing added


BUNDLED_PRESETS = ["demo", "gpt2-small", "shakespeare-char", "tiny"]


def test_the_preset_list_below_is_every_bundled_preset():
    from lipformer.training.recipe import presets

    assert presets() == BUNDLED_PRESETS


@pytest.mark.parametrize("preset", BUNDLED_PRESETS)
def test_every_bundled_preset_loads_and_builds_its_model_and_optimizer(preset):
    """A preset is a file users run for an hour: a key the recipe no longer knows, a cap table the model
    refuses or an optimizer argument the optimizer rejects must fail here, not at the start of a run.
    The width is shrunk (same kinds of layers and options) so gpt2-small costs no memory."""
    import lipformer.training.train as train_module
    from lipformer import LipformerConfig, LipformerForCausalLM
    r = load_recipe(preset)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 40}
    model = LipformerForCausalLM(LipformerConfig(**{**r.model, **small}))
    optimizer, schedule = train_module.build_optimizer_for(model, r.train)
    assert len(optimizer.param_groups) >= 1 and schedule.last_epoch == 0


def test_resume_keeps_this_machines_ns_dtype_not_the_checkpoints(corpus, tmp_path, monkeypatch):
    """Started where bf16 is native (bf16 Newton–Schulz saved in the optimizer state), resumed where it
    is emulated: the resumed steps run, and the next checkpoint records, float32."""
    import lipformer.training.train as train_module
    from lipformer.training.checkpoint import STATE_NAME
    said = []
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)
    run(recipe(corpus), tmp_path / "r", max_steps=4, progress=False, log=said.append)
    saved = lambda: {g["ns_dtype"] for g in torch.load(find_checkpoint(tmp_path / "r") / STATE_NAME,  # noqa: E731
                                                       weights_only=True)["optimizer"]["param_groups"]
                     if "ns_dtype" in g}
    assert saved() == {torch.bfloat16} and not any("Newton–Schulz runs in float32" in x for x in said)
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    run(recipe(corpus), tmp_path / "r", max_steps=8, resume=True, progress=False, log=said.append)
    assert saved() == {torch.float32} and any("Newton–Schulz runs in float32" in x for x in said)


def test_bf16_autocast_on_a_cpu_without_native_bf16_warns_with_the_fix(monkeypatch):
    import lipformer.training.train as train_module
    said = []
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    train_module._warn_if_bf16_is_emulated("bfloat16", torch.device("cpu"), said.append)
    train_module._warn_if_bf16_is_emulated("float32", torch.device("cpu"), said.append)  # float32: nothing
    train_module._warn_if_bf16_is_emulated("bfloat16", torch.device("cuda"), said.append)  # a GPU: nothing
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)
    train_module._warn_if_bf16_is_emulated("bfloat16", torch.device("cpu"), said.append)  # native: nothing
    assert len(said) == 1 and "no native bf16" in said[0] and "train.dtype=float32" in said[0]


def test_output_folder_of_another_run_is_refused(corpus, tmp_path):
    run(recipe(corpus), tmp_path / "run", max_steps=2, progress=False, log=lambda *a: None)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RecipeError, match="already holds a run"):
        run(recipe(corpus), tmp_path / "run", progress=False, log=lambda *a: None)
    with pytest.raises(RecipeError, match="different \\[model\\]"):
        run(recipe(corpus, "model.hidden_size=64"), tmp_path / "run", resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_init_from_starts_at_the_saved_weights(corpus, tmp_path):
    """train.init_from: the first step's loss is the trained model's, not a fresh init's; a folder
    whose model is not the recipe's is refused before anything is written."""
    quiet = dict(progress=False, log=lambda *a: None)
    run(recipe(corpus, "train.max_steps=30", "train.checkpoint_every=0"), tmp_path / "base", **quiet)

    def first_loss(name, *extra):
        run(recipe(corpus, "train.max_steps=1", "train.log_every=1", "train.eval_every=0", *extra),
            tmp_path / name, **quiet)
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    trained = [json.loads(x)["loss"] for x in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()][-1]
    fresh, tuned = first_loss("fresh"), first_loss("tuned", f"train.init_from={tmp_path / 'base' / 'final'}")
    assert fresh - trained > 0.3 and abs(tuned - trained) < 0.25 * (fresh - trained)
    with pytest.raises(RecipeError, match="differs from the recipe"):
        run(recipe(corpus, "model.softmax_scale=3", f"train.init_from={tmp_path / 'base' / 'final'}"),
            tmp_path / "other", **quiet)
    assert not (tmp_path / "other").exists()


def test_weight_average_is_the_ema_of_the_steps_and_resumes_bit_identically(corpus, tmp_path):
    """train.ema_decay: OUT/final is e ← d·e + (1 − d)·w over the weights after steps ema_start + 1 …
    max_steps (each read from a checkpoint of a run stopped there), OUT/checkpoint keeps the last
    step's, a run split by --resume ends bit-identical to a straight one, and every capped matrix of
    the average is no larger than the largest of the weights averaged (the caps are convex sets)."""
    from lipformer import LipformerForCausalLM
    from lipformer.modeling import certificate_status
    from lipformer.nn import constrained_modules

    quiet = dict(progress=False, log=lambda *a: None)
    r = recipe(corpus, "train.ema_decay=0.6", "train.ema_start=8", "train.checkpoint_every=0")
    run(r, tmp_path / "straight", **quiet)
    steps = {}
    for k in (1, 8, 9, 10, 11, 12):  # stopped (and checkpointed) after each step of the average
        run(r, tmp_path / "split", max_steps=k, resume=k > 1, **quiet)
        steps[k] = weights(find_checkpoint(tmp_path / "split"))
    final = weights(tmp_path / "split" / "final")
    assert all(torch.equal(final[n], v) for n, v in weights(tmp_path / "straight" / "final").items())
    expected = dict(steps[9])
    for k in (10, 11, 12):
        expected = {n: torch.lerp(e, steps[k][n], 0.4) for n, e in expected.items()}
    for n, e in expected.items():
        assert torch.allclose(final[n], e, rtol=0, atol=1e-6), n
    # control: the average is not the last step's weights (nor the first averaged step's)
    matrices = [n for n in final if final[n].dim() == 2]
    assert max(float((final[n] - steps[12][n]).abs().max()) for n in matrices) > 1e-4
    assert max(float((final[n] - steps[9][n]).abs().max()) for n in matrices) > 1e-4
    assert certificate_status(tmp_path / "split" / "final")[0] == "ok"
    model = LipformerForCausalLM.from_pretrained(tmp_path / "split" / "final")
    for name, module in constrained_modules(model):
        if hasattr(module, "sigma_cap"):
            key = f"{name}.weight"
            largest = max(float(torch.linalg.matrix_norm(steps[k][key].double(), 2)) for k in (9, 10, 11, 12))
            assert float(torch.linalg.matrix_norm(module.weight.detach().double(), 2)) <= largest + 1e-6, name
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row for row in rows if "val_acc" in row}
    assert "ema_val_acc" not in evals[6] and 0 < evals[12]["ema_val_acc"] <= 1


def test_distillation_pulls_the_student_toward_its_teacher(corpus, tmp_path):
    """train.distill_from: with β = 1 the student is fitted to the teacher's distribution, so it ends
    closer to the teacher (in KL, on text neither saw as a batch) than the same run without the
    teacher — the control that fails if the teacher never reaches the loss. A teacher that cannot read
    the run's sequences is refused before anything is written."""
    import numpy as np
    import torch.nn.functional as F

    from lipformer import LipformerForCausalLM

    quiet = dict(progress=False, log=lambda *a: None)
    teacher_dir = tmp_path / "teacher" / "final"
    run(recipe(corpus, "train.max_steps=40", "train.checkpoint_every=0", "train.eval_every=0"),
        tmp_path / "teacher", **quiet)
    plain = ["train.max_steps=15", "train.checkpoint_every=0", "train.eval_every=0", "train.seed=3"]
    run(recipe(corpus, *plain), tmp_path / "plain", **quiet)
    run(recipe(corpus, *plain, f"train.distill_from={teacher_dir}", "train.distill_weight=1"),
        tmp_path / "distilled", **quiet)
    teacher = LipformerForCausalLM.from_pretrained(teacher_dir)
    val = np.fromfile(os.path.join(corpus, "val.bin"), dtype=np.uint16).astype(np.int64)
    ids = torch.from_numpy(val[: 4 * 32]).view(4, 32)

    def kl(folder):
        with torch.no_grad():
            s = LipformerForCausalLM.from_pretrained(folder)(ids).logits
            t = teacher(ids).logits
        return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))

    assert kl(tmp_path / "distilled" / "final") < 0.85 * kl(tmp_path / "plain" / "final")
    with pytest.raises(RecipeError, match="reads at most 32 positions"):
        run(recipe(corpus, "model.max_position_embeddings=64", f"train.distill_from={teacher_dir}"),
            tmp_path / "long", **quiet)
    assert not (tmp_path / "long").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from lipformer.training.train import TrainingStopped
    r = recipe(corpus, "train.optimizer=adamw", "train.lr=1e30", "train.schedule=constant")
    with pytest.raises(TrainingStopped, match="last good checkpoint"):
        run(r, tmp_path / "run", progress=False, log=lambda *a: None)
    ckpt = find_checkpoint(tmp_path / "run")
    if ckpt is not None:  # every checkpoint that exists holds finite weights
        assert all(torch.isfinite(t).all() for t in weights(ckpt).values())


def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(corpus, tmp_path):
    """SIGKILL the trainer at many moments (some inside checkpoint writes): a checkpoint always loads."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lipformer.cli", "train", "--preset", "tiny", "--out", str(out),
            "data.dataset=char_dir", f"data.path={corpus}", "train.max_steps=400", "train.checkpoint_every=1",
            "train.eval_every=0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while find_checkpoint(out) is None and time.time() < deadline:
        time.sleep(0.2)
    assert find_checkpoint(out) is not None
    time.sleep(1.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from lipformer import LipformerForCausalLM
    model = LipformerForCausalLM.from_pretrained(find_checkpoint(out))
    assert torch.load(find_checkpoint(out) / "trainer_state.pt", weights_only=True)["step"] >= 1
    assert model is not None
    resumed = subprocess.run([*args[:-2], "train.max_steps=400", "--resume", "--max-steps",
                              str(torch.load(find_checkpoint(out) / "trainer_state.pt", weights_only=True)["step"] + 1)],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-500:]


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope", "--out", "{tmp}/a"], "unknown preset 'nope'"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.lrr=1"], "unknown [train] keys"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "lr=1"], "must look like"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.max_steps=abc"], "must be an integer"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "data.dataset=char_dir", "data.path={tmp}/none"], "{tmp}/none"),
    (["train", "--out", "{tmp}/a"], "one of the arguments --preset --config is required"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.init_from={tmp}/none"], "init_from must be a saved model"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.distill_from={tmp}/none"], "distill_from must be a saved model"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.distill_weight=2"], "distill_weight must be in [0, 1]"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.distill_temperature=0"], "distill_temperature must be > 0"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.ema_decay=1"], "ema_decay must be in [0, 1)"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.ema_decay=0.9", "train.ema_start=20"],
     "ema_start (20) must be below max_steps"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.optimizer_args.foo=1"], "['foo'] are not options of 'muon'"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.optimizer=alto", "train.optimizer_args.preset=huge"],
     "unknown preset 'huge'"),
    (["train", "--preset", "tiny", "--out", "{tmp}/a", "train.optimizer_args.ns_dtype=fp32"],
     "optimizer_args.ns_dtype must be one of float32, bfloat16"),
])
def test_train_cli_bad_input(argv, message, tmp_path, capsys):
    from lipformer.cli import main
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_poet_model_trains_through_the_recipe_and_stays_at_its_caps(corpus, tmp_path):
    """linear=poet: the per-step projection skips POET layers; each merge caps W0, so with a
    large learning rate (where Cayley–Neumann stretch compounds) the merged σ is at the cap."""
    from lipformer import LipformerForCausalLM
    from lipformer.poet import POETLinear
    r = recipe(corpus, "model.linear=poet", "model.poet_block_size=8", "train.optimizer=adamw",
               "train.lr=0.02", "train.merge_every=3")  # 12 steps: the last one merges
    result = run(r, tmp_path / "run", progress=False, log=lambda *a: None)
    model = LipformerForCausalLM.from_pretrained(result["final"])
    poet = [m for m in model.modules() if isinstance(m, POETLinear)]
    assert len(poet) == 2 * 6
    for m in poet:
        assert m.norm_upper() <= m.w_max * (1 + 1e-3)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
