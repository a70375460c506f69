"""Certificates describe exactly what the model computes, on exactly the files in the folder.

- `certify` predictions are `argmax model(ids)` at every position, on texts longer than the
  context (a context-sensitive model; control: independent windows predict otherwise).
- `certificate.json` is computed from the files written, records their sha256, and is removed
  when no sound certificate can be written; the CLI says `stale` when the hashes do not match.
- `certify --file` decodes the file's bytes exactly.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lipformer import LipformerConfig, LipformerForCausalLM, certify, cli
from lipformer.modeling import certificate_status
from lipformer.tokenization import char_tokenizer

CHARS = "ab\r\ncdefghijklmnopqrstuvwxyz .,"
SHARP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
             softmax_scale=8.0, residual_alpha=0.5,
             w_max={"q": 2, "k": 2, "v": 2, "o": 2, "mlp_in": 2, "mlp_out": 2, "head": 8})


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(CHARS)


def sharp_model(tok) -> LipformerForCausalLM:
    torch.manual_seed(0)
    return LipformerForCausalLM(LipformerConfig(vocab_size=len(tok), **SHARP)).eval()


@pytest.fixture
def folder(tmp_path, tok):
    model = sharp_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


@torch.no_grad()
def test_certified_predictions_are_the_models_on_texts_longer_than_the_context(tok):
    m64 = certify.float64_copy(sharp_model(tok))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, len(tok), (70,), generator=g).tolist()  # 4.4 × the context of 16
    certs = certify.certify_tokens(m64, ids)
    predictions = [c.prediction for c in certs]
    assert predictions == m64(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    for t in range(0, 70, 3):  # what decoding from each prefix emits
        assert predictions[t] == int(m64(torch.tensor([ids[:t + 1]])).logits[0, -1].argmax())
    windows = [int(m64(torch.tensor([ids[s:s + 16]])).logits[0, t - s].argmax())
               for s in range(0, 70, 16) for t in range(s, min(s + 16, 70))]
    assert windows != predictions  # control: the old per-window certificate differs
    assert certify.certify_tokens(m64, ids, m64.bounds(positions=70)) == certs
    # L does not depend on the length; the float64 allowance does once the length is the largest
    # sum (here past d_ff = 256)
    longer = m64.bounds(positions=5000)
    assert longer.positions == 5000 and longer.total == m64.bounds().total
    assert longer.hidden_error > m64.bounds().hidden_error


def _saved_bounds(folder):
    m = LipformerForCausalLM.from_pretrained(folder)
    return m.bounds().total


def test_certificate_records_hashes_of_what_was_written(folder):
    cert = json.loads((folder / "certificate.json").read_text())
    assert set(cert["files"]) == {"config.json", "model.safetensors"}
    assert certificate_status(folder)[0] == "ok"
    assert cert["lipschitz"]["total"] == pytest.approx(_saved_bounds(folder), rel=1e-12)


def test_state_dict_argument_is_what_gets_certified(folder, tok):
    model = sharp_model(tok)
    model.save_pretrained(folder, state_dict={k: 2 * v for k, v in model.state_dict().items()})
    cert = json.loads((folder / "certificate.json").read_text())
    assert cert["lipschitz"]["total"] == pytest.approx(_saved_bounds(folder), rel=1e-12)
    assert cert["lipschitz"]["total"] > 10 * model.bounds().total  # not the in-memory model's
    assert certificate_status(folder)[0] == "ok"


def test_config_changed_before_saving_is_in_the_certificate(folder, tok):
    model = sharp_model(tok)
    model.config.softmax_scale = 16.0  # the modules keep 8; the folder's model has 16
    model.save_pretrained(folder)
    cert = json.loads((folder / "certificate.json").read_text())
    assert cert["lipschitz"]["total"] == pytest.approx(_saved_bounds(folder), rel=1e-12)
    assert cert["lipschitz"]["total"] > 2 * model.bounds().total


def test_variant_save_beside_older_weights_is_stale_for_them(folder, tok):
    model = sharp_model(tok)
    model.save_pretrained(folder, state_dict={k: 0.5 * v for k, v in model.state_dict().items()}, variant="half")
    assert (folder / "model.half.safetensors").is_file()
    state, line = certificate_status(folder)  # from_pretrained(folder) loads model.safetensors
    assert state == "stale" and "model.safetensors" in line


def test_nan_weights_remove_the_old_certificate(folder, tok):
    model = sharp_model(tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    model.save_pretrained(folder, state_dict=state)
    assert not (folder / "certificate.json").exists()
    assert certificate_status(folder)[0] == "missing"


@pytest.mark.parametrize("command", ["inspect", "certify"])
def test_cli_says_stale_when_the_weights_changed(folder, command, capsys):
    assert cli.main([command, str(folder)]) == 0
    assert "certificate: ok" in capsys.readouterr().out
    weights = load_file(folder / "model.safetensors")
    weights["head.weight"] = weights["head.weight"] * 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli.main([command, str(folder)]) == 0
    stale = [line for line in capsys.readouterr().out.splitlines() if line.startswith("certificate: stale")]
    assert len(stale) == 1 and "model.safetensors" in stale[0]


def test_certify_file_reads_bytes_exactly(folder, tmp_path, capsys):
    text = "ab\r\ncd\r\n.\n"
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode("utf-8"))
    assert cli.main(["certify", str(folder), "--file", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = char_tokenizer(CHARS)
    assert [p["token"] for p in out["positions"]] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(out["positions"]) == len(text)  # \r kept: positions match the file's characters
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert cli.main(["certify", str(folder), "--file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UTF-8" in err and "0xe9" in err
