"""Generation and the Hugging Face v5 interfaces, on a model whose predictions depend on context.

A random lipformer with mild caps predicts almost the same token whatever came before, so a cache
that silently drops the context would pass every comparison. These tests use sharp attention
(softmax_scale 8, larger caps) and first check that the context really matters (the control). Every
test that takes the `model` fixture runs twice: on content attention, and on position-only attention
(softmax_scale 0, a sharp learned bias per distance), whose cached decoding must read each key's
distance from its cache slot.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, pipeline

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.tokenization import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV"  # 48 characters, ids in sorted order
SHARP = dict(vocab_size=len(ALPHABET), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, softmax_scale=8.0, residual_alpha=0.5,
             w_max={"q": 2, "k": 2, "v": 2, "o": 2, "mlp_in": 2, "mlp_out": 2, "head": 8})


VARIANTS = {"content": {}, "position": dict(softmax_scale=0.0, position_bias=8)}


def sharp_model(variant: str = "content", **overrides) -> LipformerForCausalLM:
    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(**{**SHARP, **VARIANTS[variant], **overrides})).eval()
    if variant == "position":  # sharp offsets: each head picks a few distances
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attn.position_bias.copy_(4 * torch.randn_like(layer.attn.position_bias))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    return sharp_model(request.param)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, SHARP["vocab_size"], (n,), generator=g) for n in (12, 7, 9)]


def greedy_by_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoding: the whole sequence through the model at every step, no cache."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def test_control_predictions_depend_on_context(model, prompts):
    """Decoding that forgets the prompt (what a dropped cache does) changes the next-token logits."""
    full = greedy_by_recompute(model, prompts[0][None], 10)
    forgetful = torch.stack([model(full[:, t:t + 1], use_cache=False).logits[0, -1] for t in range(12, 21)])
    remembering = model(full[:, :21]).logits[0, 11:20]
    assert (forgetful - remembering).abs().max() > 0.1
    assert len(set(full[0, 12:].tolist())) > 2  # not one token forever


@torch.no_grad()
def test_cached_step_logits_equal_full_recompute(model, prompts):
    ids = greedy_by_recompute(model, prompts[0][None], 16)
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :12], cache=cache, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(12, ids.size(1) - 1):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits[:, -1])
    full = model(ids, use_cache=False).logits[:, 11:-1]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_past_key_values_is_an_alias_of_cache(model, prompts):
    ids = prompts[0][None]
    cache = model(ids[:, :-1], use_cache=True).cache
    with pytest.warns(Warning, match="cache"):
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], model(ids).logits[:, -1], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generate_with_cache_equals_without(model, prompts, cache_implementation):
    for p in prompts:  # (an explicit mask: id 0 occurs in the prompts and is also the pad id)
        ids, mask = p[None], torch.ones(1, len(p), dtype=torch.long)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=True,
                                pad_token_id=0, cache_implementation=cache_implementation)
        assert torch.equal(cached, greedy_by_recompute(model, ids, 20))
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=False,
                                  pad_token_id=0)
        assert torch.equal(cached, uncached)


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(model, prompts):
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (width - len(p), 0), value=0) for p in prompts])
    mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        alone = greedy_by_recompute(model, p[None], 15)
        assert batched[row, width:].tolist() == alone[0, len(p):].tolist()


@torch.no_grad()
def test_pipeline_output_equals_manual_greedy_decoding(model):
    tok = char_tokenizer(ALPHABET)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "theQuickBrownFox"
    text = generator(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    expected = tok.decode(greedy_by_recompute(model, ids, 12)[0, ids.size(1):].tolist())
    assert text == expected


@torch.no_grad()
def test_a_position_bias_is_read_from_the_cache_slots(prompts, monkeypatch):
    """Control for the position variant: decoding that counts distances from the first new token
    (ignoring what the cache holds) gives other logits, so the cached tests above can fail."""
    from lipformer.nn import Attention
    model = sharp_model("position")
    ids = greedy_by_recompute(model, prompts[0][None], 6)
    full = model(ids, use_cache=False).logits[:, -1]
    cache = model(ids[:, :-1], use_cache=True).cache
    torch.testing.assert_close(model(ids[:, -1:], cache=cache).logits[:, -1], full, rtol=0, atol=1e-5)
    biased = Attention._biased_mask
    monkeypatch.setattr(Attention, "_biased_mask", lambda self, mask, start, *a: biased(self, mask, 0, *a))
    cache = model(ids[:, :-1], use_cache=True).cache
    assert (model(ids[:, -1:], cache=cache).logits[:, -1] - full).abs().max() > 0.1


@torch.no_grad()
def test_position_offsets_refuse_a_kernel_without_an_additive_mask(prompts):
    model = sharp_model("position")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="position_bias needs attn_implementation 'eager' or 'sdpa'"):
        model(prompts[0][None])


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_and_sdpa_give_the_same_logits(prompts, variant):
    sdpa, eager = sharp_model(variant).double(), sharp_model(variant, attn_implementation="eager").double()
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids = torch.stack([F.pad(prompts[1], (5, 0)), prompts[0]])
    mask = (torch.arange(12) >= torch.tensor([[5], [0]])).long()
    for attention_mask in (None, mask):
        a = sdpa(ids, attention_mask=attention_mask).logits
        b = eager(ids, attention_mask=attention_mask).logits
        real = slice(None) if attention_mask is None else mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-10)


@torch.no_grad()
def test_hidden_states_and_attentions_on_request(model, prompts):
    ids = prompts[0][None]
    out = model(ids, output_hidden_states=True, output_attentions=True)
    n = model.config.num_hidden_layers
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert torch.equal(out.hidden_states[0], model.model.ball(model.model.embed(ids)))
    torch.testing.assert_close(model.head(out.hidden_states[-1]), out.logits)
    weights = out.attentions[0]
    assert weights.shape == (1, model.config.num_attention_heads, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert weights.triu(1).abs().max() == 0  # causal
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=1e-5)  # eager weights, same output


def test_gradient_checkpointing_gives_the_same_gradients(prompts):
    ids = prompts[0][None]
    grads = []
    for checkpointing in (False, True):
        m = sharp_model().train()
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_loss_honours_num_items_in_batch(model, prompts):
    ids = prompts[0][None]
    labels = ids.clone()
    labels[:, :6] = -100
    logits = model(ids).logits
    total = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(ids, labels=labels).loss, total / 6)  # 6 labelled targets
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=20).loss, total / 20)


def test_trainer_with_gradient_accumulation_matches_manual_loss(tmp_path, prompts):
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = sharp_model()
    # four sequences with very different numbers of labelled tokens: averaging per micro-batch
    # (what ignoring num_items_in_batch does) would weight them wrongly
    rows = []
    for k, keep in enumerate((11, 2, 3, 1)):
        ids = prompts[0].roll(k)
        labels = ids.clone()
        labels[:len(ids) - keep] = -100
        rows.append({"input_ids": ids, "labels": labels})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=0.0, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    with torch.no_grad():  # lr 0: both steps see the same weights and, each epoch, all four rows
        batch = torch.stack([r["input_ids"] for r in rows])
        labels = torch.stack([r["labels"] for r in rows])
        logits = model(batch).logits
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        expected = float(total / (labels[:, 1:] != -100).sum())
    assert result.training_loss == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_resize_token_embeddings_keeps_old_tokens_and_the_caps(model, prompts):
    m = sharp_model()
    ids = prompts[0][None]
    before = m(ids).logits
    m.resize_token_embeddings(60)
    assert m.config.vocab_size == 60 and m.model.embed.weight.shape[0] == 60 and m.head.weight.shape[0] == 60
    # the same function of the old tokens; not bitwise: a 60-row head product blocks (and rounds)
    # differently from a 48-row one on some thread counts
    torch.testing.assert_close(m(ids).logits[..., :48], before, rtol=1e-5, atol=1e-5)
    head = m.head.weight.double()  # new rows inside the caps (exact σ; the init sits at the cap)
    assert m.head.rms_scale * torch.linalg.svdvals(head)[0] <= m.head.w_max * (1 + 1e-6)
    assert m.model.embed.weight.double().pow(2).mean(-1).sqrt().max() <= m.model.embed.w_max * (1 + 1e-6)
    assert m.bounds().total < float("inf")
    assert m(torch.tensor([[59, 50, 3]])).logits.isfinite().all()


@pytest.mark.slow
@torch.no_grad()
def test_compiled_forward_has_no_graph_breaks(model, prompts):
    compiled = torch.compile(model.forward, fullgraph=True)  # a graph break raises
    ids = torch.stack([prompts[0], prompts[0].roll(3)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled(ids, attention_mask=mask, use_cache=False).logits,
                               model(ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
