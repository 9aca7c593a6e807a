"""GPTQ checkpoint format (AutoGPTQ/GPTQModel "gptq" v1), as vLLM (gptq, gptq_marlin) and transformers read it.

Per quantized linear with W [out, in], G groups:
  qweight  int32 [in·bits/32, out]   codes packed along the input dim (bitstream, see packing.py)
  qzeros   int32 [G, out·bits/32]    (zero − 1) packed along the output dim: format v1 stores zero minus one
  scales   fp16  [G, out]
  g_idx    int32 [in]                group of each input column (act-order regroups them; desc_act=True)
  bias     as in the source model, when the linear has one
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Dict, Optional, Tuple

import torch

from compress_export._version import __version__
from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.core.structure import FUSED_LINEARS
from compress_export.formats.base import STORAGE_DTYPE, Format, TensorSpec, register_format
from compress_export.formats.packing import pack, unpack


@register_format("gptq")
class GPTQFormat(Format):
    quant_method = "gptq"
    supported_bits = (2, 3, 4, 8)

    min_zero = 1  # zero−1 is stored, so an asymmetric zero point must stay ≥ 1
    primary = "qweight"
    optional = ("g_idx",)

    def linear_shape(self, t, scheme):
        rows, out_f = t["qweight"].shape
        return int(Fraction(rows) * Fraction(32, scheme.bits)), out_f

    def pack(self, qw: QuantizedWeight, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        b = qw.scheme.bits
        if int(qw.zeros.min()) < 1:
            raise UserError("GPTQ v1 stores zero-1: a zero point of 0 cannot be written (quantize with min_zero=1)")
        out = {
            "qweight": pack(qw.codes.t().int(), b, dim=0),
            "qzeros": pack((qw.zeros - 1).t().int(), b, dim=1),
            "scales": qw.scales.t().half().contiguous(),
            "g_idx": qw.g_idx.int().contiguous(),
        }
        if qw.bias is not None:
            out["bias"] = qw.bias
        return out

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict) -> QuantizedWeight:
        scheme = self.scheme_from_config(qcfg)
        b = scheme.bits
        codes = unpack(t["qweight"], b, dim=0).t().to(torch.uint8).contiguous()
        zeros = (unpack(t["qzeros"], b, dim=1) + 1).t().contiguous()
        scales = t["scales"].float().t().contiguous()
        n = codes.shape[1]
        g_idx = t["g_idx"].int() if "g_idx" in t else (torch.arange(n) // scheme.group_len(n)).int()
        return QuantizedWeight(codes, scales, zeros.int(), g_idx, scheme, t.get("bias"))

    def tensor_layout(
        self, scheme: Scheme, in_f: int, out_f: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        pf = Fraction(32, scheme.bits)
        G = scheme.groups(in_f)
        return {
            "qweight": TensorSpec((int(in_f / pf), out_f), torch.int32, 0, 1, packed_dim=0, pack_factor=pf),
            "qzeros": TensorSpec((G, int(out_f / pf)), torch.int32, 0, 1, packed_dim=1, pack_factor=pf, per_group=True),
            "scales": TensorSpec((G, out_f), torch.float16, 0, 1, per_group=True),
            "g_idx": TensorSpec((in_f,), torch.int32, 0, None),
        }

    def quantization_config(
        self, scheme: Scheme, ignore: list, extra: dict, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> dict:
        return GPTQConfig.from_scheme(scheme, ignore, extra).to_dict()

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Scheme:
        return GPTQConfig.parse(qcfg).scheme

    def module_config(self, qcfg: dict, name: str) -> Optional[dict]:
        rules = parse_dynamic(qcfg.get("dynamic"))
        if not rules:
            return qcfg
        override = dynamic_override(rules, name)
        if override is False:
            return None
        own = {k: v for k, v in qcfg.items() if k != "dynamic"}
        own.update({k: v for k, v in (override or {}).items() if k in DYNAMIC_KEYS})
        return own

    def has_module_overrides(self, qcfg: dict) -> bool:
        return bool(qcfg.get("dynamic"))

    def module_configs(self, qcfg: dict) -> list:
        base = {k: v for k, v in qcfg.items() if k != "dynamic"}
        out = [base]
        for pattern, override in parse_dynamic(qcfg.get("dynamic")).items():
            own = {**base, **{k: v for k, v in override.items() if k in DYNAMIC_KEYS}}
            if not pattern.startswith("-:") and own not in out:
                out.append(own)
        return out

    def record_overrides(self, qcfg: dict, overrides: dict, base: Scheme) -> dict:
        return {**qcfg, "dynamic": dynamic_rules(overrides, base)} if overrides else qcfg


def dynamic_rules(overrides: Dict[str, Scheme], base: Scheme) -> dict:
    """GPTQModel's `dynamic` for per-module schemes: one "+:" rule per linear, its name escaped and anchored at
    both ends, with the fields that differ from `base`; and one for the fused module an engine builds from a set of
    linears that share a scheme (vLLM looks its layers up under the fused name: qkv_proj, gate_up_proj)."""

    def fields(s: Scheme) -> dict:
        mine, theirs = GPTQConfig.from_scheme(s, [], {}).to_dict(), GPTQConfig.from_scheme(base, [], {}).to_dict()
        return {k: mine[k] for k in DYNAMIC_KEYS if mine[k] != theirs[k]}

    rules = {f"+:^{re.escape(n)}$": fields(s) for n, s in sorted(overrides.items())}
    for leaves, fused in FUSED_LINEARS.items():
        for name in sorted(overrides):
            parent, _, leaf = name.rpartition(".")
            if leaf != leaves[0]:
                continue
            same = {overrides.get(f"{parent}.{x}") for x in leaves}
            scheme = same.pop() if len(same) == 1 else None
            if scheme is not None:
                rules[f"+:^{re.escape(f'{parent}.{fused}')}$"] = fields(scheme)
    return rules


# The override keys read; GPTQModel also writes keys that only steered its own run (ignored), and an unknown key
# might change how the tensors are to be read: refused rather than guessed.
DYNAMIC_KEYS = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool}
RUN_ONLY_KEYS = ("damp_percent", "damp_auto_increment", "static_groups", "true_sequential", "mse")


@functools.cache
def _pattern(rule: str) -> re.Pattern:
    """A rule's regex, compiled once (re's own cache holds 512, fewer than a deep model's rules)."""
    return re.compile(rule[2:] if rule.startswith(("+:", "-:")) else rule)


def parse_dynamic(rules) -> dict:
    """GPTQModel's per-module overrides, checked: {pattern: {key: value}}, the pattern a regex over the module's
    full name, prefixed "+:" (override; a bare pattern too) or "-:" (the module is left unquantized)."""
    if not rules:
        return {}
    if not isinstance(rules, dict):
        raise UserError(f"quantization_config 'dynamic' must map module patterns to overrides, got {rules!r}")
    for pattern, override in rules.items():
        where = f"quantization_config 'dynamic' rule {pattern!r}"
        try:
            _pattern(pattern)
        except re.error as e:
            raise UserError(f"{where}: not a regular expression ({e})") from None
        if not isinstance(override, dict):
            raise UserError(f"{where}: the override must be a mapping, got {override!r}")
        for k, v in override.items():
            if k in RUN_ONLY_KEYS:
                continue
            if k not in DYNAMIC_KEYS:
                raise UserError(f"{where}: override {k!r} is not read (only {', '.join(DYNAMIC_KEYS)})")
            if type(v) is not DYNAMIC_KEYS[k]:
                raise UserError(f"{where}: {k} must be {DYNAMIC_KEYS[k].__name__}, got {v!r}")
        if override.get("bits", 4) not in GPTQFormat.supported_bits:
            raise UserError(f"{where}: {override['bits']} bits (GPTQ stores {GPTQFormat.supported_bits})")
    return rules


def dynamic_override(rules: dict, name: str):
    """The override module `name` gets: False when a "-:" rule excludes it, the first matching "+:" rule's
    mapping, else None (the base config). vLLM's rule (gptq_utils.get_dynamic_override): rules in order, re.match
    (anchored at the start only), the first match decides."""
    for pattern, override in rules.items():
        if _pattern(pattern).match(name):
            return False if pattern.startswith("-:") else override
    return None


@dataclass(frozen=True)
class GPTQConfig:
    """config.json's quantization_config of a GPTQ v1 checkpoint, the fields AutoGPTQ, GPTQModel, transformers
    and vLLM read. desc_act: columns were visited in act-order and g_idx regroups them; static_groups: act-order
    with groups fixed before the sweep (g_idx stays i // group_size)."""

    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    modules_not_quantized: Tuple[str, ...] = ()
    compress_export: dict = field(default_factory=dict)  # how it was made (method, calibration, options)
    dynamic: dict = field(default_factory=dict)  # per-module overrides (see dynamic_override), {} when uniform
    quant_method: ClassVar[str] = "gptq"
    checkpoint_format: ClassVar[str] = "gptq"

    @classmethod
    def from_scheme(cls, scheme: Scheme, ignore: list, extra: dict) -> GPTQConfig:
        return cls(
            bits=scheme.bits,
            group_size=scheme.group_size,
            sym=scheme.symmetric,
            desc_act=scheme.act_order == "group",
            static_groups=scheme.act_order == "static",
            damp_percent=extra.get("damp", 0.01),
            modules_not_quantized=tuple(ignore),
            compress_export=extra,
        )

    @classmethod
    def parse(cls, qcfg: dict) -> GPTQConfig:
        if qcfg.get("checkpoint_format", "gptq") != cls.checkpoint_format:
            raise UserError(
                f"GPTQ checkpoint_format {qcfg.get('checkpoint_format')!r} is not supported (only v1 'gptq')"
            )
        dynamic = parse_dynamic(qcfg.get("dynamic"))
        return cls(
            bits=int(qcfg["bits"]),
            group_size=int(qcfg.get("group_size", -1)),
            sym=bool(qcfg.get("sym", True)),
            desc_act=bool(qcfg.get("desc_act")),
            static_groups=bool(qcfg.get("static_groups")),
            damp_percent=float(qcfg.get("damp_percent", 0.01)),
            modules_not_quantized=tuple(qcfg.get("modules_not_quantized") or ()),
            compress_export=dict(qcfg.get("compress_export") or {}),
            dynamic=dynamic,
        )

    @property
    def scheme(self) -> Scheme:
        act = "group" if self.desc_act else ("static" if self.static_groups else "none")
        return Scheme(self.bits, self.group_size, self.sym, act)

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": True,
            "lm_head": False,
            "checkpoint_format": self.checkpoint_format,
            "damp_percent": self.damp_percent,
            "quantizer": [f"compress-export:{__version__}"],
            "modules_not_quantized": list(self.modules_not_quantized),
            "compress_export": self.compress_export,
            **({"dynamic": self.dynamic} if self.dynamic else {}),
        }
