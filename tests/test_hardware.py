"""Engine settings follow the machine: the dtype rule on both CPU kinds (by their flags, whichever kind runs this)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress_export.core import hardware
from compress_export.integrations import vllm_launch

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.mark.parametrize(
    "flags,kind,dtype",
    [
        (AVX2, "AVX2", "float32"),
        (AVX512_BF16, "AVX-512 bf16", "bfloat16"),
        (AMX, "AVX-512 bf16", "bfloat16"),
        (AVX2 | {"avx512f"}, "AVX-512", "float32"),
        (frozenset(), "other", "float32"),
    ],
)
def test_fast_dtype_and_kind_from_the_flags(flags, kind, dtype, monkeypatch):
    monkeypatch.delenv("COMPRESS_EXPORT_DTYPE", raising=False)
    assert hardware.cpu_kind(flags) == kind
    assert hardware.fast_dtype("cpu", flags) == dtype
    assert hardware.fast_dtype("cuda:0", flags) == "bfloat16"


def test_engine_defaults_follow_the_cpu_and_yield_to_the_user(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("COMPRESS_EXPORT_DTYPE", raising=False)
    for flags, dtype in ((AVX2, "float32"), (AVX512_BF16, "bfloat16")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda f=flags: f)
        assert vllm_launch.engine_defaults() == {"dtype": dtype, "enforce_eager": True}
        assert vllm_launch.default_args(["--port", "1"]) == ["--dtype", dtype, "--enforce-eager"]
        assert vllm_launch.default_args(["--dtype=float16", "--no-enforce-eager"]) == []
    monkeypatch.setenv("COMPRESS_EXPORT_DTYPE", "float32")
    assert vllm_launch.engine_defaults()["dtype"] == "float32"


def test_mla_models_in_float32_on_amx_get_vllms_reference_mla_backend(monkeypatch, tmp_path):
    """vLLM's AMX MLA backend, chosen wherever AMX is, packs 16-bit weights only (a float32 DeepSeek load fails
    there): float32 + AMX + an MLA config gets CPU_MLA, and nothing else does; the user's choice stands."""
    import json

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mla, gqa = tmp_path / "mla", tmp_path / "gqa"
    for d, cfg in ((mla, {"model_type": "deepseek_v3", "kv_lora_rank": 512}), (gqa, {"model_type": "llama"})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    amx = AVX512_BF16 | {"amx_tile", "amx_bf16"}
    chosen = {"attention_backend": "CPU_MLA"}
    assert vllm_launch.attention_defaults(mla, "float32", amx) == chosen
    assert vllm_launch.attention_defaults(mla, "torch.float32", amx) == chosen
    assert vllm_launch.attention_defaults(mla, "bfloat16", amx) == {}  # AMX MLA's own dtype
    assert vllm_launch.attention_defaults(mla, "float32", AVX512_BF16) == {}  # no AMX: vLLM picks CPU_MLA itself
    assert vllm_launch.attention_defaults(gqa, "float32", amx) == {}
    assert vllm_launch.attention_defaults(tmp_path / "absent", "float32", amx) == {}  # a hub id: vLLM decides
    assert vllm_launch.attention_args(str(mla), ["--dtype", "float32"], amx) == ["--attention-backend", "CPU_MLA"]
    for chosen_by_user in (["--attention-backend", "X"], ["-ac", "{}"], ["--attention-config.backend=X"]):
        assert vllm_launch.attention_args(str(mla), ["--dtype=float32", *chosen_by_user], amx) == []
    assert vllm_launch.user_chose_attention(kwargs={"attention_config": {}})
    assert not vllm_launch.user_chose_attention(["--port", "1"], {"dtype": "float32"})


def test_the_engine_dtype_reaches_the_plugins_route(monkeypatch):
    """vLLM does not tell override_quantization_method the --dtype: our launchers put it in COMPRESS_EXPORT_DTYPE
    (vLLM's spellings normalised), the offline engine only while it starts, and the route reads it."""
    from compress_export.integrations import vllm_launch

    assert vllm_launch.arg_value(["s", "--dtype", "half", "--port", "1"], "--dtype") == "half"
    assert vllm_launch.arg_value(["--dtype=float", "--dtype", "bfloat16"], "--dtype") == "bfloat16"
    assert vllm_launch.arg_value(["--port", "1"], "--dtype") is None
    assert vllm_launch.dtype_hint("half") == {"COMPRESS_EXPORT_DTYPE": "float16"}
    assert vllm_launch.dtype_hint("float") == {"COMPRESS_EXPORT_DTYPE": "float32"}
    assert vllm_launch.dtype_hint("torch.bfloat16") == {"COMPRESS_EXPORT_DTYPE": "bfloat16"}
    assert vllm_launch.dtype_hint("auto") == {} and vllm_launch.dtype_hint(None) == {}
    monkeypatch.setenv("COMPRESS_EXPORT_DTYPE", "bfloat16")
    with vllm_launch.scoped_environment({"COMPRESS_EXPORT_DTYPE": "float32", "COMPRESS_EXPORT_NEW": "1"}):
        assert os.environ["COMPRESS_EXPORT_DTYPE"] == "float32" and os.environ["COMPRESS_EXPORT_NEW"] == "1"
    assert os.environ["COMPRESS_EXPORT_DTYPE"] == "bfloat16" and "COMPRESS_EXPORT_NEW" not in os.environ


def lscpu_flags():
    """The flags as util-linux's lscpu prints them (None without lscpu): a second reader of the same machine."""
    lscpu = shutil.which("lscpu")
    if lscpu is None:
        return None
    out = subprocess.run([lscpu], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    return next(
        (frozenset(line.split(":", 1)[1].split()) for line in out.splitlines() if line.startswith("Flags:")), None
    )


def test_this_machines_flags_are_read(monkeypatch):
    """Our /proc/cpuinfo reading agrees with lscpu's and with torch's own CPUID probe (cpuinfo library); the kind
    and the dtype follow from those flags by the rule written out here by hand."""
    monkeypatch.delenv("COMPRESS_EXPORT_DTYPE", raising=False)
    flags = hardware.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    other = lscpu_flags()
    if other is not None:
        assert flags == other
    import torch

    probe = {"avx2": "_is_avx2_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for flag, name in probe.items():
        if hasattr(torch.cpu, name):  # private torch helpers: checked only where this torch has them
            assert (flag in flags) == getattr(torch.cpu, name)(), flag
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    kind = "AVX-512 bf16" if bf16 else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    assert hardware.cpu_kind() == kind
    assert hardware.fast_dtype("cpu") == ("bfloat16" if bf16 else "float32")


def test_tensor_parallel_workers_get_their_own_cores(monkeypatch):
    """vLLM's CPU "auto" binding wants a NUMA node per worker; the launcher splits the cores instead (by hand)."""
    assert vllm_launch.thread_binding(2, cores=range(8)) == "0,1,2,3|4,5,6,7"
    assert vllm_launch.thread_binding(3, cores=range(8)) == "0,1|2,3|4,5"
    assert vllm_launch.thread_binding(3, cores=[0, 1]) == "0|1|0"
    assert vllm_launch.tensor_parallel_arg(["serve", "OUT", "-tp", "3"]) == 3
    assert vllm_launch.tensor_parallel_arg(["serve", "OUT", "--tensor-parallel-size=2"]) == 2
    assert vllm_launch.tensor_parallel_arg(["serve", "OUT", "--port", "8000"]) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = vllm_launch.cpu_environment({}, tensor_parallel=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_launch.cpu_environment({}, tensor_parallel=1)
    assert (
        vllm_launch.cpu_environment({"VLLM_CPU_OMP_THREADS_BIND": "0|0"}, tensor_parallel=2)[
            "VLLM_CPU_OMP_THREADS_BIND"
        ]
        == "0|0"
    )  # the user's own binding wins


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_peak_memory_is_the_processs_own_not_its_parents():
    """A run's reported peak RSS is its own: a child started by a process that once held 400 MB more reports its
    own small peak, while getrusage's ru_maxrss in the same child carries the parent's (so the check can fail)."""
    big = bytearray(400 * 1024 * 1024)
    big[::4096] = b"x" * len(big[::4096])  # touch every page
    code = (
        "import resource; from compress_export.core.hardware import peak_rss_mb; "
        "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    ours, rusage = map(
        float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    del big
    assert ours < 200 and rusage > 400


def test_releasing_the_heap_frees_what_only_a_cycle_kept():
    """A streamed export's per-layer release collects reference cycles (a freed layer caught in one would stay
    resident until the collector happened to run), and it is harmless to call again and again."""
    import gc
    import weakref

    import torch

    class Holder:
        pass

    gc.disable()  # so only the call under test can collect the cycle
    try:
        a, b = Holder(), Holder()
        a.other, b.other, a.weights = b, a, torch.zeros(1024, 1024)
        alive = weakref.ref(a)
        del a, b
        assert alive() is not None
        hardware.release_free_heap()
        assert alive() is None
        hardware.release_free_heap()
    finally:
        gc.enable()
