"""QuantLinear: an nn.Module that runs a QuantizedWeight through the kernel the registry chooses.

Given the checkpoint format it was read from, it also saves as that format: its state dict holds the format's
tensors (repacked from the kernel's own layout when the kernel is invertible, else the tensors it was loaded from),
so `save_pretrained` of a loaded model writes the export back unchanged while memory holds one packed copy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from compress_export.core.result import QuantizedWeight

from compress_export.kernels.base import KernelRequest, choose_kernel


class QuantLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, act_dtype=torch.float32, device: str = "cpu", fmt=None,
                 source: Optional[dict] = None):
        super().__init__()
        req = KernelRequest.for_weight(qw, act_dtype, device)
        self.kernel = choose_kernel(req)(qw, req)
        self.in_features, self.out_features = req.in_features, req.out_features
        self.bias = nn.Parameter(qw.bias.to(act_dtype), requires_grad=False) if qw.bias is not None else None
        self.fmt = fmt
        # The exact tensors are kept only where the kernel cannot give its weight back (pruning masks, float
        # values): a quantized weight with a mask would lose which kept weights sit at their zero point.
        exact = self.kernel.invertible and getattr(qw, "mask", None) is None
        self.source = None if fmt is None or exact else dict(source or fmt.pack(qw))
        self.bias_src = qw.bias if qw.bias is not None and qw.bias.dtype != act_dtype else None

    def forward(self, x):
        y = self.kernel(x)
        return y + self.bias if self.bias is not None else y

    def format_tensors(self) -> dict:
        """This linear in its checkpoint format's tensors, as they were read."""
        if self.source is not None:
            return self.source
        qw = self.kernel.quantized_weight()
        qw.bias = self.bias_src if self.bias_src is not None else self.bias
        return self.fmt.pack(qw)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fmt is not None:
            for k, v in self.format_tensors().items():
                destination[prefix + k] = v

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, kernel={type(self.kernel).__name__}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor a model holds for its weights: parameters, buffers, and the packed tensors
    of QuantLinear kernels (tied weights count once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, QuantLinear):
            tensors += list(m.kernel.tensors().values()) + list((m.source or {}).values())
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key not in seen and t.numel():
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def replace_linears(model: nn.Module, qweights: dict, act_dtype=torch.float32) -> None:
    for name, qw in qweights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(qw, act_dtype))
