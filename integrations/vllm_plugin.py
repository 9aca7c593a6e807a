"""vLLM plugin entry point (`vllm.general_plugins`): registers our quantization method.

`register()` is idempotent and cheap: vLLM calls it in the API process, the engine core and every worker.
The method itself lives in `vllm_method.py`, imported only here, so `import compress_export` never imports vLLM.
"""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    import logging

    from compress_export.core import settings

    settings.warn_unknown(logging.getLogger("vllm.compress_export"))
    from compress_export.integrations.environment import broken_vision_stack

    problem = broken_vision_stack(in_process=True)
    if problem:  # vLLM is about to fail on it; say what fixes it before its traceback does
        import logging

        logging.getLogger("vllm.compress_export").error("compress-export: %s", problem)
    from compress_export.integrations.vllm_api import register_quantization_config
    from compress_export.integrations.vllm_method import METHOD_NAME, CompressExportConfig

    register_quantization_config(METHOD_NAME)(CompressExportConfig)
    _done = True
