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


def test_whole_split_counts_match_an_independent_pass(saved, corpus, capsys):
    val = np.fromfile(Path(corpus) / "val.bin", dtype=np.uint16).astype(np.int64)
    n = (len(val) - 1) // (B * T) * B * T            # every full batch of an in-order pass
    assert n >= 4 * B * T
    data = ["--preset", "tiny", "data.dataset=char_dir", f"data.path={corpus}"]
    out = run(capsys, saved, *data, "--sample", n, "--batches", 0, "--eps", "0.003,0.01", "--threads", 1)

    model = LipformerForCausalLM.from_pretrained(saved).double()
    x = torch.from_numpy(val[:n]).reshape(-1, T)
    with torch.no_grad():
        pred = model(x).logits.argmax(-1)
    right = (pred == torch.from_numpy(val[1:n + 1]).reshape(-1, T)).double().mean().item()
    shifted = (pred == torch.from_numpy(val[2:n + 2]).reshape(-1, T)).double().mean().item()
    assert out["sample"]["drawn_from"] == n
    assert out["sample"]["accuracy_all"] == pytest.approx(right, abs=1e-12)
    assert abs(shifted - right) > 0.05     # control: labels one place off would be caught
    assert right > 0.5                     # the model predicts this text, not a frequency table

    # every position sampled: the exact whole-split counts and the sampled ones must be the same numbers
    assert out["positions"] == n and out["accuracy"] == pytest.approx(right, abs=1e-12)
    assert out["sample"]["global_disagreements"] == 0
    for e in ("0.003", "0.01"):
        cert = out["certified_accuracy"][e]
        assert cert["global"] == pytest.approx(out["sample"]["global_all"][e], abs=1e-12)
        assert out["sample"]["best_estimate"][e]["value"] == pytest.approx(cert["best"], abs=1e-12)
        assert 0 < cert["global"] <= cert["best"] <= right
    c = out["certified_accuracy"]["0.01"]
    assert c["global"] < c["best"]         # the relaxation's share is counted too, not only the global one


def test_a_sample_larger_than_the_population_is_refused(saved, corpus, capsys):
    with pytest.raises(SystemExit, match="more than the"):
        load_script().main([str(saved), "--preset", "tiny", "data.dataset=char_dir", f"data.path={corpus}",
                            "--sample", "100000", "--batches", "0"])
