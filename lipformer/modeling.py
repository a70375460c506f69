"""Hugging Face shell: LipformerModel, LipformerForCausalLM, Auto* registration.

The modules and their bounds live in `lipformer.nn`; this file only wires them to the
`PreTrainedModel` / `GenerationMixin` interfaces (outputs, KV cache, masks, save/load).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, _add_variant
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging
from transformers.utils.deprecation import deprecate_kwarg

from .config import LipformerConfig
from .nn import (Attention, Block, CappedLinear, InputBall, MaxRMSEmbedding, ModelBound, SpectralLinear, compose_bounds,
                 constrained_modules, dense_linear, rope_tables)
from .poet import POETLinear


CERTIFICATE_NAME = "certificate.json"
logger = logging.get_logger(__name__)


def check_model_folder(folder: str | os.PathLike) -> None:
    """Refuse a local folder that cannot hold a lipformer model, with one line saying why.

    from_pretrained would otherwise load another model type with a warning, or fail deep inside
    with a traceback about a corrupt file. Pickle checkpoints are refused: safetensors only.
    """
    path = Path(folder)
    if not path.is_dir():
        return  # not a local folder: leave hub ids etc. to transformers
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OSError(f"{path} has no config.json: not a saved model folder (save with save_pretrained)")
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:200]
        raise OSError(f"{config_file} is not valid JSON ({reason}); re-save the model") from None
    if not isinstance(saved, dict):
        raise OSError(f"{config_file} holds a JSON {type(saved).__name__}, not an object; re-save the model")
    model_type = saved.get("model_type")
    if model_type != "lipformer":
        raise OSError(f"{path} holds a {model_type!r} model, not a lipformer one; load it with its own class")
    try:  # every value checked here, so a bad one is named with its file
        LipformerConfig.from_dict(saved)
    except (ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise OSError(f"{config_file}: {reason}; fix that value or re-save the model") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused, convert to safetensors)" if pickles else ""
        raise OSError(f"{path} has no model.safetensors{hint}")
    try:  # parse the header and check every tensor's bytes are there, without reading them
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not ends:
            raise ValueError("no tensors")
        if 8 + n + max(ends) > size:
            raise ValueError("data past end of file")
        from safetensors import safe_open
        with safe_open(str(weights), "pt") as f:  # the library's own header checks (dtypes, offsets)
            f.keys()
    except OSError as exc:
        raise OSError(f"cannot read {weights} ({exc.strerror or exc}); check the file's permissions") from None
    except Exception as exc:  # noqa: BLE001 — json, safetensors and shape errors all mean a bad file
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OSError(f"{weights} is unreadable or truncated ({reason}); re-save the model") from None


def make_linear(config: LipformerConfig, d_in: int, d_out: int, kind: str) -> SpectralLinear:
    """The blocks' matrices, of the configured kind: dense capped, or POET with every σ at the cap."""
    if config.linear == "poet":
        return POETLinear(d_in, d_out, config.w_max[kind], kind, block_size=config.poet_block_size,
                          neumann_terms=config.poet_neumann_terms, init="uniform_spectrum")
    return dense_linear(config, d_in, d_out, kind)


# zero_init=True starts these at 0: each residual branch and the logits begin silent (modula's init)
ZERO_INIT_KINDS = ("o", "mlp_out", "head")


class LipformerPreTrainedModel(PreTrainedModel):
    config_class = LipformerConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing what would load silently wrong.

        A local folder is checked first (`check_model_folder`); weights that are missing, unexpected
        or of the wrong shape are an OSError instead of a warning (a model with re-initialized
        weights would carry a certificate about weights nobody trained).
        """
        check_model_folder(pretrained_model_name_or_path)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                                  output_loading_info=True, **kwargs)
        except RuntimeError as exc:
            if "mismatch" not in str(exc):
                raise
            raise OSError(f"{pretrained_model_name_or_path}: the weights' shapes do not match config.json; "
                          "re-save the model (config and weights together)") from exc
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}"
                               f"{f' (+{len(v) - 3} more)' if len(v) > 3 else ''}" for k, v in problems.items())
            raise OSError(f"{pretrained_model_name_or_path}: the weights do not match the model ({detail}); "
                          "re-save the model (config and weights together)")
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        # transformers 5 calls this for weights it did not load; the guarded `init.*` helpers skip
        # tensors it did load, so from_pretrained never overwrites a checkpoint's weights.
        if isinstance(module, CappedLinear):  # (POET layers init their own W0)
            if self.config.zero_init and module.kind in ZERO_INIT_KINDS:
                init.zeros_(module.weight)
            else:
                init.orthogonal_(module.weight, gain=module.sigma_cap)
        elif isinstance(module, Attention) and module.position_bias is not None:
            # ALiBi-like start: head h prefers recent keys with slope 2^-h (1, 1/2, 1/4, ...), so the
            # heads begin at different ranges; training moves every offset freely (no bound depends on it)
            H, W = module.position_bias.shape
            slopes = 2.0 ** -torch.arange(H, dtype=torch.float32)
            init.copy_(module.position_bias, (-slopes[:, None] * torch.arange(W, dtype=torch.float32)).to(
                module.position_bias.dtype))
        elif isinstance(module, MaxRMSEmbedding):
            fresh = torch.randn_like(module.weight, dtype=torch.float32)
            fresh = fresh * (module.w_max / fresh.pow(2).mean(-1, keepdim=True).sqrt())
            init.copy_(module.weight, fresh.to(module.weight.dtype))


class DecoderBlock(GradientCheckpointingLayer, Block):
    """`nn.Block` with Hugging Face activation checkpointing (`activation_checkpointing_enable()`; the
    deprecated `gradient_checkpointing_enable()` too)."""


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                    scaling: float, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Plain softmax(q·kᵀ·scaling + mask)·v, returning the weights too (for output_attentions).

    Unlike Llama's eager path the softmax stays in the inputs' dtype when that is wider than
    float32: the float64 certification copy must not round its attention to float32.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        # a finite fill: a fully masked (padding) row then gets uniform weights instead of NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LipformerModel(LipformerPreTrainedModel):
    """Embedding → input ball → blocks; returns the final hidden states (no norm, no head)."""

    def __init__(self, config: LipformerConfig):
        super().__init__(config)
        self.embed = MaxRMSEmbedding(config.vocab_size, config.hidden_size, config.w_max["embed"])
        self.ball = InputBall(config.input_radius)
        self.layers = nn.ModuleList(DecoderBlock(config, make_linear) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        if use_cache is None:  # a cache only helps decoding: none in training
            use_cache = self.config.use_cache and not self.training
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        rope = (cos[:, None], sin[:, None])
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # Attention weights exist only on the eager path (fused kernels never form them).
        mask_config = self.config
        if output_attentions and self.config._attn_implementation != "eager":
            mask_config = copy.copy(self.config)  # the eager interface wants its own (additive) mask
            mask_config._attn_implementation = "eager"
        mask = create_causal_mask(config=mask_config, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        if self.config.position_bias and mask_config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"position_bias needs attn_implementation 'eager' or 'sdpa' (an additive mask), "
                             f"not {mask_config._attn_implementation!r}")
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(mask_config._attn_implementation, eager_attention)
        attentions = [] if output_attentions else None

        def attend(module, q, k, v, attn_mask):  # the module's own scale: the one its bound uses
            y, weights = interface(module, q, k, v, attn_mask, scaling=module.scale / module.head_dim,
                                   dropout=0.0, **kwargs)
            if attentions is not None:
                attentions.append(weights)
            return y

        x = self.ball(x)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask=mask, cache=cache, layer_idx=i, attend=attend)
            if hidden is not None:
                hidden.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache,
                                       hidden_states=tuple(hidden) if hidden is not None else None,
                                       attentions=tuple(attentions) if attentions is not None else None)


class LipformerForCausalLM(LipformerPreTrainedModel, GenerationMixin):
    """The Lipschitz transformer language model, with its certificate: `bounds()`."""

    def __init__(self, config: LipformerConfig):
        super().__init__(config)
        self.model = LipformerModel(config)
        self.head = CappedLinear(config.hidden_size, config.vocab_size, config.w_max["head"], "head")
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        # `num_items_in_batch` (HF Trainer under gradient accumulation) is for the loss only
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(hidden[:, keep])
        loss = None
        if labels is not None:  # labels are the inputs: the loss shifts them (predict t+1 from t)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> MaxRMSEmbedding:
        """Grow or shrink the vocabulary of the embedding and the head, keeping both inside their caps.

        New rows are the mean of the old ones (zero with mean_resizing=False): a mean of rows has
        rms ≤ the largest row's (convexity), and appending k mean rows to the head raises σ² by at
        most a factor (1 + k/V) while the RMS→RMS scale √(d/V) falls by exactly that factor, so the
        head's capped norm does not grow (docs/lipschitz.md §2). A shrunken head is rescaled if its
        larger √(d/V) would push it past its cap. The certificate is recomputed from the weights.
        """
        old = self.model.embed
        n = old.num_embeddings if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n < 1:
            raise ValueError(f"new_num_tokens must be at least 1, got {new_num_tokens}")
        if n == old.num_embeddings:
            return old
        keep = min(n, old.num_embeddings)
        embed = MaxRMSEmbedding(n, old.embedding_dim, old.w_max).to(old.weight)
        head = CappedLinear(self.head.d_in, n, self.head.w_max, "head").to(self.head.weight)
        for new, w in ((embed.weight, old.weight), (head.weight, self.head.weight)):
            new.copy_(w.mean(0).expand_as(new) if mean_resizing else torch.zeros_like(new))
            new[:keep] = w[:keep]
        factor = head.rms_scale * float(torch.linalg.matrix_norm(head.weight.double(), ord=2))
        if factor > head.w_max:
            head.weight.mul_(head.w_max / factor * (1 - 1e-6))
        self.model.embed, self.head = embed, head
        self.config.vocab_size = n
        return embed

    @torch.no_grad()
    def bounds(self, positions: int | None = None) -> ModelBound:
        """The certificate's bounds from the current weights (docs/lipschitz.md §5).

        The Lipschitz bounds hold at any sequence length (RoPE has no length limit, so the model runs
        past max_position_embeddings); only the float64 evaluation-error allowance grows with the
        length (§6a). It covers `positions` tokens, and never fewer than max_position_embeddings.
        """
        n = max(self.config.max_position_embeddings, positions or 0)
        return compose_bounds(self.model.ball, list(self.model.layers), self.head, constrained_modules(self),
                              positions=n)

    def certificate(self) -> dict:
        """The bounds as the JSON object saved beside the weights."""
        return self.bounds().to_json()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then `certificate.json` about the files just written.

        The certificate is computed from the saved tensors (after a `state_dict=` argument, a
        variant, a dtype change…), not from this object, and records the sha256 of config.json and
        of every weights file. Any older certificate is removed first: if bounding fails or is not
        finite (NaN weights), the folder is left without one rather than with a wrong one.
        """
        main = kwargs.get("is_main_process", True)
        target = Path(save_directory) / CERTIFICATE_NAME
        if main:
            target.unlink(missing_ok=True)
        super().save_pretrained(save_directory, *args, **kwargs)
        if not main:
            return
        folder = Path(save_directory)
        try:
            files = saved_weight_files(folder, kwargs.get("variant"))
            cert = bounds_of_saved(folder, files).to_json()
            numbers = [cert["lipschitz"]["total"], cert["hidden_error_float64"], cert["logits_bound"]]
            if not all(map(math.isfinite, numbers)):
                raise ValueError("the bounds are not finite (NaN or infinite weights?)")
        except Exception as exc:  # noqa: BLE001 — no certificate is the only safe outcome
            logger.warning(f"{folder}: no {CERTIFICATE_NAME} written: {' '.join(str(exc).split())[:200]}")
            return
        cert["files"] = {name: sha256_file(folder / name) for name in ["config.json", *files]}
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cert, indent=2))
        os.replace(tmp, target)  # atomic, and after the weights: a reader never sees half a certificate


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def saved_weight_files(folder: Path, variant: str | None = None) -> list[str]:
    """Names of the safetensors files holding the model saved in `folder` (one, or an index's shards)."""
    index = folder / _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [_add_variant(SAFE_WEIGHTS_NAME, variant)]


def bounds_of_saved(folder: Path, files: list[str]) -> ModelBound:
    """The bounds of the model described by `folder`'s config.json and these weights files."""
    from safetensors.torch import load_file

    config = LipformerConfig.from_pretrained(folder)
    state = {}
    for name in files:
        state.update(load_file(folder / name))
    with torch.device("meta"):  # no initialization: every tensor comes from the files
        model = LipformerForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.bounds()


def certificate_status(folder: str | os.PathLike) -> tuple[str, str]:
    """("ok" | "missing" | "stale", one line saying why) for `folder`'s certificate.json.

    It is current when it names config.json and model.safetensors (the files `from_pretrained`
    loads) and their sha256 match.
    """
    path = Path(folder) / CERTIFICATE_NAME
    if not path.is_file():
        return "missing", f"no {CERTIFICATE_NAME} in {folder}; bounds computed from the weights"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("files") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        recorded = {}
    try:
        names = ["config.json", *saved_weight_files(Path(folder))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "stale", f"{CERTIFICATE_NAME} is stale: the folder's weights index is unreadable; recomputing the bounds"
    for name in names:
        if name not in recorded:
            return "stale", f"{CERTIFICATE_NAME} is stale: it records no hash of {name}; recomputing the bounds"
        if not (Path(folder) / name).is_file() or recorded[name] != sha256_file(Path(folder) / name):
            return "stale", f"{CERTIFICATE_NAME} is stale: {name} has changed since it was written; recomputing the bounds"
    return "ok", f"{CERTIFICATE_NAME} matches the weights and config (sha256)"


AutoConfig.register("lipformer", LipformerConfig, exist_ok=True)
AutoModel.register(LipformerConfig, LipformerModel, exist_ok=True)
AutoModelForCausalLM.register(LipformerConfig, LipformerForCausalLM, exist_ok=True)
