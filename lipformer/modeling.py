"""Hugging Face shell: LipformerModel, LipformerForCausalLM, Auto* registration.

The modules and their bounds live in `lipformer.nn`; this file only wires them to the
`PreTrainedModel` / `GenerationMixin` interfaces (outputs, KV cache, masks, save/load).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .config import LipformerConfig
from .nn import (Block, CappedLinear, InputBall, MaxRMSEmbedding, ModelBound, SpectralLinear, compose_bounds,
                 constrained_modules, dense_linear, rope_tables)
from .poet import POETLinear


CERTIFICATE_NAME = "certificate.json"


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
    _no_split_modules = ["Block"]
    _supports_sdpa = True

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
        elif isinstance(module, MaxRMSEmbedding):
            fresh = torch.randn_like(module.weight, dtype=torch.float32)
            fresh = fresh * (module.w_max / fresh.pow(2).mean(-1, keepdim=True).sqrt())
            init.copy_(module.weight, fresh.to(module.weight.dtype))


def _attention_mask(attention_mask: Tensor | None, T: int, past: int, device) -> Tensor | None:
    """Boolean (B, 1, T, past+T) mask: causal, bottom-right aligned, padded keys removed.

    None when plain causal attention is exact (no padding, no cache), which keeps SDPA's fast path.
    """
    S = past + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and past == 0:
        return None
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]
    if not padded:
        return causal
    mask = causal & attention_mask[:, -S:].bool()[:, None, None, :]
    # a padded query with no visible key would give NaN; let it see itself (its output is unused)
    itself = torch.arange(S, device=device)[None, :] == torch.arange(past, S, device=device)[:, None]
    return mask | itself[None, None]


class LipformerModel(LipformerPreTrainedModel):
    """Embedding → input ball → blocks; returns the final hidden states (no norm, no head)."""

    def __init__(self, config: LipformerConfig):
        super().__init__(config)
        self.embed = MaxRMSEmbedding(config.vocab_size, config.hidden_size, config.w_max["embed"])
        self.ball = InputBall(config.input_radius)
        self.layers = nn.ModuleList(Block(config, make_linear) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values=None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        if use_cache is None:  # a cache only helps decoding: none in training
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        rope = (cos[:, None], sin[:, None])
        mask = _attention_mask(attention_mask, T, past, x.device)
        x = self.ball(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, past_key_values if use_cache else None, i)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None)


class LipformerForCausalLM(LipformerPreTrainedModel, GenerationMixin):
    """The Lipschitz transformer language model, with its certificate: `bounds()`."""

    def __init__(self, config: LipformerConfig):
        super().__init__(config)
        self.model = LipformerModel(config)
        self.head = CappedLinear(config.hidden_size, config.vocab_size, config.w_max["head"], "head")
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values=None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:  # labels are the inputs: predict token t+1 from position t
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @torch.no_grad()
    def bounds(self) -> ModelBound:
        """The certificate's bounds from the current weights (docs/lipschitz.md §5)."""
        return compose_bounds(self.model.ball, list(self.model.layers), self.head, constrained_modules(self),
                              positions=self.config.max_position_embeddings)

    def certificate(self) -> dict:
        """The bounds as the JSON object saved beside the weights."""
        return self.bounds().to_json()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            target = Path(save_directory) / CERTIFICATE_NAME
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.certificate(), indent=2))
            os.replace(tmp, target)  # atomic: a reader never sees half a certificate


AutoConfig.register("lipformer", LipformerConfig, exist_ok=True)
AutoModel.register(LipformerConfig, LipformerModel, exist_ok=True)
AutoModelForCausalLM.register(LipformerConfig, LipformerForCausalLM, exist_ok=True)
