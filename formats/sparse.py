"""Formats for pruned weights: `sparse24` (compressed 2:4, optionally with quantized values) and `dense`.

sparse24, per linear with W [out, in] (in a multiple of 32), every group of 4 consecutive input weights of a row
keeping exactly 2 (positions p0 < p1):
  weight_idx         int32 [out, in/32]   the kept positions (2 bits each, 0..3), in row order p0, p1 of group 0,
                                          p0, p1 of group 1, …, packed 16 per word along the input dim (the
                                          shared bitstream packer)
  unquantized (no --bits):
  weight_values      source dtype [out, in/2]   the kept values, in the same order
  with --bits b (2:4 + b-bit, G groups over the ORIGINAL input columns):
  weight_packed      int32 [out, ceil(in/2 / (32//b))]   codes of the kept values, word-aligned along the input dim
  weight_scale       fp16  [out, G]
  weight_zero_point  int32 [ceil(out / (32//b)), G]       asymmetric only, packed along dim 0 (OUTPUT)
  bias               as in the source model, when the linear has one
Pruned weights are exactly 0 (unquantized) or their group's zero point (quantized). quantization_config:
{quant_method: "compress_export_sparse24", sparsity: "2:4", weights: null | {num_bits, group_size, symmetric},
value_dtype, ignore}; our vLLM plugin and transformers registration read it.

dense: plain `weight` tensors with the zeros in place, loadable by any engine; config.json records the pattern
under `compress_export_sparsity` (no quantization_config, so engines treat it as an ordinary model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Dict, Optional, Tuple, Union

import torch

from compress_export._version import __version__
from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity
from compress_export.formats.base import STORAGE_DTYPE, Format, TensorSpec, register_format
from compress_export.formats.packing import aligned_len, pack, unpack

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """[out, in] bool with exactly 2 of every 4 → positions [out, in/2] (0..3, ascending within a group)."""
    out_f, in_f = mask.shape
    g = mask.reshape(out_f, in_f // 4, 4)
    if not bool((g.sum(dim=2) == 2).all()):
        raise UserError("sparse24 needs exactly 2 kept weights in every group of 4 (a 2:4 mask)")
    pos = torch.arange(4).expand_as(g)
    return pos[g].reshape(out_f, in_f // 2)


def _scatter(kept: torch.Tensor, pos: torch.Tensor, in_f: int, fill) -> torch.Tensor:
    """Inverse of gathering: kept [out, in/2] at positions pos into a dense [out, in] filled with `fill`."""
    out_f = kept.shape[0]
    cols = (torch.arange(in_f // 2) // 2 * 4)[None, :] + pos.long()
    dense = fill.clone() if torch.is_tensor(fill) else torch.full((out_f, in_f), fill, dtype=kept.dtype)
    dense.scatter_(1, cols, kept.to(dense.dtype))
    return dense


@register_format("sparse24")
class Sparse24Format(Format):
    quant_method = "compress_export_sparse24"
    supported_bits = (2, 3, 4, 8)
    default_method = "sparsegpt"

    def check(self, scheme: Optional[Scheme], sparsity=None) -> None:
        if sparsity is None or (sparsity.n, sparsity.m) != (2, 4):
            raise UserError(
                f"--format sparse24 stores 2:4 sparsity, not {sparsity or 'dense weights'}; "
                "use --sparsity 2:4, or --format dense for other patterns"
            )
        if scheme is not None:
            super().check(scheme, sparsity)

    primary = "weight_idx"

    def linear_shape(self, t, scheme):
        out_f, words = t["weight_idx"].shape
        return words * 32, out_f

    def check_linear(self, name, in_f, out_f, sparsity=None):
        if in_f % 32:
            raise UserError(f"{name}: sparse24 packs 16 positions per word; input size {in_f} must be a multiple of 32")

    def pack(self, w, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        pos = _kept_positions(w.mask)
        out = {"weight_idx": pack(pos.int(), 2, dim=1)}
        rows = torch.arange(w.shape[0])[:, None]
        cols = (torch.arange(w.shape[1] // 2) // 2 * 4)[None, :] + pos
        if isinstance(w, SparseWeight):
            out["weight_values"] = w.values[rows, cols].to(storage_dtype).contiguous()
        else:
            b = w.scheme.bits
            out["weight_packed"] = pack(w.codes[rows, cols].int(), b, dim=1, aligned=True)
            out["weight_scale"] = w.scales.half().contiguous()
            if not w.scheme.symmetric:
                out["weight_zero_point"] = pack(w.zeros.int(), b, dim=0, aligned=True)
        if w.bias is not None:
            out["bias"] = w.bias
        return out

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict) -> Union[QuantizedWeight, SparseWeight]:
        scheme = self.scheme_from_config(qcfg)
        idx = t["weight_idx"]
        in_f = idx.shape[1] * 32
        pos = unpack(idx, 2, dim=1)
        out_f = idx.shape[0]
        mask = _scatter(torch.ones(out_f, in_f // 2, dtype=torch.bool), pos, in_f, False)
        sp = Sparsity(2, 4)
        if scheme is None:
            values = _scatter(t["weight_values"].float(), pos, in_f, 0.0)
            return SparseWeight(values, mask, sp, t.get("bias"))
        scales = t["weight_scale"].float().contiguous()
        G = scales.shape[1]
        g_idx = (torch.arange(in_f) // (in_f // G)).int()
        if scheme.symmetric:
            zeros = torch.full((out_f, G), scheme.sym_zero, dtype=torch.int32)
        else:
            zeros = unpack(t["weight_zero_point"], scheme.bits, dim=0, aligned=True, length=out_f)
        kept = unpack(t["weight_packed"], scheme.bits, dim=1, aligned=True, length=in_f // 2)
        codes = _scatter(kept, pos, in_f, zeros[:, g_idx.long()].to(torch.int32))
        return QuantizedWeight(codes.to(torch.uint8), scales, zeros.int(), g_idx, scheme, t.get("bias"), mask)

    def tensor_layout(
        self, scheme: Optional[Scheme], in_f: int, out_f: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        specs = {}
        if scheme is None:
            specs["weight_values"] = TensorSpec(
                (out_f, in_f // 2), storage_dtype, 1, 0, packed_dim=1, pack_factor=Fraction(2)
            )
        else:
            pf = 32 // scheme.bits
            G = scheme.groups(in_f)
            specs["weight_packed"] = TensorSpec(
                (out_f, aligned_len(in_f // 2, scheme.bits)),
                torch.int32,
                1,
                0,
                packed_dim=1,
                pack_factor=Fraction(2 * pf),
            )
            specs["weight_scale"] = TensorSpec((out_f, G), torch.float16, 1, 0, per_group=True)
            if not scheme.symmetric:
                specs["weight_zero_point"] = TensorSpec(
                    (aligned_len(out_f, scheme.bits), G),
                    torch.int32,
                    1,
                    0,
                    packed_dim=0,
                    pack_factor=Fraction(pf),
                    per_group=True,
                )
        specs["weight_idx"] = TensorSpec((out_f, in_f // 32), torch.int32, 1, 0, packed_dim=1, pack_factor=Fraction(32))
        return specs

    def quantization_config(
        self, scheme: Optional[Scheme], ignore: list, extra: dict, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> dict:
        return Sparse24Config(scheme, storage_dtype, tuple(ignore), extra).to_dict()

    def stored_dtype(self, qcfg: dict) -> torch.dtype:
        return Sparse24Config.parse(qcfg).value_dtype

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Optional[Scheme]:
        return Sparse24Config.parse(qcfg).scheme


@dataclass(frozen=True)
class Sparse24Config:
    """config.json's quantization_config of our 2:4 format: the kept values' dtype (unquantized) or the 4-bit
    scheme of their codes, and the linears left dense."""

    scheme: Optional[Scheme]  # None: kept values stored as floats of value_dtype
    value_dtype: torch.dtype = torch.float16
    ignore: Tuple[str, ...] = ()
    compress_export: dict = field(default_factory=dict)
    quant_method: ClassVar[str] = "compress_export_sparse24"
    format_version: ClassVar[int] = 1

    @classmethod
    def parse(cls, qcfg: dict) -> Sparse24Config:
        if qcfg.get("sparsity") != "2:4":
            raise UserError(f"sparse24 checkpoint with sparsity {qcfg.get('sparsity')!r}: only 2:4 is defined")
        w = qcfg.get("weights")
        scheme = None if w is None else Scheme(int(w["num_bits"]), int(w["group_size"]), bool(w["symmetric"]))
        return cls(
            scheme,
            _DTYPES.get(qcfg.get("value_dtype", "float16"), torch.float16),
            tuple(qcfg.get("ignore") or ()),
            dict(qcfg.get("compress_export") or {}),
        )

    def to_dict(self) -> dict:
        s = self.scheme
        weights = None if s is None else {"num_bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
        return {
            "quant_method": self.quant_method,
            "sparsity": "2:4",
            "format_version": self.format_version,
            "weights": weights,
            "value_dtype": str(self.value_dtype).replace("torch.", ""),
            "ignore": list(self.ignore),
            "quantizer": [f"compress-export:{__version__}"],
            "compress_export": self.compress_export,
        }


@register_format("dense")
class DenseFormat(Format):
    """Pruned weights stored dense (zeros in place): any engine loads them as an ordinary model."""

    default_method = "sparsegpt"

    def check(self, scheme: Optional[Scheme], sparsity=None) -> None:
        if scheme is not None:
            raise UserError(
                "--format dense stores unquantized pruned weights: drop --bits, or use --format "
                "sparse24 (2:4 + quantization) or a quantized format"
            )

    def pack(self, w: SparseWeight, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        out = {"weight": w.values.to(storage_dtype).contiguous()}
        if w.bias is not None:
            out["bias"] = w.bias
        return out

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict) -> SparseWeight:
        """qcfg: config.json's `compress_export_sparsity` entry (a dense export has no quantization_config). The
        mask is read back from the zeros, so a kept weight that is exactly 0 reads as pruned (the same numbers)."""
        values = t["weight"].float()
        sparsity = Sparsity.parse(qcfg["sparsity"]) if qcfg.get("sparsity") else None
        return SparseWeight(values, values != 0, sparsity, t.get("bias"))

    def tensor_layout(
        self, scheme: Optional[Scheme], in_f: int, out_f: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        return {"weight": TensorSpec((out_f, in_f), storage_dtype, 1, 0)}

    def quantization_config(self, scheme, ignore, extra, storage_dtype: torch.dtype = STORAGE_DTYPE):
        return None

    def config_extras(self, ignore: list, extra: dict) -> dict:
        return {
            "compress_export_sparsity": {
                "sparsity": extra.get("sparsity"),
                "ignore": ignore,
                "quantizer": f"compress-export:{__version__}",
                **extra,
            }
        }

    @classmethod
    def claims(cls, qcfg: dict) -> bool:
        return False
