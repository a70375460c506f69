"""lipformer: transformers whose sensitivity is bounded and certified.

`import lipformer` registers the model with AutoConfig / AutoModel / AutoModelForCausalLM.
"""

import sys as _sys

__version__ = "0.1.0"
__all__ = ["LipformerConfig", "LipformerForCausalLM", "LipformerModel", "LipformerPreTrainedModel",
           "ModelBound", "__version__"]

_EXPORTS = {"LipformerConfig": ".config", "LipformerForCausalLM": ".modeling", "LipformerModel": ".modeling",
            "LipformerPreTrainedModel": ".modeling", "ModelBound": ".nn"}


def _cli_starting() -> bool:
    """True while the `lipformer` command starts: it then imports torch and transformers (seconds)
    only for the commands that need them, so `--help` and one-line errors come back at once."""
    argv = getattr(_sys, "orig_argv", [])
    script = _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if _sys.argv else ""
    return script in ("lipformer", "lipformer.exe") or any(
        a == "-m" and b == "lipformer.cli" for a, b in zip(argv, argv[1:]))


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipformer' has no attribute {name!r}")


if not _cli_starting():  # everyone else gets the Auto* registration on `import lipformer`
    from .config import LipformerConfig
    from .modeling import LipformerForCausalLM, LipformerModel, LipformerPreTrainedModel
    from .nn import ModelBound
