"""LipformerConfig: every architecture and constraint field of a Lipschitz transformer.

A Hugging Face `PreTrainedConfig` (so `save_pretrained` / `from_pretrained` / AutoConfig work)
that the plain-PyTorch modules in `lipformer.nn` read directly. Invalid values fail at
construction with a message that names the field and the fix.
"""

from __future__ import annotations

import functools
import math
import numbers

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

WEIGHT_KINDS = ("embed", "q", "k", "v", "o", "mlp_in", "mlp_out", "head")
CONSTRAINTS = ("hard_cap", "soft_cap", "normalize", "hammer", "spectral_wd", "none")
CAP_METHODS = ("auto", "eigh", "polar", "svd", "poly")
LINEAR_KINDS = ("dense", "poet")
ACTIVATIONS = ("gelu", "maxmin")
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "poet_block_size", "poet_neumann_terms", "position_bias")
_FLOAT_FIELDS = ("rope_theta", "softmax_scale", "residual_alpha", "input_radius")
_STR_FIELDS = ("constraint", "cap_method", "linear", "activation")
_BOOL_FIELDS = ("use_cache", "tie_word_embeddings", "zero_init")
_OPTIONAL = ("intermediate_size", "residual_alpha", "input_radius")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@strict
class LipformerConfig(PreTrainedConfig):
    r"""
    vocab_size: tokens in the vocabulary.
    hidden_size: model width d.
    num_hidden_layers: number of blocks N (each = attention sublayer + MLP sublayer).
    num_attention_heads: heads H; hidden_size must be divisible by it.
    intermediate_size: MLP width (default 4·d).
    max_position_embeddings: context length.
    rope_theta: RoPE base.
    softmax_scale: attention scores are softmax_scale · q·k / d_head (1/d scaling, not 1/sqrt(d));
        0 turns the content scores off (attention then depends on positions only, through position_bias).
    position_bias: W > 0 adds a learned offset per head and query–key distance 0..W−1 to the scores
        (keys farther back share the last one); it does not depend on the input, so it costs no
        Lipschitz bound. 0 (default): no bias.
    activation: the MLP's activation: "gelu" (gelu(z)/1.1289, the paper's) or "maxmin" (GroupSort of
        pairs: unit i of the first half and of the second half become their max and min; exactly
        1-Lipschitz and norm-preserving, so the signal is not halved where the bound pays full
        slope). intermediate_size must be even for maxmin.
    residual_alpha: convex residual x ← (1−α)x + α f(x); default 1/(2N).
    w_max: cap per weight kind in the RMS→RMS operator norm sqrt(d_in/d_out)·σ_max
        (for "embed": the largest RMS of a token vector). Missing kinds default to 1.
    input_radius: the body projects every incoming token vector onto the RMS ball of this radius
        (default: w_max["embed"], so clean embeddings pass unchanged).
    zero_init: start the attention output (o), mlp_out and head matrices at zero (modula's init),
        so every block starts as the identity and the logits at 0; the others stay orthogonal at the cap.
    constraint, cap_method: the projection applied after each optimizer step. cap_method "auto"
        (default) is the exact "eigh" cap on CPU and the matmul-only "polar" cap on GPUs.
    linear: "dense" (capped matrices) or "poet" (W = R W0 P with orthogonal R, P: q/k/v/o and MLP
        matrices keep W0's spectrum, initialized uniform at the cap, so no projection is needed;
        the head stays dense); poet_block_size, poet_neumann_terms configure it.
    """

    model_type = "lipformer"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 65
    hidden_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    softmax_scale: float = 1.0
    position_bias: int = 0
    activation: str = "gelu"
    residual_alpha: float | None = None
    w_max: dict | None = None
    input_radius: float | None = None
    constraint: str = "hard_cap"
    cap_method: str = "auto"
    linear: str = "dense"
    poet_block_size: int = 256
    poet_neumann_terms: int = 5
    zero_init: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self._check_types()
        # Fill derived defaults so the saved config.json states every value the model used.
        given = dict(self.w_max or {})
        unknown = sorted(set(given) - set(WEIGHT_KINDS), key=repr)
        if unknown:
            raise ValueError(f"w_max has unknown kinds {unknown}; allowed: {list(WEIGHT_KINDS)}")
        self.w_max = {kind: float(given.get(kind, 1.0)) for kind in WEIGHT_KINDS}
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.residual_alpha is None and isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            self.residual_alpha = 1.0 / (2 * self.num_hidden_layers)
        if self.input_radius is None:
            self.input_radius = self.w_max["embed"]
        self.validate_lipformer()  # here, so a bad value is a plain one-line ValueError
        super().__post_init__(**kwargs)

    def _check_types(self) -> None:
        """Type errors as one-line ValueErrors naming the field (a config.json can hold anything)."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or (value is None and name in _OPTIONAL)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ok = value is None or _is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))
            if not ok:
                raise ValueError(f"{name} must be an integer token id or null, got {value!r}")
        if self.w_max is not None:
            if not isinstance(self.w_max, dict):
                raise ValueError(f"w_max must be a mapping of weight kind to cap, e.g. {{'q': 0.5}}, got {self.w_max!r}")
            for kind, value in self.w_max.items():
                if not _is_number(value):
                    raise ValueError(f"w_max[{kind!r}] must be a positive finite number, got {value!r}")

    def validate_lipformer(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
             f"({self.num_attention_heads}); change one of them")
        need((self.hidden_size // self.num_attention_heads) % 2 == 0,
             f"head size hidden_size/num_attention_heads = {self.hidden_size // self.num_attention_heads} "
             "must be even for RoPE")
        for kind, value in self.w_max.items():
            need(math.isfinite(value) and value > 0, f"w_max[{kind!r}] must be a positive finite number, got {value}")
        need(0.0 < self.residual_alpha <= 1.0, f"residual_alpha must be in (0, 1], got {self.residual_alpha}")
        need(math.isfinite(self.input_radius) and self.input_radius > 0,
             f"input_radius must be positive, got {self.input_radius}")
        need(math.isfinite(self.softmax_scale) and self.softmax_scale >= 0,
             f"softmax_scale must be >= 0, got {self.softmax_scale}")
        need(self.position_bias >= 0, f"position_bias must be >= 0 (a window of distances; 0 = none), got {self.position_bias}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.activation != "maxmin" or self.intermediate_size % 2 == 0,
             f"activation 'maxmin' pairs the MLP's units: intermediate_size must be even, got {self.intermediate_size}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.constraint in CONSTRAINTS, f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        need(self.cap_method in CAP_METHODS, f"cap_method must be one of {CAP_METHODS}, got {self.cap_method!r}")
        need(self.linear in LINEAR_KINDS, f"linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
        need(self.poet_block_size >= 1, f"poet_block_size must be >= 1, got {self.poet_block_size}")
        need(self.poet_neumann_terms >= 2, f"poet_neumann_terms must be >= 2 (1 diverges), got {self.poet_neumann_terms}")
        need(not self.tie_word_embeddings, "tie_word_embeddings is not supported: the head carries its own cap")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _one_line_errors(init):
    """Any validation failure leaves the constructor as a one-line ValueError naming the problem.

    (huggingface_hub's strict validators wrap the cause in a multi-line message.)
    """
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise ValueError(" ".join(str(cause).split()) or type(cause).__name__) from exc
    return __init__


LipformerConfig.__init__ = _one_line_errors(LipformerConfig.__init__)

__all__ = ["LipformerConfig", "WEIGHT_KINDS"]
