"""Which kernel runs a checkpoint in vLLM: vLLM's own, or ours through the plugin.

"vLLM has a kernel" is decided by the installed vLLM's own classes, never by a table of ours, so the decision
follows vLLM releases: the method vLLM would pick (each method's own `override_quantization_method`), whether its
config accepts the checkpoint (`from_config`: supported bits and symmetry), its activation dtypes, its minimum
device capability, and, for mixed-precision methods, whether vLLM's kernel selector (`choose_mp_linear_kernel`)
finds a kernel for the model's layer shapes on this platform. One gap of vLLM's is checked here: its CPU kernel's
`can_implement` accepts layers on builds whose `_C` lacks the op it calls (the AVX2 wheel), so the op is looked up.

Then the plugin claims the checkpoint where vLLM has no kernel, and on the CPU also wherever our compiled kernel
(`cpu-wna16`) runs it: measured faster than vLLM's CPU kernel (benchmarks/README.md). On CUDA, vLLM's Marlin and
Machete kernels are faster than ours and it steps aside. W8A8 int8 is vLLM's, except on x86 CPUs without VNNI,
where vLLM's int8 GEMM is inexact and ours is exact, and in float32 on AMX CPUs, where vLLM's kernel refuses float32
activations (`w8a8_route`). COMPRESS_EXPORT_VLLM=always|never forces
either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from compress_export.core import settings
from compress_export.core.errors import UserError
from compress_export.core.hardware import saturating_int8_gemm
from compress_export.formats.base import format_for_config
from compress_export.integrations import vllm_api
from compress_export.kernels.base import KernelRequest, choose_kernel
from compress_export.kernels.int8 import extension as int8_extension

METHOD_NAME = "compress_export"
log = logging.getLogger("vllm.compress_export")  # under vLLM's logger, so it shows in vLLM's own log


@dataclass(frozen=True)
class Route:
    claim: bool
    reason: str
    ours: Optional[str] = None  # our kernel for this checkpoint here
    vllm: Optional[str] = None  # vLLM's own kernel (class name), None when it has none


def layer_shapes(hf_config) -> list:
    """(in, out) of a decoder layer's linears, from the model's config (attribute object or dict)."""
    get = (lambda k: hf_config.get(k)) if isinstance(hf_config, dict) else (lambda k: getattr(hf_config, k, None))
    h, inter = get("hidden_size"), get("intermediate_size")
    if not h:
        return [(4096, 4096)]
    heads, kv = get("num_attention_heads") or 1, get("num_key_value_heads") or get("num_attention_heads") or 1
    head_dim = get("head_dim") or h // heads
    shapes = [(h, h), (h, kv * head_dim), (heads * head_dim, h)]
    for width in (inter, get("moe_intermediate_size"), get("shared_expert_intermediate_size")):  # MoE: experts
        if width:
            shapes += [(h, width), (width, h)]
    return sorted(set(shapes))


def has_experts(hf_config) -> bool:
    get = (lambda k: hf_config.get(k)) if isinstance(hf_config, dict) else (lambda k: getattr(hf_config, k, None))
    return hf_config is not None and bool(get("num_experts") or get("num_local_experts"))


def engine_dtype(hf_config=None) -> torch.dtype:
    """The engine's activation dtype while vLLM asks whether we claim the checkpoint.

    Once vLLM has set its config (`get_current_vllm_config_or_none`), its model dtype. The first decision comes
    earlier: vLLM's ModelConfig calls each method's `override_quantization_method` with the checkpoint's config
    before any engine config exists, and no public hook carries the resolved dtype there. So this is the dtype
    vLLM's `--dtype auto` resolves from that config: the checkpoint's own, a float32 checkpoint in the platform's
    preferred dtype (vLLM's `_resolve_auto_dtype`), unless COMPRESS_EXPORT_DTYPE names one: our launchers
    (`compress-export serve`, the offline engine) set it to the `--dtype` they pass, so an explicit dtype is seen.
    A bare `vllm serve --dtype X` is not seen at that moment; where it matters (W8A8 on AMX CPUs in float32) set
    COMPRESS_EXPORT_DTYPE too, or COMPRESS_EXPORT_VLLM=always|never decides."""
    vc = vllm_api.get("get_current_vllm_config_or_none")()
    dt = getattr(getattr(vc, "model_config", None), "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    hinted = settings.get("DTYPE", log)
    if hinted != "auto":
        return getattr(torch, str(hinted))
    get = (lambda k: hf_config.get(k)) if isinstance(hf_config, dict) else (lambda k: getattr(hf_config, k, None))
    dt = (get("dtype") or get("torch_dtype")) if hf_config is not None else None
    if not isinstance(dt, torch.dtype):
        dt = getattr(torch, str(dt or "bfloat16").replace("torch.", ""), torch.bfloat16)
    if dt == torch.float32:
        supported = list(getattr(vllm_api.get("current_platform"), "supported_dtypes", None) or [dt])
        dt = supported[0]
    return dt


def vllm_method_for(qcfg: dict, hf_config=None) -> Optional[str]:
    """The built-in method vLLM would pick for this checkpoint (ours excluded), as vLLM itself picks it: each
    candidate's own `override_quantization_method`. Candidates are the methods named after the checkpoint's
    quant_method (auto_gptq, gptq, gptq_marlin for "gptq"): probing every method would import vLLM's heavy backends
    (Triton for mxfp4), which vLLM itself avoids, and their native threads have crashed the process at exit."""
    QUANTIZATION_METHODS = vllm_api.get("QUANTIZATION_METHODS")
    get_quantization_config = vllm_api.get("get_quantization_config")
    q = str(qcfg.get("quant_method", "")).lower().replace("-", "_")
    for name in QUANTIZATION_METHODS:
        if name == METHOD_NAME or not q or q not in name.replace("-", "_"):
            continue
        try:
            chosen = get_quantization_config(name).override_quantization_method(qcfg, None, hf_config=hf_config)
        except Exception:  # noqa: BLE001  (another method's probe failing is not our error)
            continue
        if chosen:
            return chosen
    q = qcfg.get("quant_method")
    return q if q in QUANTIZATION_METHODS else None


def _weight_type(name: str, cfg, scheme):
    """vLLM's scalar type for the weights, from vLLM's own config object or compressed-tensors' own maps."""
    if getattr(cfg, "quant_type", None) is not None:
        return cfg.quant_type, bool(getattr(cfg, "zero_point", not scheme.symmetric))
    if name == "compressed-tensors":
        table = vllm_api.get("WNA16_SUPPORTED_TYPES_MAP" if scheme.symmetric else "WNA16_ZP_SUPPORTED_TYPES_MAP")
        return table.get(scheme.bits), not scheme.symmetric
    return None, not scheme.symmetric


def _cpu_op_missing(kernel) -> Optional[str]:
    if kernel.__name__ == "CPUWNA16LinearKernel":
        missing = vllm_api.missing_op("cpu_gemm_wna16")
        if missing and missing.endswith("cpu_gemm_wna16"):
            return missing + " (this vLLM build has no CPU 4-bit op; its AVX2 wheel)"
        return missing
    return None


def vllm_native(qcfg: dict, act_dtype: torch.dtype, hf_config=None) -> Tuple[Optional[str], str]:
    """(vLLM's kernel for this checkpoint here, or None; why)."""
    scheme = format_for_config(qcfg).scheme_from_config(qcfg)
    name = vllm_method_for(qcfg, hf_config)
    if name is None or scheme is None:
        return None, "vLLM has no method for this checkpoint format"
    cls = vllm_api.get("get_quantization_config")(name)
    try:
        cfg = cls.from_config(qcfg)
    except Exception as e:  # noqa: BLE001
        return None, f"vLLM's {name} refuses it: {' '.join(str(e).split())[:300]}"
    acts = cfg.get_supported_act_dtypes()  # on the instance: some configs define these as plain methods
    if act_dtype not in acts:
        return None, f"vLLM's {name} runs {[str(d) for d in acts]} activations, not {act_dtype}"
    cap, need = vllm_api.get("current_platform").get_device_capability(), cfg.get_min_capability()
    if cap is not None and cap.to_int() < need:
        return None, f"vLLM's {name} needs compute capability {need}, this device has {cap.to_int()}"
    wtype, zp = _weight_type(name, cfg, scheme)
    if wtype is None:
        return None, f"vLLM's {name} has no weight type for {scheme.bits}-bit {'sym' if scheme.symmetric else 'asym'}"
    MPLinearLayerConfig, choose_mp_linear_kernel = (
        vllm_api.get(n) for n in ("MPLinearLayerConfig", "choose_mp_linear_kernel")
    )
    chosen = set()
    for in_f, out_f in layer_shapes(hf_config):
        gs = scheme.group_size
        c = MPLinearLayerConfig((in_f, out_f), (in_f, out_f), wtype, act_dtype, gs, zp)
        try:
            kernel = choose_mp_linear_kernel(c)
        except Exception as e:  # noqa: BLE001  (vLLM raises ValueError listing every kernel's reason)
            return None, f"vLLM's {name} finds no kernel for a {in_f}×{out_f} layer: {' '.join(str(e).split())[:400]}"
        missing = _cpu_op_missing(kernel)
        if missing:
            return None, f"vLLM's {name} would run {kernel.__name__}, which needs {missing}"
        chosen.add(kernel.__name__)
    return "+".join(sorted(chosen)), f"vLLM's {name} runs it with {'+'.join(sorted(chosen))}"


def our_kernel(scheme, device: str, act_dtype: torch.dtype, hf_config=None) -> Optional[str]:
    """The registry's kernel for this scheme's layers on this device (None: no kernel fits some layer)."""
    names = set()
    for in_f, out_f in layer_shapes(hf_config):
        if scheme is None:
            req = KernelRequest(16, -1, True, False, in_f, out_f, act_dtype, device, "2:4")
        else:
            req = KernelRequest(
                scheme.bits,
                scheme.group_size,
                scheme.symmetric,
                scheme.act_order == "group",
                in_f,
                out_f,
                act_dtype,
                device,
            )
        try:
            names.add(choose_kernel(req).name)
        except UserError:
            return None
    return "+".join(sorted(names))


def vllm_int8_wants_half(hf_config=None, flags=None) -> bool:
    """vLLM's CPU W8A8 kernel for this model's layers is its AMX one (`int8_scaled_mm_with_quant`), which takes
    only bf16/fp16 activations: with float32 the engine dies at the first forward. Asked of vLLM's own
    `check_cpu_sgl_kernel` (AMX tiles present, layer shapes that tile), so it follows vLLM releases; `flags`
    without amx_tile (a test of another CPU kind) answers False."""
    if flags is not None and "amx_tile" not in flags:
        return False
    check = vllm_api.get("check_cpu_sgl_kernel")
    return any(check(out_f, in_f, torch.int8) for in_f, out_f in layer_shapes(hf_config))


def w8a8_route(device: str, flags=None, act_dtype=None, hf_config=None) -> Route:
    """W8A8 int8: vLLM's own kernels (CUTLASS on GPU, oneDNN or AMX on CPU) are fast and exact, except oneDNN on
    x86 CPUs without VNNI, whose int16 pair sums saturate (hardware.saturating_int8_gemm), and vLLM's AMX kernel
    with float32 activations, which it refuses; there our exact int8 GEMM runs it when it is built."""
    theirs = "CPUInt8ScaledMMLinearKernel" if device == "cpu" else None
    if device != "cpu":
        return Route(False, "W8A8 int8: vLLM's own int8 kernel runs it exactly (CUTLASS)", None, theirs)
    if saturating_int8_gemm(flags):
        problem = "vLLM's oneDNN GEMM adds u8×s8 pairs in saturating int16 on this CPU without VNNI (inexact)"
    elif act_dtype not in (torch.bfloat16, torch.float16) and vllm_int8_wants_half(hf_config, flags):
        problem = f"vLLM's AMX int8 kernel takes only bfloat16/float16 activations, not {act_dtype}"
    else:
        return Route(False, "W8A8 int8: vLLM's own int8 kernel runs it exactly (oneDNN with VNNI/AMX)", None, theirs)
    if int8_extension() is None:
        return Route(
            False,
            f"W8A8 int8: {problem}, and our exact int8 GEMM is not built (scripts/build_ext.sh); vLLM's kernel runs it",
            None,
            theirs,
        )
    return Route(True, f"W8A8 int8: {problem}; our exact int8 GEMM runs it", "int8-dynamic", theirs)


def mixed_route(fmt, qcfg: dict, device: str, act_dtype, hf_config) -> Route:
    """Per-module schemes (mixed precision): vLLM's own method reads the overrides and picks its kernels per layer,
    where it has one for every scheme off the CPU (its GPTQ method takes 4 and 8 bits, symmetric; its CPU method
    4-bit only); otherwise ours runs each scheme, where it can."""
    configs = fmt.module_configs(qcfg)
    schemes = [fmt.scheme_from_config(c) for c in configs]
    widths = "/".join(str(s.bits) for s in schemes)
    theirs = [vllm_native(c, act_dtype, hf_config) for c in configs]
    if device != "cpu" and all(name for name, _ in theirs):
        return Route(False, f"per-module schemes ({widths} bits): vLLM's own method runs each")
    kernels = [our_kernel(s, device, act_dtype, hf_config) for s in schemes]
    if all(kernels):
        why = next((w for name, w in theirs if not name), "our compiled CPU kernel is faster")
        return Route(
            True, f"per-module schemes ({widths} bits): ours runs each ({'+'.join(sorted(set(kernels)))}; {why})"
        )
    return Route(False, f"per-module schemes ({widths} bits): no kernel of ours runs them all here; left to vLLM")


def decide(qcfg: dict, user_quant=None, hf_config=None, act_dtype=None, device=None, flags=None) -> Route:
    """Whether our method claims this checkpoint, and why (`flags`: the CPU's, for tests of other CPU kinds)."""
    if user_quant == METHOD_NAME:
        return Route(True, "asked for by name (--quantization compress_export)")
    if user_quant not in (None, qcfg.get("quant_method")):
        return Route(False, f"the user asked for --quantization {user_quant}")
    try:
        fmt = format_for_config(qcfg)
        scheme = fmt.scheme_from_config(qcfg)
    except (UserError, KeyError, ValueError, TypeError):
        return Route(False, "not a checkpoint format compress-export reads")
    mode = settings.get("VLLM", log)  # a bad value warns in vLLM's log and counts as auto
    if mode != "auto":
        return Route(mode == "always", f"COMPRESS_EXPORT_VLLM={mode}")
    current_platform = vllm_api.get("current_platform")
    device = device or (
        "cuda"
        if current_platform.is_cuda_alike()
        else "cpu"
        if current_platform.is_cpu()
        else current_platform.device_type
    )
    act_dtype = act_dtype or engine_dtype(hf_config)
    if fmt.has_module_overrides(qcfg):
        return mixed_route(fmt, qcfg, device, act_dtype, hf_config)
    if scheme is not None and scheme.act_bits == 8:
        return w8a8_route(device, flags, act_dtype, hf_config)
    ours = our_kernel(scheme, device, act_dtype, hf_config)
    theirs, why = vllm_native(qcfg, act_dtype, hf_config)
    if device == "cpu" and ours == "cpu-wna16":
        return Route(True, f"our compiled CPU kernel runs it ({why})", ours, theirs)
    if device == "cpu" and ours and has_experts(hf_config):
        # vLLM's CPU 4-bit MoE kernel needs AMX, bf16 and a group size other than 32, and died with SIGILL where
        # it ran (README, "Mixture-of-experts models"): our MoE method runs the experts
        return Route(True, f"a MoE model: our MoE method runs its experts with {ours} ({why})", ours, theirs)
    if theirs:
        return Route(False, why, ours, theirs)
    return Route(True, f"{why}; ours runs it with {ours}", ours, None)
