"""compressed-tensors `pack-quantized` and `int-quantized` (what llm-compressor writes and vLLM's
`compressed-tensors` method reads).

Per quantized linear with W [out, in], G groups, b bits, pf = 32 // b values per word (word-aligned layout:
no value straddles two words; a row whose length is not a multiple of pf is zero-padded at its end):
  weight_packed      int32 [out, ceil(in/pf)]   codes packed along the INPUT dim; compressed-tensors thinks of
                                                them as signed values q − 2^(b−1), stored + 2^(b−1): our codes
  weight_scale       fp16  [out, G]             (fp16-exact scales; engines cast to their activation dtype)
  weight_zero_point  int32 [ceil(out/pf), G]    asymmetric only: zero points packed along dim 0 (OUTPUT)
  weight_shape       int64 [2]                  (out, in)
  weight_g_idx       int32 [in]                 act-order with regrouped columns ("actorder": "group") only
  bias               as in the source model, when the linear has one

W8A8 (8-bit symmetric per-channel weights, int8 activations quantized per token at run time) is `int-quantized`,
the layout vLLM's own int8 kernels load as they are (no plugin):
  weight             int8  [out, in]                the signed value q − 128 of our code q
  weight_scale       fp32  [out, 1]                 vLLM's parameter dtype (our scales are fp16-exact anyway)
  bias               as in the source model, when the linear has one
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Dict, Optional, Tuple

import torch

from compress_export._version import __version__
from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import PER_CHANNEL, Scheme
from compress_export.formats.base import STORAGE_DTYPE, Format, TensorSpec, register_format
from compress_export.formats.packing import aligned_len, pack, unpack

CT_VERSION = "0.17.0"  # the compressed-tensors release whose layout and config this follows
_ACTORDER = {"none": None, "static": "static", "group": "group"}


@register_format("compressed-tensors")
class CompressedTensorsFormat(Format):
    quant_method = "compressed-tensors"
    supported_bits = (2, 3, 4, 8)
    activation_bits = (8, 16)

    def pack(self, qw: QuantizedWeight, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        s = qw.scheme
        if s.act_bits == 8:
            out = {
                "weight": (qw.codes.int() - s.sym_zero).to(torch.int8).contiguous(),
                "weight_scale": qw.scales.float().contiguous(),
            }
            if qw.bias is not None:
                out["bias"] = qw.bias
            return out
        out = {
            "weight_packed": pack(qw.codes.int(), s.bits, dim=1, aligned=True),
            "weight_scale": qw.scales.half().contiguous(),
            "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
        }
        if not s.symmetric:
            out["weight_zero_point"] = pack(qw.zeros.int(), s.bits, dim=0, aligned=True)
        if s.act_order == "group":
            out["weight_g_idx"] = qw.g_idx.int().contiguous()
        if qw.bias is not None:
            out["bias"] = qw.bias
        return out

    primary = "weight_packed"
    optional = ("weight_shape",)

    def primary_tensor(self, qcfg: dict) -> str:
        # int-quantized: `weight` also names every unquantized weight, so the scale marks a quantized linear
        return "weight_scale" if self.scheme_from_config(qcfg).act_bits == 8 else self.primary

    def linear_shape(self, t, scheme):
        if "weight" in t:  # int-quantized
            out_f, in_f = t["weight"].shape
            return in_f, out_f
        if "weight_shape" in t:
            out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
            return in_f, out_f
        out_f, cols = t["weight_packed"].shape
        return cols * (32 // scheme.bits), out_f

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict) -> QuantizedWeight:
        s = self.scheme_from_config(qcfg)
        scales = t["weight_scale"].float().contiguous()
        if s.act_bits == 8:
            codes = (t["weight"].int() + s.sym_zero).to(torch.uint8).contiguous()
            zeros = torch.full_like(scales, s.sym_zero, dtype=torch.int32)
            return QuantizedWeight(
                codes, scales, zeros, torch.zeros(codes.shape[1], dtype=torch.int32), s, t.get("bias")
            )
        out_f = scales.shape[0]
        in_f, _ = self.linear_shape(t, s)
        codes = unpack(t["weight_packed"], s.bits, dim=1, aligned=True, length=in_f).to(torch.uint8)
        if s.symmetric:
            zeros = torch.full_like(scales, s.sym_zero, dtype=torch.int32)
        else:
            zeros = unpack(t["weight_zero_point"], s.bits, dim=0, aligned=True, length=out_f)
        if "weight_g_idx" in t and s.act_order == "group":
            g_idx = t["weight_g_idx"].int()
        else:
            g_idx = (torch.arange(in_f) // (in_f // scales.shape[1])).int()
        return QuantizedWeight(codes.contiguous(), scales, zeros.int().contiguous(), g_idx, s, t.get("bias"))

    def tensor_layout(
        self, scheme: Scheme, in_f: int, out_f: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        if scheme.act_bits == 8:
            return {
                "weight": TensorSpec((out_f, in_f), torch.int8, 1, 0),
                "weight_scale": TensorSpec((out_f, 1), torch.float32, 1, 0, per_group=True),
            }
        pf = Fraction(32 // scheme.bits)
        G = scheme.groups(in_f)
        specs = {
            "weight_packed": TensorSpec(
                (out_f, aligned_len(in_f, scheme.bits)), torch.int32, 1, 0, packed_dim=1, pack_factor=pf
            ),
            "weight_scale": TensorSpec((out_f, G), torch.float16, 1, 0, per_group=True),
            "weight_shape": TensorSpec((2,), torch.int64, None, None),
        }
        if not scheme.symmetric:
            specs["weight_zero_point"] = TensorSpec(
                (aligned_len(out_f, scheme.bits), G), torch.int32, 1, 0, packed_dim=0, pack_factor=pf, per_group=True
            )
        if scheme.act_order == "group":
            specs["weight_g_idx"] = TensorSpec((in_f,), torch.int32, 0, None)
        return specs

    def quantization_config(
        self, scheme: Scheme, ignore: list, extra: dict, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> dict:
        return CompressedTensorsConfig.from_scheme(scheme, ignore, extra).to_dict()

    @classmethod
    def claims(cls, qcfg: dict) -> bool:
        """Integer pack-quantized and W8A8 int-quantized checkpoints (FP8 and sparse ones are not ours to read).
        Our vLLM plugin still leaves W8A8 to vLLM's own int8 kernels (vllm_route.decide)."""
        if qcfg.get("quant_method") != cls.quant_method:
            return False
        try:
            cls.scheme_from_config(qcfg)
        except (UserError, KeyError, TypeError, ValueError):
            return False
        return True

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Scheme:
        return CompressedTensorsConfig.parse(qcfg).scheme

    # Mixed precision: the group targeting every Linear holds the model's scheme; each other group names the
    # modules it holds (exact names, or "re:" patterns), as llm-compressor writes per-module schemes.
    def has_module_overrides(self, qcfg: dict) -> bool:
        return len(qcfg.get("config_groups") or {}) > 1

    def module_config(self, qcfg: dict, name: str) -> Optional[dict]:
        if not self.has_module_overrides(qcfg):
            return qcfg
        cfg = CompressedTensorsConfig.parse(qcfg)
        groups = qcfg["config_groups"]
        key = next((k for k, targets, _ in cfg.overrides if _targets_match(targets, name)), cfg.base_group)
        return {**qcfg, "config_groups": {key: {**groups[key], "targets": ["Linear"]}}}

    def module_configs(self, qcfg: dict) -> list:
        groups = qcfg.get("config_groups") or {}
        return [{**qcfg, "config_groups": {k: {**g, "targets": ["Linear"]}}} for k, g in groups.items()]

    def record_overrides(self, qcfg: dict, overrides: dict, base: Scheme) -> dict:
        if not overrides:
            return qcfg
        groups = dict(qcfg["config_groups"])
        by_scheme: Dict[Scheme, list] = {}
        for name, scheme in sorted(overrides.items()):
            by_scheme.setdefault(scheme, []).append(name)
        for i, (scheme, names) in enumerate(by_scheme.items(), start=1):
            groups[f"group_{i}"] = _group(scheme, names, qcfg.get("format") or CompressedTensorsConfig.format)
        return {**qcfg, "config_groups": groups}


def _targets_match(targets: tuple, name: str) -> bool:
    """compressed-tensors' rule for a module's name: an exact name, or a "re:" pattern that matches it."""
    return any(t == name or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


@dataclass(frozen=True)
class CompressedTensorsConfig:
    """config.json's quantization_config of a compressed-tensors int checkpoint, one config group targeting every
    Linear, as the compressed-tensors library and llm-compressor write it: weight-only `pack-quantized`, or W8A8
    `int-quantized` with dynamic per-token int8 input activations."""

    scheme: Scheme
    ignore: Tuple[str, ...] = ()
    compress_export: dict = field(default_factory=dict)
    base_group: str = "group_0"  # the group targeting every Linear
    overrides: Tuple[Tuple[str, Tuple[str, ...], Scheme], ...] = ()  # (group, its module targets, its scheme)
    quant_method: ClassVar[str] = "compressed-tensors"
    format: ClassVar[str] = "pack-quantized"
    int_format: ClassVar[str] = "int-quantized"

    @classmethod
    def from_scheme(cls, scheme: Scheme, ignore: list, extra: dict) -> CompressedTensorsConfig:
        return cls(scheme, tuple(ignore), extra)

    @classmethod
    def parse(cls, qcfg: dict) -> CompressedTensorsConfig:
        groups = qcfg.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise UserError("compressed-tensors: config_groups is empty")
        every = [k for k, g in groups.items() if len(groups) == 1 or "Linear" in (_targets(g, k) or ())]
        if len(every) != 1:
            raise UserError(
                f"compressed-tensors: of {len(groups)} config groups exactly one must target every Linear (the "
                f"others naming modules), found {len(every)}"
            )
        base = every[0]
        scheme = cls._group_scheme(groups[base], qcfg)
        overrides = []
        for key, group in groups.items():
            if key == base:
                continue
            targets, own = _targets(group, key), cls._group_scheme(group, qcfg)
            if "Linear" in targets or own.act_bits != scheme.act_bits:
                raise UserError(f"compressed-tensors: config group {key!r} must name modules and quantize weights only")
            overrides.append((key, targets, own))
        return cls(
            scheme, tuple(qcfg.get("ignore") or ()), dict(qcfg.get("compress_export") or {}), base, tuple(overrides)
        )

    @classmethod
    def _group_scheme(cls, group: dict, qcfg: dict) -> Scheme:
        fmt = group.get("format") or qcfg.get("format")
        w = group.get("weights") or {}
        act_bits = _activation_bits(group.get("input_activations"))
        if fmt != (cls.int_format if act_bits == 8 else cls.format) or w.get("type") != "int" or act_bits is None:
            raise UserError(
                f"compressed-tensors: only int pack-quantized (weight-only) and int-quantized W8A8 "
                f"(dynamic per-token int8 activations) are read (got format={fmt!r}, "
                f"type={w.get('type')!r}, input_activations={group.get('input_activations')!r})"
            )
        if w.get("strategy") not in ("group", "channel"):
            raise UserError(f"compressed-tensors: strategy {w.get('strategy')!r} is not supported (group, channel)")
        gs = PER_CHANNEL if w["strategy"] == "channel" else int(w["group_size"])
        act = {None: "none", "static": "static", "group": "group", "weight": "static"}.get(w.get("actorder"))
        if act is None:
            raise UserError(f"compressed-tensors: actorder {w.get('actorder')!r} is not supported")
        return Scheme(int(w["num_bits"]), gs, bool(w.get("symmetric", True)), act, act_bits)

    def to_dict(self) -> dict:
        s = self.scheme
        fmt = self.int_format if s.act_bits == 8 else self.format
        groups = {self.base_group: _group(s, ["Linear"], fmt)}
        groups.update({key: _group(own, list(targets), fmt) for key, targets, own in self.overrides})
        return {
            "quant_method": self.quant_method,
            "format": fmt,
            "config_groups": groups,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
            "quantizer": [f"compress-export:{__version__}"],
            "compress_export": self.compress_export,
        }


def _group(s: Scheme, targets: list, fmt: str) -> dict:
    """One config group: the modules `targets` names, quantized as `s` says."""
    weights = {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.symmetric,
        "group_size": None if s.per_channel else s.group_size,
        "strategy": "channel" if s.per_channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": _ACTORDER[s.act_order],
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": INT8_PER_TOKEN if s.act_bits == 8 else None,
        "output_activations": None,
        "format": fmt,
    }


# Input activations of W8A8: int8, one scale per token computed at run time, symmetric (vLLM's dynamic int8 path).
INT8_PER_TOKEN = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "group_size": None,
    "strategy": "token",
    "block_structure": None,
    "dynamic": True,
    "actorder": None,
    "scale_dtype": None,
    "zp_dtype": None,
    "observer": None,
    "observer_kwargs": {},
}


def _targets(group, key: str) -> Tuple[str, ...]:
    """A config group's targets, checked: module names, "re:" patterns or class names."""
    targets = group.get("targets") if isinstance(group, dict) else None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UserError(f"compressed-tensors: config group {key!r} has no list of targets")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise UserError(f"compressed-tensors: config group {key!r} target {t!r} is not a regex ({e})") from None
    return tuple(targets)


def _activation_bits(acts) -> Optional[int]:
    """16 when activations are not quantized, 8 for dynamic per-token symmetric int8, None for anything else."""
    if not acts:
        return 16
    want = {k: INT8_PER_TOKEN[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")}
    return 8 if all(acts.get(k) == v for k, v in want.items()) else None
