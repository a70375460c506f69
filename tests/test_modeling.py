"""Hugging Face integration: save → from_pretrained bit equality, cache, generate, errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import lipformer  # noqa: F401  (registers the Auto classes)
from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.tokenization import char_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny model with its char tokenizer, saved as an HF folder."""
    tok = char_tokenizer(TEXT)
    torch.manual_seed(0)
    config = LipformerConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, w_max={"q": 0.8, "head": 2.0})
    model = LipformerForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_fresh_process_from_pretrained_is_bit_identical(saved, tmp_path):
    model, tok, folder = saved
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    torch.save(model(ids).logits, tmp_path / "expected.pt")  # the expected logits, not weights
    code = f"""
import torch, lipformer
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
ids = torch.tensor([{tok(TEXT)['input_ids']!r}])
assert torch.equal(m(ids).logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
print("ok", type(m).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok LipformerForCausalLM" in out.stdout, out.stderr[-2000:]


def test_save_load_save_load_is_stable(saved, tmp_path):
    model, _, folder = saved
    a = AutoModelForCausalLM.from_pretrained(folder)
    a.save_pretrained(tmp_path / "again")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # plain names, no parametrization keys


@pytest.mark.parametrize("activation", ["gelu", "maxmin"])
def test_position_offsets_load_as_saved_not_re_initialized(tmp_path, activation):
    """The learned offsets are a Parameter with an init (ALiBi-like slopes): from_pretrained must keep
    the trained values (transformers 5 re-initializes what its guarded init helpers think is fresh).
    With maxmin, the loaded model must also run maxmin (same logits), not the default GELU."""
    torch.manual_seed(0)
    config = LipformerConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, softmax_scale=0.0, position_bias=6, activation=activation)
    model = LipformerForCausalLM(config).eval()
    fresh = model.model.layers[0].attn.position_bias.detach().clone()
    assert torch.equal(fresh[1, :3], torch.tensor([0.0, -0.5, -1.0]))   # head 1's slope 1/2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.position_bias.copy_(3 * torch.randn_like(layer.attn.position_bias))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.position_bias == 6 and loaded.config.softmax_scale == 0.0
    assert loaded.config.activation == activation and loaded.model.layers[0].mlp.activation == activation
    for a, b in zip(model.model.layers, loaded.model.layers):
        assert torch.equal(a.attn.position_bias, b.attn.position_bias)
    ids = torch.randint(0, 20, (2, 30))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_certificate_saved_beside_the_weights(saved):
    model, _, folder = saved
    cert = json.loads((folder / "certificate.json").read_text())
    assert cert["lipschitz"]["total"] == pytest.approx(model.bounds().total)
    assert {"name", "sigma_upper", "w_max", "factor"} <= set(cert["lipschitz"]["layers"][0])


def test_generate_with_cache_equals_without(saved):
    model, tok, _ = saved
    ids = torch.tensor([tok("First")["input_ids"]])
    with_cache = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
    without = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.8)
    assert sampled.shape == (1, ids.size(1) + 5)


def test_inputs_embeds_path_equals_input_ids_path(saved):
    model, tok, _ = saved
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    embeds = model.model.embed(ids)
    assert torch.equal(model(ids).logits, model(inputs_embeds=embeds).logits)


def test_batched_left_padded_generation_matches_unbatched(saved):
    model, tok, _ = saved
    prompts = [tok("Before we")["input_ids"], tok("hear")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for row, p in zip(batched, prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(row[width:], alone[0, len(p):])


def test_labels_give_the_shifted_cross_entropy(saved):
    model, tok, _ = saved
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(out.loss, ref)


def test_pipeline_and_autotokenizer_from_the_folder(saved):
    _, tok, folder = saved
    again = AutoTokenizer.from_pretrained(folder)
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"] and again.decode(tok(TEXT)["input_ids"]) == TEXT
    gen = pipeline("text-generation", model=str(folder))
    out = gen("First", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("First") and len(out[0]["generated_text"]) == 10


def test_bad_folders_give_one_clear_error(saved, tmp_path):
    _, _, folder = saved
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(OSError, match="'gpt2' model, not a lipformer"):
        LipformerForCausalLM.from_pretrained(other)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((folder / "config.json").read_text())
    (missing / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(OSError, match="pickle checkpoints are refused"):
        LipformerForCausalLM.from_pretrained(missing)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="unreadable or truncated"):
        LipformerForCausalLM.from_pretrained(truncated)
    with pytest.raises(OSError, match="no config.json"):
        LipformerForCausalLM.from_pretrained(tmp_path)


def test_config_validation_messages():
    with pytest.raises(Exception, match="divisible by num_attention_heads"):
        LipformerConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(Exception, match="w_max"):
        LipformerConfig(w_max={"q": -1.0})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_uniform_causal_attention_at_scale_zero(impl):
    """softmax_scale 0 without position offsets: every query averages the keys it sees. torch's CPU sdpa
    returns NaN for is_causal at scale 0, so the forward spells the mask out; cached decoding agrees."""
    torch.manual_seed(0)
    cfg = LipformerConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=16, softmax_scale=0.0, attn_implementation=impl)
    model = LipformerForCausalLM(cfg).eval()
    ids = torch.randint(0, 20, (1, 8))
    attn = model.model.layers[0].attn
    x = model.model.ball(model.model.embed(ids))
    seen = {}
    hook = attn.o.register_forward_pre_hook(lambda mod, args: seen.__setitem__("y", args[0]))
    logits = model(ids).logits
    hook.remove()
    v = attn.v(x)
    mean = v.cumsum(1) / torch.arange(1, 9)[None, :, None]
    assert torch.isfinite(logits).all()
    assert torch.allclose(seen["y"], mean, atol=1e-5)
    out = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    full = model(out).logits[0, 3:-1].argmax(-1)
    assert torch.equal(out[0, 4:], full)
