"""Run the plugin's routing decision as if vLLM ran on a CUDA GPU of a given compute capability (no GPU needed):
`python tests/vllm_mock_cuda.py 8.0` prints one JSON line per checkpoint kind.

vLLM's CUDA platform module cannot be imported from a CPU build, so the mock is a plain vLLM Platform with the
CUDA enum; it replaces `current_platform` in every vLLM module already imported, after importing every
quantization method, so vLLM's own configs and kernel selector (Marlin, Machete, Triton, ...) judge the checkpoint.
"""

import json
import os
import sys

os.environ["VLLM_TARGET_DEVICE"] = "cpu"

import torch  # noqa: E402
import vllm.model_executor.kernels.linear  # noqa: E402,F401
import vllm.platforms as platforms  # noqa: E402
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config  # noqa: E402
from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum  # noqa: E402

CAP = tuple(int(v) for v in sys.argv[1].split("."))


def _as_int(c):
    return c if isinstance(c, int) else c[0] * 10 + c[1]


class MockCuda(Platform):
    _enum = PlatformEnum.CUDA
    device_name = device_type = "cuda"
    dispatch_key = "CUDA"

    @classmethod
    def get_device_capability(cls, device_id=0):
        return DeviceCapability(*CAP)

    @classmethod
    def has_device_capability(cls, capability, device_id=0):
        return _as_int(CAP) >= _as_int(capability)

    @classmethod
    def is_device_capability(cls, capability, device_id=0):
        return _as_int(CAP) == _as_int(capability)


def install(plat) -> None:
    for m in QUANTIZATION_METHODS:
        try:
            get_quantization_config(m)
        except Exception:  # noqa: BLE001  (a backend this build lacks)
            pass
    platforms._current_platform = plat
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm") and hasattr(mod, "current_platform"):
            try:
                mod.current_platform = plat
            except Exception:  # noqa: BLE001
                pass


def main():
    install(MockCuda())
    from compress_export.core.scheme import Scheme
    from compress_export.formats.base import FORMATS
    from compress_export.integrations.vllm_route import decide

    hf = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    cases = [
        ("gptq", Scheme(4, 128, True, "static")),
        ("gptq", Scheme(8, 128, True)),
        ("gptq", Scheme(3, 128, True)),
        ("gptq", Scheme(4, 128, False)),
        ("awq", Scheme(4, 128, False)),
        ("compressed-tensors", Scheme(4, 128, True)),
        ("compressed-tensors", Scheme(2, 128, True)),
        ("compressed-tensors", Scheme(4, 128, False, "group")),
    ]
    for fmt, sch in cases:
        q = FORMATS.get(fmt)().quantization_config(sch, ["lm_head"], {})
        r = decide(q, None, hf, act_dtype=torch.bfloat16, device="cuda")
        key = f"{fmt} w{sch.bits} {'sym' if sch.symmetric else 'asym'} {sch.act_order}"
        print(json.dumps({"case": key, "claim": r.claim, "vllm": r.vllm, "ours": r.ours, "reason": r.reason}))


if __name__ == "__main__":
    main()
