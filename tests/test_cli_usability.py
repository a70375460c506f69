"""The CLI explains itself: fast startup, one-line errors that name the right options, help pages,
readable tables, generation past the context, `lipformer prepare`, and the metrics plot."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch

from lipformer.cli import main
from lipformer.tokenization import GPT2_PATTERN
from lipformer.training.data import DataError, build_char_corpus, prepare_shards, read_shard
from lipformer.training.recipe import load_recipe
from lipformer.training.train import run

CORPUS = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nO Romeo, Romeo, "
          "wherefore art thou Romeo?\n\n") * 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder whose final model has trained a few steps on a char corpus."""
    root = tmp_path_factory.mktemp("cli")
    build_char_corpus([CORPUS], root / "char")
    r = load_recipe("tiny", None, ["data.dataset=char_dir", f"data.path={root / 'char'}", "train.max_steps=30",
                                   "train.eval_every=15", "train.lr=0.02"])
    run(r, root / "run", progress=False, log=lambda *a: None)
    return root / "run"


def cli(*argv, importtime=False):
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "lipformer.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time")}


def test_help_and_one_line_errors_do_not_import_torch(trained):
    for argv, code, needle in [(["--help"], 0, None),
                               (["generate", trained / "final", "--prompt", ""], 2, "--prompt is empty"),
                               (["certify", trained], 2, f"pass {trained / 'final'}"),
                               (["certify"], 2, "model_dir")]:
        proc = cli(*argv, importtime=True)
        assert proc.returncode == code, proc.stderr[-500:]
        assert not {"torch", "transformers"} & imported(proc.stderr), argv
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time")]
        if needle:
            assert len(errors) == 1 and needle in errors[0] and "--text" not in errors[0], errors
    # the control: a command that needs the model does import torch
    assert "torch" in imported(cli("inspect", trained / "final", importtime=True).stderr)


def test_a_run_folder_names_both_models_in_it(trained, capsys):
    assert main(["inspect", str(trained)]) == 2
    err = capsys.readouterr().err
    assert f"{trained / 'final'} (the finished model)" in err and f"{trained / 'checkpoint'}" in err


@pytest.mark.parametrize("command, needles", [
    ("generate", ["sample text from a saved model", "(default: 200)", "(default: 0.8)"]),
    ("train", ["train a Lipschitz transformer", "--resume", "unless --overwrite"]),
    ("prepare", ["GPT-2 shards", "(default: 100000000)"]),
    ("demo", ["(default: checkpoints/demo)"]),
])
def test_subcommand_help_has_a_description_and_defaults(command, needles, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(n in text for n in needles), text


def test_certify_table_shows_whitespace_tokens(trained, capsys):
    assert main(["certify", str(trained / "final"), "--text", "ROMEO:\nBut soft"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:6].strip().isdigit()]
    tokens = [r[1] for r in rows]
    assert tokens == ["R", "O", "M", "E", "O", ":", "\\n", "B", "u", "t", "␣", "s", "o", "f", "t"]
    # index token prediction margin radius local global linear: no blank cell ('-' where not computed)
    assert all(len(r) == 8 for r in rows)


def test_certify_method_linear_on_a_content_attention_model_is_one_line(trained, capsys):
    # the tiny preset attends by content (softmax scale 1): the linear relaxation does not apply
    assert main(["certify", str(trained / "final"), "--text", "ROMEO", "--method", "linear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method linear" in err[0] and "softmax_scale" in err[0], err


def test_train_prints_certified_accuracy_as_a_sentence(trained, tmp_path, capsys):
    corpus = trained.parent / "char"
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "data.dataset=char_dir",
                 f"data.path={corpus}", "train.max_steps=2", "train.eval_every=1"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("certified accuracy"))
    assert "ε=0.001: " in line and "%" in line and "{" not in line


def test_generate_past_the_context_reads_the_whole_text(trained, capsys):
    """Past the trained context generate keeps going on the whole text (what certify certifies), and says so."""
    from lipformer import LipformerForCausalLM
    from transformers import AutoTokenizer
    folder = trained / "final"
    model, tok = LipformerForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    context = model.config.max_position_embeddings
    n = context + 20
    assert main(["generate", str(folder), "--prompt", "ROMEO:", "--max-new-tokens", str(n), "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert f"trained on {context}-token contexts" in captured.err and "whole text" in captured.err
    text = captured.out.rstrip("\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 + n  # every asked-for token came, not only the context's worth
    with torch.no_grad():  # each token past the context is the greedy choice given everything before it
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].double()
    for k in range(context, len(ids)):
        assert logits[k - 1, ids[k]] >= logits[k - 1].max() - 1e-4  # (cached vs full recompute rounding)


# ------------------------------------------------------------------------------------------------
# lipformer prepare

@pytest.fixture
def byte_encoding():
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


@pytest.fixture
def texts(tmp_path):
    src = tmp_path / "texts"
    (src / "b").mkdir(parents=True)
    for k in range(12):
        (src / ("b" if k % 3 else ".") / f"doc{k:02d}.txt").write_text(f"document {k}: " + "lorem ipsum " * (k + 3))
    return src


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_prepare_resumes_to_the_same_shards_after_an_interruption(texts, tmp_path, byte_encoding, monkeypatch):
    import lipformer.training.data.prepare as prepare
    settings = {"shard_size": 100, "val_tokens": 60}
    straight = prepare_shards([texts], tmp_path / "straight", byte_encoding, **settings)
    assert len(straight) > 6
    real, calls = prepare.write_shard, []

    def interrupted(path, tokens):  # Ctrl-C while the fifth shard is written
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, tokens)

    monkeypatch.setattr(prepare, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([texts], tmp_path / "out", byte_encoding, **settings)
    assert len(shard_bytes(tmp_path / "out")) == 4
    monkeypatch.setattr(prepare, "write_shard", real)
    encoded = []
    monkeypatch.setattr(byte_encoding, "encode_ordinary_batch", lambda docs: encoded.extend(docs) or
                        [byte_encoding.encode_ordinary(d) for d in docs], raising=False)
    resumed = prepare_shards([texts], tmp_path / "out", byte_encoding, **settings)
    assert [p.name for p in resumed] == [p.name for p in straight]
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "straight")
    assert 0 < len(encoded) < 12  # only the documents from the interruption on were tokenized again
    # finished: a rerun does nothing; other inputs are refused
    assert prepare_shards([texts], tmp_path / "out", byte_encoding, **settings) == resumed
    (texts / "doc99.txt").write_text("new")
    with pytest.raises(DataError, match="other inputs"):
        prepare_shards([texts], tmp_path / "out", byte_encoding, **settings)


def test_prepare_cli_accepts_files_and_folders_and_names_the_train_command(texts, tmp_path, byte_encoding,
                                                                          monkeypatch, capsys):
    import lipformer.training.data.prepare as prepare
    monkeypatch.setattr(prepare, "gpt2_encoding", lambda: byte_encoding)
    out = tmp_path / "shards"
    assert main(["prepare", str(texts / "doc00.txt"), str(texts / "b"), "--out", str(out), "--prefix", "mine"]) == 0
    printed = capsys.readouterr().out
    assert f"data.path='{out}/mine_train_*.bin'" in printed
    stream = np.concatenate([read_shard(p) for p in sorted(out.glob("mine_*.bin"))])
    assert int((stream == 256).sum()) == 1 + 8  # one file and the folder's eight documents
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err


def test_gpt2_preset_without_data_names_lipformer_prepare(tmp_path, capsys):
    assert main(["train", "--preset", "gpt2-small", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "lipformer prepare" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()


def test_gpu_sized_recipe_on_cpu_warns_with_the_measured_step_time(tmp_path):
    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.training.train import _warn_if_slow_on_cpu
    model = LipformerForCausalLM(LipformerConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2))
    said = []
    _warn_if_slow_on_cpu(model, torch.device("cpu"), 10_000_000, said.append)
    _warn_if_slow_on_cpu(model, torch.device("cpu"), 10_000_000, said.append, measured=380.0, remaining=6199)
    _warn_if_slow_on_cpu(model, torch.device("cpu"), 1000, said.append)  # a small run: nothing
    _warn_if_slow_on_cpu(model, torch.device("cuda"), 10_000_000, said.append)  # on a GPU: nothing
    assert len(said) == 2 and "no GPU" in said[0] and "step 1 took 380 s" in said[1] and "654.3 h" in said[1]


def test_metrics_plot_has_units_a_title_a_certificate_panel_and_a_fixed_accuracy_axis():
    from lipformer.training.plots import metrics_figure
    rows = [{"step": s, "loss": 3 - s / 10, **({"val_loss": 3 - s / 9, "val_acc": 0.3 + s / 1000,
                                                 "lipschitz_total": 4 + s / 10} if s % 5 == 0 else {})}
            for s in range(1, 21)]
    fig = metrics_figure(rows, {"certified_accuracy": {"0.001": 0.2, "0.01": 0.05}}, title="demo")
    loss, acc, cert = fig.axes
    assert fig._suptitle.get_text() == "demo"
    assert "nats" in loss.get_ylabel() and "step" in loss.get_xlabel()
    assert acc.get_ylim() == (0, 1)  # a 1.5-point wobble is not drawn as a cliff
    assert "Lipschitz" in cert.get_ylabel() and len(cert.lines[0].get_xdata()) == 4
    labels = [t.get_text() for t in acc.get_legend().get_texts()]
    assert any("certified accuracy, ε=0.001" in t for t in labels)


def test_bigram_reference_is_the_most_frequent_next_token_table():
    from lipformer.training.evaluation import bigram_accuracy
    train = np.array([0, 1, 0, 1, 0, 1, 1, 0])  # 0→1 three times; 1→0 three times, 1→1 once
    assert bigram_accuracy(train, np.array([0, 1, 1, 0])) == pytest.approx(2 / 3)  # 0→1 ✓, 1→1 ✗, 1→0 ✓
