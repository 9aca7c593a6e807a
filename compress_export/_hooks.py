"""Register with transformers when (and only when) its quantizer registry is imported.

`import compress_export` must stay cheap and must not import torch (the CLI tunes the allocator first), yet
`AutoModelForCausalLM.from_pretrained(OUT)` should work after it whatever the import order. A meta-path finder
wraps the loader of `transformers.quantizers.auto` so our registration runs right after that module executes.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

TARGET = "transformers.quantizers.auto"


def _register():
    # Runs inside someone else's `import transformers…`: it must never break that import (e.g. compress_export
    # imported from a source tree without its package-dir mapping), so failure is only logged.
    try:
        from compress_export.integrations.transformers_quantizer import register

        register()
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("compress-export: transformers registration skipped (%s)", e)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
