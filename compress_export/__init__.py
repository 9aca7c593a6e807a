"""compress-export: turn a Hugging Face causal LM into a compressed checkpoint a serving engine runs at once.

Importing this package is cheap: it never imports vLLM and never initialises CUDA. Heavy modules load lazily.
"""

import importlib.util
import sys

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

    register_with_transformers()
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


def register_with_transformers() -> None:
    """Register compress-export's quantizer with transformers' quantizer registry, so that
    `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads our exports (ours where transformers' own backend
    is missing; COMPRESS_EXPORT_TRANSFORMERS=ours|theirs|auto chooses): see integrations/transformers_quantizer.py.
    Idempotent. Imports transformers' quantizer registry (seconds, with torch), so `import compress_export` calls
    it only when transformers is already imported.

    Trade-off (no import hook): `import compress_export` first and `import transformers` later registers nothing by
    itself. Our own entry points register before they use transformers (AutoCompressedModelForCausalLM,
    load_model; vLLM imports transformers before it loads our plugin, so there the import registers); a script that
    imports compress_export before transformers and then calls transformers' own auto class calls this once first.
    (The import hook this replaces covered that order too, at the price of an import-system finder.)"""
    from compress_export.integrations.transformers_quantizer import register

    register()


def _register_if_transformers_imported() -> None:
    """At import: register at once when transformers or torch is already imported (torch is most of the cost, so a
    script or notebook that imported torch first pays only transformers' quantizer modules; vLLM's processes too).
    The CLI imports neither before this runs, so `compress-export --help` and the allocator tuning that must precede
    torch stay unaffected. Never breaks `import compress_export` (vLLM imports it to load our plugin): a failure is logged, and an
    explicit register_with_transformers() call raises it."""
    if "transformers" not in sys.modules and "torch" not in sys.modules:
        return
    if importlib.util.find_spec("transformers") is None:
        return
    try:
        register_with_transformers()
    except Exception as e:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).warning("compress-export: transformers registration skipped (%s)", e)


_register_if_transformers_imported()
