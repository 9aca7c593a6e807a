"""GPTQ checkpoint format (AutoGPTQ/GPTQModel "gptq" v1), as vLLM (gptq, gptq_marlin) and transformers read it.

Per quantized linear with W [out, in], G groups:
  qweight  int32 [in·bits/32, out]   codes packed along the input dim (bitstream, see packing.py)
  qzeros   int32 [G, out·bits/32]    (zero − 1) packed along the output dim: format v1 stores zero minus one
  scales   fp16  [G, out]
  g_idx    int32 [in]                group of each input column (act-order regroups them; desc_act=True)
  bias     as in the source model, when the linear has one
"""
from __future__ import annotations

from fractions import Fraction
from typing import Dict

import torch

from compress_export import __version__
from compress_export.errors import UserError
from compress_export.result import QuantizedWeight
from compress_export.scheme import Scheme

from .base import Format, TensorSpec, register_format
from .packing import pack, unpack


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

    def pack(self, qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
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

    def unpack(self, t: Dict[str, torch.Tensor], qcfg: dict, shape=None) -> QuantizedWeight:
        scheme = self.scheme_from_config(qcfg)
        b = scheme.bits
        codes = unpack(t["qweight"], b, dim=0).t().to(torch.uint8).contiguous()
        zeros = (unpack(t["qzeros"], b, dim=1) + 1).t().contiguous()
        scales = t["scales"].float().t().contiguous()
        g_idx = t["g_idx"].int() if "g_idx" in t else _default_g_idx(codes.shape[1], scheme.group_size)
        return QuantizedWeight(codes, scales, zeros.int(), g_idx, scheme, t.get("bias"))

    def tensor_layout(self, scheme: Scheme, in_f: int, out_f: int) -> Dict[str, TensorSpec]:
        pf = Fraction(32, scheme.bits)
        G = 1 if scheme.group_size == -1 else in_f // max(1, scheme.group_size)
        return {
            "qweight": TensorSpec((int(in_f / pf), out_f), torch.int32, 0, 1, packed_dim=0, pack_factor=pf),
            "qzeros": TensorSpec((G, int(out_f / pf)), torch.int32, 0, 1, packed_dim=1, pack_factor=pf,
                                 per_group=True),
            "scales": TensorSpec((G, out_f), torch.float16, 0, 1, per_group=True),
            "g_idx": TensorSpec((in_f,), torch.int32, 0, None),
        }

    def quantization_config(self, scheme: Scheme, ignore: list, extra: dict) -> dict:
        return {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": scheme.act_order == "group",
            "sym": scheme.symmetric,
            "static_groups": scheme.act_order == "static",
            "true_sequential": True,
            "lm_head": False,
            "checkpoint_format": "gptq",
            "damp_percent": extra.get("damp", 0.01),
            "quantizer": [f"compress-export:{__version__}"],
            "modules_not_quantized": ignore,
            "compress_export": extra,
        }

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Scheme:
        if qcfg.get("checkpoint_format", "gptq") != "gptq":
            raise UserError(f"GPTQ checkpoint_format {qcfg.get('checkpoint_format')!r} is not supported "
                            "(only v1 'gptq')")
        act = "group" if qcfg.get("desc_act") else ("static" if qcfg.get("static_groups") else "none")
        return Scheme(int(qcfg["bits"]), int(qcfg.get("group_size", -1)), bool(qcfg.get("sym", True)), act)


def _default_g_idx(n: int, group_size: int) -> torch.Tensor:
    gs = n if group_size == -1 else group_size
    return (torch.arange(n) // gs).int()
