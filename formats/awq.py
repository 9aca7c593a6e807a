"""AWQ "GEMM" checkpoint format (AutoAWQ), as vLLM (`awq`, `awq_marlin`, the CPU `cpu_wna16` path) reads it.

Per quantized linear with W [out, in], G groups (4-bit only):
  qweight  int32 [in, out/8]   codes packed along the OUTPUT dim; word c of row i holds output columns
                               8c + [0, 2, 4, 6, 1, 3, 5, 7] at nibbles 0..7 (AWQ's interleave)
  qzeros   int32 [G, out/8]    zero points, the same packing and interleave, stored as is (no −1)
  scales   fp16  [G, out]
  bias     as in the source model, when the linear has one
No g_idx: groups are contiguous input columns, so act-order with regrouped columns cannot be stored.
The interleave is a permutation handed to the one shared packer (packing.py), not a second packer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Dict, Tuple

import torch

from compress_export._version import __version__
from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.formats.base import STORAGE_DTYPE, Format, TensorSpec, register_format
from compress_export.formats.packing import pack, unpack

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@register_format("awq")
class AWQFormat(Format):
    quant_method = "awq"
    supported_bits = (4,)
    default_method = "awq"
    primary = "qweight"

    def linear_shape(self, t, scheme):
        in_f, cols = t["qweight"].shape
        return in_f, cols * 8

    def check(self, scheme: Scheme, sparsity=None) -> None:
        super().check(scheme, sparsity)
        if scheme.act_order == "group":
            raise UserError(
                "--format awq has no g_idx, so --act-order group cannot be stored; "
                "use --act-order static or none (or --format gptq / compressed-tensors)"
            )
        if scheme.per_channel:
            raise UserError("--format awq stores grouped scales; use --group-size 128, 64 or 32")

    def pack(self, qw: QuantizedWeight, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        if not qw.has_trivial_g_idx():
            raise UserError("AWQ GEMM cannot store regrouped columns (non-trivial g_idx)")
        out = {
            "qweight": pack(qw.codes.t().int(), 4, dim=1, order=AWQ_ORDER),
            "qzeros": pack(qw.zeros.t().int(), 4, dim=1, order=AWQ_ORDER),
            "scales": qw.scales.t().half().contiguous(),
        }
        if qw.bias is not None:
            out["bias"] = qw.bias
        return out

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict) -> QuantizedWeight:
        scheme = self.scheme_from_config(qcfg)
        codes = unpack(t["qweight"], 4, dim=1, order=AWQ_ORDER).t().to(torch.uint8).contiguous()
        zeros = unpack(t["qzeros"], 4, dim=1, order=AWQ_ORDER).t().int().contiguous()
        scales = t["scales"].float().t().contiguous()
        n = codes.shape[1]
        g_idx = (torch.arange(n) // (n // scales.shape[1])).int()
        return QuantizedWeight(codes, scales, zeros, g_idx, scheme, t.get("bias"))

    def tensor_layout(
        self, scheme: Scheme, in_f: int, out_f: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        pf = Fraction(8)
        G = in_f // max(1, scheme.group_size)
        return {
            "qweight": TensorSpec((in_f, out_f // 8), torch.int32, 0, 1, packed_dim=1, pack_factor=pf),
            "qzeros": TensorSpec((G, out_f // 8), torch.int32, 0, 1, packed_dim=1, pack_factor=pf, per_group=True),
            "scales": TensorSpec((G, out_f), torch.float16, 0, 1, per_group=True),
        }

    def quantization_config(
        self, scheme: Scheme, ignore: list, extra: dict, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> dict:
        return AWQConfig.from_scheme(scheme, ignore, extra).to_dict()

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Scheme:
        return AWQConfig.parse(qcfg).scheme


@dataclass(frozen=True)
class AWQConfig:
    """config.json's quantization_config of an AWQ GEMM checkpoint (AutoAWQ, transformers and vLLM read it):
    always 4-bit with zero points. A symmetric export stores zero points of 8, and says it was symmetric in
    its own `compress_export` entry (no AWQ reader has the notion)."""

    group_size: int
    symmetric: bool = False
    modules_to_not_convert: Tuple[str, ...] = ()
    compress_export: dict = field(default_factory=dict)
    quant_method: ClassVar[str] = "awq"
    bits: ClassVar[int] = 4
    version: ClassVar[str] = "gemm"

    @classmethod
    def from_scheme(cls, scheme: Scheme, ignore: list, extra: dict) -> AWQConfig:
        return cls(
            group_size=scheme.group_size,
            symmetric=scheme.symmetric,
            modules_to_not_convert=tuple(ignore),
            compress_export=extra,
        )

    @classmethod
    def parse(cls, qcfg: dict) -> AWQConfig:
        version = str(qcfg.get("version", "gemm")).lower()
        if version != cls.version:
            raise UserError(f"AWQ version {version!r} is not supported (only 'gemm')")
        if int(qcfg.get("bits", qcfg.get("w_bit", 4))) != cls.bits:
            raise UserError("AWQ GEMM checkpoints are 4-bit")
        if not qcfg.get("zero_point", True):
            raise UserError("AWQ checkpoints without zero points are not supported")
        ours = dict(qcfg.get("compress_export") or {})
        return cls(
            group_size=int(qcfg.get("group_size", qcfg.get("q_group_size", 128))),
            symmetric=bool(ours.get("symmetric", False)),
            modules_to_not_convert=tuple(qcfg.get("modules_to_not_convert") or ()),
            compress_export=ours,
        )

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.symmetric, "none")

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method,
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": True,
            "version": self.version,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "quantizer": [f"compress-export:{__version__}"],
            "compress_export": {**self.compress_export, "symmetric": self.symmetric},
        }
