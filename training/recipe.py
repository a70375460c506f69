"""Run recipes: a TOML preset (training/configs/NAME.toml) + `key=value` overrides → RunConfig.

    [model]  LipformerConfig fields (vocab_size comes from the data)
    [data]   dataset = "shakespeare_char" | "char_dir" | "shards", path = ...
    [train]  TrainConfig fields below

Unknown sections or keys are errors with the list of valid ones: a typo never silently trains
something else.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


class RecipeError(ValueError):
    """A bad preset, config file or override: one line naming the problem and the fix."""


@dataclass
class DataConfig:
    dataset: str = "shakespeare_char"   # or "char_dir" (a build_char_corpus folder) or "shards"
    path: str | None = None             # char_dir: the folder; shards: a glob for *_train_*.bin
    val_path: str | None = None         # shards: a glob for *_val_*.bin (default: from `path`)


@dataclass
class TrainConfig:
    optimizer: str = "muon"
    lr: float = 0.02
    optimizer_args: dict = field(default_factory=dict)  # more constructor options, e.g. {preset = "small_batch"}
    companion: str = "adamw"            # embedding / non-matrix optimizer inside the same object
    companion_lr: float = 3e-3
    allocation: str = "uniform"         # per-kind step sizes: a preset of lipformer.optim.ALLOCATIONS ("modula", ...)
    lr_scale: dict = field(default_factory=dict)  # per-kind lr multipliers on top of it, e.g. {q = 0.5, head = 0.03}
    weight_decay: float = 0.0
    batch_size: int = 16                # sequences per micro-batch (per process)
    grad_accum: int = 1
    max_steps: int = 200
    warmup_steps: int = 0
    schedule: str = "cosine"            # "cosine" | "linear" | "constant" (after warmup)
    min_lr_ratio: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    merge_every: int = 0                # POET: merge_then_reinitialize every N steps (0: never)
    dtype: str = "float32"              # "bfloat16": autocast (CPU or CUDA); certificates stay float64
    compile: bool = False               # torch.compile on CUDA
    parallel: str = "ddp"               # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2-sharded, large models)
    seed: int = 0
    certify_radii: list = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03])
    objective: str = "ce"               # "ce" | "margin_global" | "margin_local" (training/objectives.py)
    eps: float = 0.0                    # training radius ε_train of the margin objectives (max-rms of inputs_embeds)
    eps_warmup: int = 0                 # ramp ε_train linearly from 0 over this many steps (0: full ε from step 0)
    margin_weight: float = 1.0          # loss = (1 − w)·CE + w·(margin loss) for the margin objectives
    margin_on: str = "all"              # "all" | "correct": the margin loss only where the clean prediction is right
    stability: float = 0.0              # weight of the maxmin pair-stability term (training/objectives.py; 0: off)
    stability_eps: float = 0.0          # the radius the stability term's reach is taken at (0: train.eps)
    init_from: str | None = None        # a saved model folder (e.g. OUT/final) whose weights start the run
                                        # (fine-tuning: fresh optimizer and schedule; --resume takes precedence)
    distill_from: str | None = None     # a saved model folder (any size, same vocabulary): its next-token
                                        # distribution becomes a soft target (knowledge distillation)
    distill_weight: float = 0.5         # loss = (1 − β)·(the objective's loss) + β·T²·KL(teacher_T ‖ student_T)
    distill_temperature: float = 1.0    # T: both distributions are softened by it (Hinton et al. 2015)
    ema_decay: float = 0.0              # > 0: OUT/final holds an exponential moving average of the weights
                                        # (torch.optim.swa_utils), not the last step's; 0: off
    ema_start: int = 0                  # the average starts from the weights after step ema_start + 1


@dataclass
class RunConfig:
    model: dict
    data: DataConfig
    train: TrainConfig
    name: str = "custom"

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _parse_value(raw: str):
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _coerce(section: str, cls, values: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RecipeError(f"unknown [{section}] keys {unknown}; valid: {sorted(names)}")
    out = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RecipeError(f"[{section}] {key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise RecipeError(f"[{section}] {key} must be an integer, got {value!r}")
        if isinstance(default, float) and not isinstance(value, float):
            raise RecipeError(f"[{section}] {key} must be a number, got {value!r}")
        if isinstance(default, float) and not math.isfinite(value):
            raise RecipeError(f"[{section}] {key} must be a finite number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise RecipeError(f"[{section}] {key} must be a string, got {value!r}")
        if isinstance(default, list) and not isinstance(value, list):
            raise RecipeError(f"[{section}] {key} must be a list such as [0.001, 0.01], got {value!r}")
        if isinstance(default, dict) and not isinstance(value, dict):
            raise RecipeError(f"[{section}] {key} must be a table such as {{ preset = \"small_batch\" }}, got {value!r}")
        out[key] = value
    return cls(**out)


# (field, lowest allowed value) for TrainConfig numbers: checked before any work or any file is touched
_TRAIN_MINIMUMS = {"lr": 0.0, "companion_lr": 0.0, "weight_decay": 0.0, "batch_size": 1, "grad_accum": 1,
                   "max_steps": 1, "warmup_steps": 0, "min_lr_ratio": 0.0, "eval_every": 0, "eval_batches": 1,
                   "log_every": 1, "checkpoint_every": 0, "merge_every": 0, "seed": 0}


def _check_train(t: TrainConfig) -> None:
    from lipformer.optim import COMPANIONS, OPTIMIZERS

    for key, low in _TRAIN_MINIMUMS.items():
        if getattr(t, key) < low:
            raise RecipeError(f"[train] {key} must be >= {low}, got {getattr(t, key)!r}")
    if t.min_lr_ratio > 1:
        raise RecipeError(f"[train] min_lr_ratio must be in [0, 1], got {t.min_lr_ratio!r}")
    if t.optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown [train] optimizer {t.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if t.companion not in COMPANIONS:
        raise RecipeError(f"unknown [train] companion {t.companion!r}; valid: {', '.join(COMPANIONS)}")
    if t.schedule not in ("cosine", "linear", "constant"):
        raise RecipeError(f"[train] schedule must be cosine, linear or constant, got {t.schedule!r}")
    if t.dtype not in ("float32", "bfloat16"):
        raise RecipeError(f"[train] dtype must be float32 or bfloat16, got {t.dtype!r}")
    if t.parallel not in ("ddp", "fsdp"):
        raise RecipeError(f"[train] parallel must be ddp or fsdp, got {t.parallel!r}")
    _check_optimizer_args(t)
    _check_allocation(t)
    from .objectives import MARGIN_ON, OBJECTIVES
    if t.margin_on not in MARGIN_ON:
        raise RecipeError(f"[train] margin_on must be one of {', '.join(MARGIN_ON)}, got {t.margin_on!r}")
    if t.objective not in OBJECTIVES:
        raise RecipeError(f"[train] objective must be one of {', '.join(OBJECTIVES)}, got {t.objective!r}")
    if not t.eps >= 0:
        raise RecipeError(f"[train] eps must be >= 0, got {t.eps!r}")
    if not t.eps_warmup >= 0:
        raise RecipeError(f"[train] eps_warmup must be >= 0, got {t.eps_warmup!r}")
    if not 0 <= t.margin_weight <= 1:
        raise RecipeError(f"[train] margin_weight must be in [0, 1], got {t.margin_weight!r}")
    if not (isinstance(t.stability, (int, float)) and math.isfinite(t.stability) and t.stability >= 0):
        raise RecipeError(f"[train] stability must be a number >= 0, got {t.stability!r}")
    if not (isinstance(t.stability_eps, (int, float)) and math.isfinite(t.stability_eps) and t.stability_eps >= 0):
        raise RecipeError(f"[train] stability_eps must be a number >= 0, got {t.stability_eps!r}")
    if t.stability_eps and not t.stability:
        raise RecipeError("[train] stability_eps is the stability term's radius: set train.stability > 0 too")
    if t.stability and t.objective == "ce":
        raise RecipeError("[train] stability needs a margin objective: set train.objective = \"margin_global\" "
                          "(its reach is taken at train.stability_eps, or train.eps; with train.eps = 0 the loss "
                          "is cross-entropy plus the stability term)")
    if t.init_from is not None and not (Path(str(t.init_from)) / "config.json").is_file():
        raise RecipeError(f"[train] init_from must be a saved model folder (with config.json), got {t.init_from!r}")
    if t.distill_from is not None and not (Path(str(t.distill_from)) / "config.json").is_file():
        raise RecipeError(f"[train] distill_from must be a saved model folder (with config.json), got {t.distill_from!r}")
    if not (isinstance(t.distill_weight, (int, float)) and 0 <= t.distill_weight <= 1):
        raise RecipeError(f"[train] distill_weight must be in [0, 1], got {t.distill_weight!r}")
    if not (isinstance(t.distill_temperature, (int, float)) and math.isfinite(t.distill_temperature)
            and t.distill_temperature > 0):
        raise RecipeError(f"[train] distill_temperature must be > 0, got {t.distill_temperature!r}")
    if not (isinstance(t.ema_decay, (int, float)) and 0 <= t.ema_decay < 1):
        raise RecipeError(f"[train] ema_decay must be in [0, 1) (0: off), got {t.ema_decay!r}")
    if not t.ema_start >= 0:
        raise RecipeError(f"[train] ema_start must be >= 0, got {t.ema_start!r}")
    if t.ema_decay and t.ema_start >= t.max_steps:
        raise RecipeError(f"[train] ema_start ({t.ema_start}) must be below max_steps ({t.max_steps}): "
                          "nothing would be averaged")
    if t.ema_decay and t.parallel == "fsdp":
        raise RecipeError("[train] ema_decay is not supported with parallel = \"fsdp\" (the average would need "
                          "the sharded weights gathered every step); use parallel = \"ddp\"")
    radii = t.certify_radii
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in radii):
        raise RecipeError(f"[train] certify_radii must be a list of positive numbers, got {radii!r}")


def allocation_of(t: TrainConfig):
    """What `build_optimizer(allocation=...)` gets: None (one lr for all) or the kind → scale table."""
    from lipformer.optim import resolve_allocation

    if t.allocation == "uniform" and not t.lr_scale:
        return None  # the plain two-group layout, so existing checkpoints' optimizer states still load
    return {**resolve_allocation(t.allocation), **t.lr_scale}


def _check_allocation(t: TrainConfig) -> None:
    from lipformer.optim import resolve_allocation

    try:
        resolve_allocation(t.allocation)
        resolve_allocation(dict(t.lr_scale))
    except ValueError as exc:
        raise RecipeError(f"[train] allocation / lr_scale: {exc}") from None


# set by the trainer from other [train] keys, so not allowed in optimizer_args
_OWNED_ARGS = {"lr", "weight_decay", "companion", "companion_lr", "params"}
# optimizer_args that are torch dtypes in the constructor: a recipe names them ("float32"; "none" = the param's)
_DTYPE_ARGS = {"ns_dtype"}
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "none")


def optimizer_kwargs(t: TrainConfig) -> dict:
    """`t.optimizer_args` as constructor keywords: dtype names become torch dtypes. A CPU without native
    bf16 (AVX2 only) runs Newton–Schulz in bf16 several times slower than in float32, so
    `optimizer_args.ns_dtype = "float32"` is the switch there (docs/benchmarks.md)."""
    import torch

    kw = dict(t.optimizer_args)
    for name in _DTYPE_ARGS & set(kw):
        value = kw[name]
        if not isinstance(value, str) or value not in _DTYPE_NAMES:
            raise RecipeError(f"[train] optimizer_args.{name} must be one of {', '.join(_DTYPE_NAMES)}, got {value!r}")
        kw[name] = None if value == "none" else getattr(torch, value)
    return kw


def _check_optimizer_args(t: TrainConfig) -> None:
    """Names and values of optimizer_args, checked on a throw-away parameter before any work."""
    import inspect

    import torch

    from lipformer.optim import optimizer_class

    cls = optimizer_class(t.optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"} - _OWNED_ARGS
    bad = sorted(k for k in t.optimizer_args if k not in accepted)
    if bad:
        raise RecipeError(f"[train] optimizer_args {bad} are not options of {t.optimizer!r}; "
                          f"valid: {', '.join(sorted(accepted))} (lr, weight_decay, companion: set them directly)")
    extra = {"total_steps": t.max_steps} if t.optimizer in ("lpsgd", "lpsgdm") else {}
    kw = optimizer_kwargs(t)
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=t.lr, **{**extra, **kw})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"[train] optimizer_args for {t.optimizer!r}: {' '.join(str(exc).split())}") from None


def _check_model(model: dict) -> None:
    from lipformer.config import LipformerConfig

    known = set(LipformerConfig.__annotations__)
    unknown = sorted(set(model) - known)
    if unknown:
        raise RecipeError(f"unknown [model] keys {unknown}; valid: {sorted(known)}")
    try:  # the values too, before any data is prepared (vocab_size comes from the data later)
        LipformerConfig(**model)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"invalid [model]: {' '.join(str(exc).split())}") from None


def load_recipe(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] = ()) -> RunConfig:
    """Read a preset or a TOML file, then apply `section.key=value` overrides."""
    if (preset is None) == (config_file is None):
        raise RecipeError("pass exactly one of --preset NAME or --config FILE")
    if preset is not None:
        path = CONFIG_DIR / f"{preset}.toml"
        if not path.is_file():
            raise RecipeError(f"unknown preset {preset!r}; available: {', '.join(presets())}")
    else:
        path = Path(config_file)
        if not path.is_file():
            raise RecipeError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise RecipeError(f"{path}: unknown sections {unknown}; valid: [model], [data], [train]")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "data", "train") or not name:
            raise RecipeError(f"override {item!r} must look like model.KEY=VALUE, data.KEY=VALUE or train.KEY=VALUE")
        target = raw.setdefault(section, {})
        if section == "train" and name.startswith("optimizer_args."):
            args = target.setdefault("optimizer_args", {})
            if not isinstance(args, dict):
                raise RecipeError(f"override {item!r}: [train] optimizer_args is {args!r}, not a table")
            args[name[len("optimizer_args."):]] = _parse_value(value)
        elif section == "train" and name.startswith("lr_scale."):
            scales = target.setdefault("lr_scale", {})
            if not isinstance(scales, dict):
                raise RecipeError(f"override {item!r}: [train] lr_scale is {scales!r}, not a table")
            scales[name[len("lr_scale."):]] = _parse_value(value)
        elif section == "model" and name.startswith("w_max."):
            number = _parse_value(value)
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise RecipeError(f"override {item!r}: w_max caps are numbers, e.g. model.w_max.q=0.5")
            w_max = target.setdefault("w_max", {})
            if not isinstance(w_max, dict):
                raise RecipeError(f"override {item!r}: [model] w_max is {w_max!r}, not a table of caps")
            w_max[name[6:]] = float(number)
        else:
            target[name] = _parse_value(value)
    for section in ("model", "data", "train"):
        if not isinstance(raw.get(section, {}), dict):
            raise RecipeError(f"{path}: [{section}] must be a table of key = value lines")
    model = dict(raw.get("model", {}))
    _check_model(model)
    train = _coerce("train", TrainConfig, raw.get("train", {}))
    _check_train(train)
    if train.parallel == "fsdp" and model.get("linear") == "poet":
        raise RecipeError("[train] parallel=fsdp does not support model.linear=poet (POET's merge step needs "
                          "unsharded parameters); use train.parallel=ddp")
    return RunConfig(model=model, data=_coerce("data", DataConfig, raw.get("data", {})), train=train,
                     name=preset or path.stem)
