"""compress-export: turn a Hugging Face causal LM into a compressed checkpoint a serving engine runs at once.

Importing this package is cheap: it never imports vLLM and never initialises CUDA. Heavy modules load lazily.
"""
from compress_export._version import __version__  # noqa: F401

from compress_export.core.errors import UserError  # noqa: E402,F401
from compress_export.core.scheme import PRESETS, Scheme  # noqa: E402,F401


def compress(*args, **kwargs):
    """Python API for the pipeline the CLI drives: see compress_export.pipeline.compress.compress."""
    from compress_export.pipeline.compress import compress as _compress

    return _compress(*args, **kwargs)


def load_model(*args, **kwargs):
    """Load an export (or a plain model directory) as a torch module: see compress_export.io.loading."""
    from compress_export.io.loading import load_model as _load

    return _load(*args, **kwargs)


def validate(*args, **kwargs):
    """Run an export (and a baseline) in vLLM and write the validation report: see
    compress_export.integrations.validate.validate (vLLM runs in subprocesses; this process never imports it)."""
    from compress_export.integrations.validate import validate as _validate

    return _validate(*args, **kwargs)


def __getattr__(name):
    """Heavier names on first use, so `import compress_export` stays cheap (no torch, no transformers)."""
    if name == "CompressionConfig":
        from compress_export.pipeline.config import CompressionConfig

        return CompressionConfig
    if name == "AutoCompressedModelForCausalLM":
        from compress_export.integrations.transformers_model import AutoCompressedModelForCausalLM

        return AutoCompressedModelForCausalLM
    raise AttributeError(f"module 'compress_export' has no attribute {name!r}")


def _install_hooks():
    from compress_export import _hooks

    _hooks.install()


_install_hooks()
