"""scripts/certify_val.py, the script behind the headline certified-accuracy figures: its whole-split
population and its counts checked against an independent pass over the raw val tokens."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fit_capped

from lipformer import LipformerConfig, LipformerForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
          "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n") * 70
T, B = 32, 8   # the tiny preset's sequence length and batch size


def load_script():
    spec = importlib.util.spec_from_file_location("certify_val", ROOT / "scripts" / "certify_val.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A position-only maxmin model trained on the corpus' train split until it uses context, saved."""
    meta = json.loads((Path(corpus) / "meta.json").read_text())
    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(
        vocab_size=meta["vocab_size"], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=T, w_max={"head": 8.0}, softmax_scale=0.0, position_bias=6,
        activation="maxmin", residual_alpha=0.5))
    train = torch.from_numpy(np.fromfile(Path(corpus) / "train.bin", dtype=np.uint16).astype(np.int64))
    rows = train[:16 * T].reshape(16, T)
    first, last = fit_capped(model, rows, steps=80)
    assert last < first - 1.5
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


def run(capsys, *args):
    assert load_script().main([str(a) for a in args]) == 0
    return json.loads(capsys.readouterr().out)


def data(corpus):
    return ["--preset", "tiny", "data.dataset=char_dir", f"data.path={corpus}"]


def whole_split(corpus):
    """Every full window of the val split in order, as the script reads it with --batches 0."""
    val = np.fromfile(Path(corpus) / "val.bin", dtype=np.uint16).astype(np.int64)
    return val, (len(val) - 1) // T * T


def test_whole_split_counts_match_an_independent_pass(saved, corpus, capsys):
    val, n = whole_split(corpus)
    assert n >= 4 * B * T and len(val) - 1 - n < T     # only the last partial window is left out
    out = run(capsys, saved, *data(corpus), "--sample", n, "--batches", 0, "--eps", "0.003,0.01", "--threads", 1)

    model = LipformerForCausalLM.from_pretrained(saved).double()
    x = torch.from_numpy(val[:n]).reshape(-1, T)
    with torch.no_grad():
        pred = model(x).logits.argmax(-1)
    right = (pred == torch.from_numpy(val[1:n + 1]).reshape(-1, T)).double().mean().item()
    shifted = (pred == torch.from_numpy(val[2:n + 2]).reshape(-1, T)).double().mean().item()
    assert out["positions"] == n and out["best_is_estimate"]
    assert out["accuracy"] == pytest.approx(right, abs=1e-12)
    assert abs(shifted - right) > 0.05     # control: labels one place off would be caught
    assert right > 0.5                     # the model predicts this text, not a frequency table

    # every position sampled: the whole-population figures and the sampled ones must be the same numbers
    sample = out["sample"]
    assert sample["positions"] == n and sample["accuracy"] == pytest.approx(right, abs=1e-12)
    assert sample["global_disagreements"] == 0
    for e in ("0.003", "0.01"):
        cert = out["certified_accuracy"][e]
        assert sample["added_share"][e] == pytest.approx(cert["best"] - cert["global"], abs=1e-12)
        assert cert["global"] == pytest.approx(sample["certified"][e]["global"], abs=1e-12)
        assert cert["best"] == pytest.approx(sample["certified"][e]["best"], abs=1e-12)
        assert 0 < cert["global"] <= cert["best"] <= right
    c = out["certified_accuracy"]["0.01"]
    assert c["global"] < c["best"]         # the relaxation's share is counted too, not only the global one


def test_a_sample_estimate_covers_the_whole_split_figure(saved, corpus, capsys):
    _, n = whole_split(corpus)
    args = [saved, *data(corpus), "--batches", 0, "--eps", "0.01"]
    exact = run(capsys, *args, "--sample", n)["certified_accuracy"]["0.01"]["best"]
    part = run(capsys, *args, "--sample", 300, "--seed", 3)
    lo, hi = part["sample"]["best_wilson95"]["0.01"]
    assert part["sample"]["positions"] == 300 and part["positions"] == n
    assert lo <= part["certified_accuracy"]["0.01"]["best"] <= hi
    assert lo <= exact <= hi


def test_no_attack_breaks_what_the_script_counts_as_certified(saved, corpus, capsys):
    out = run(capsys, saved, *data(corpus), "--sequences", 3, "--eps", "0.01,0.05", "--attack", 30)
    for e, c in out["certified_accuracy"].items():
        assert c["best"] <= out["robust_upper"][e] <= out["accuracy"]
    # control: at the larger radius the attack does flip correct predictions, so the bound above is not idle
    assert out["robust_upper"]["0.05"] < out["accuracy"]


def test_the_val_windows_follow_val_seed_not_the_presets_training_seed(saved, corpus, monkeypatch):
    """The population is the loop's draw for train.seed = val_seed − 1, whatever seed the preset trains
    with: a preset's seed change once moved every figure measured through this script to other windows."""
    import argparse
    import dataclasses

    import lipformer.training.recipe as recipe_module
    from lipformer.training.train import open_data

    script = load_script()

    def first_batch(val_seed, preset_seed=None):
        if preset_seed is not None:     # a preset that trains with another seed
            plain = recipe_module.load_recipe
            monkeypatch.setattr(recipe_module, "load_recipe", lambda **kw: dataclasses.replace(
                plain(**kw), train=dataclasses.replace(plain(**kw).train, seed=preset_seed)))
        a = argparse.Namespace(run=str(saved), preset="tiny", overrides=data(corpus)[2:], val_seed=val_seed)
        _, _, val = script.open_model_and_split(a)
        monkeypatch.undo()
        val.reset()
        return val.next_batch()[0]

    def loops_first_batch(train_seed):
        r = recipe_module.load_recipe(preset="tiny", overrides=[f"model.max_position_embeddings={T}",
                                                                *data(corpus)[2:], f"train.seed={train_seed}"])
        return open_data(r)[1].next_batch()[0]

    assert torch.equal(first_batch(1), loops_first_batch(0))
    assert torch.equal(first_batch(1, preset_seed=5), first_batch(1))
    assert torch.equal(first_batch(3, preset_seed=5), loops_first_batch(2))
    assert not torch.equal(first_batch(1), first_batch(3))   # control: the seed does pick other windows


def test_wilson_interval():
    wilson = load_script().wilson
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("extra, message", [
    (["--sample", "100000", "--batches", "0"], "more than the"),
    (["--sample", "-5"], "--sample must be at least 0"),
    (["--batches", "0"], "needs --sample"),
    (["--eps", "abc"], "comma-separated"),
    (["--eps", "-0.01"], "finite and positive"),
    (["--val-seed", "0"], "--val-seed must be at least 1"),
    (["model.max_position_embeddings=64"], "only data.* overrides"),
])
def test_bad_input_is_refused_in_one_line(saved, corpus, capsys, extra, message):
    assert load_script().main([str(saved), *data(corpus), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_without_a_model_or_a_foreign_split_is_refused(saved, corpus, capsys, tmp_path):
    assert load_script().main([str(tmp_path), *data(corpus)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    from lipformer.training.data import build_char_corpus

    other = tmp_path / "other"       # 200 distinct characters: more ids than the model's embedding has
    build_char_corpus(["".join(chr(0x100 + i) for i in range(200)) * 40], other)
    assert load_script().main([str(saved), "--preset", "tiny", "data.dataset=char_dir", f"data.path={other}"]) == 2
    assert "token ids" in capsys.readouterr().err


def test_a_split_whose_ids_mean_other_characters_is_refused(saved, corpus, capsys, tmp_path):
    import shutil

    from lipformer.training.data import build_char_corpus
    from lipformer.training.data.char_corpus import char_tokenizer_from_meta

    shifted = build_char_corpus(["".join(chr(ord(c) + 0x100) for c in CORPUS)], tmp_path / "shifted")
    for meta, code in ((shifted, 2), (corpus, 0)):   # same number of ids, other characters; control: its own
        folder = tmp_path / f"model-{code}"
        shutil.copytree(saved, folder)
        char_tokenizer_from_meta(meta).save_pretrained(folder)
        assert load_script().main([str(folder), *data(corpus), "--sequences", "1", "--eps", "0.01"]) == code
        if code:
            assert "not the one saved with the model" in capsys.readouterr().err


def load_slack():
    spec = importlib.util.spec_from_file_location("relaxation_slack", ROOT / "scripts" / "relaxation_slack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relaxation_slack_analyses_exactly_the_positions_the_relaxation_fails(saved, corpus, capsys):
    """scripts/relaxation_slack.py: every analysed position is correct, sampled, and lost by the plain
    relaxation (its worst class's bound ≤ 0), the refined bounds are the library's, and the summary
    counts its rows. Control: at a radius 100× smaller nothing fails, so nothing is analysed."""
    args = [saved, *data(corpus), "--sample", 200, "--batches", 0, "--limit", 3, "--refine", "8",
            "--freeze-last", "1,100"]
    assert load_slack().main([str(a) for a in args + ["--eps", "0.05"]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert 1 <= len(rows) == summary["analysed"] <= 3
    for r in rows:
        assert r["plain"] <= 0 and set(r["refined"]) == {"8"} and set(r["refined_frozen_last"]) == {"1", "100"}
        assert set(r["frozen"]) == {"0", "1", "all"}
    assert summary["positive"]["plain"] == 0
    assert summary["positive"]["refined[8]"] == sum(r["refined"]["8"][0] > 0 for r in rows)
    assert load_slack().main([str(a) for a in args + ["--eps", "0.0005"]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["analysed"] == 0


@pytest.mark.parametrize("extra, message", [(["--refine", "x"], "comma-separated integers"),
                                            (["--limit", "0"], "must be positive"),
                                            (["model.hidden_size=8"], "only data.* overrides")])
def test_relaxation_slack_refuses_bad_input_in_one_line(saved, corpus, capsys, extra, message):
    assert load_slack().main([str(saved), *data(corpus), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
