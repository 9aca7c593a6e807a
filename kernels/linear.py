"""QuantLinear: an nn.Module that runs a QuantizedWeight (or SparseWeight) through the kernel the registry chooses.

It knows no checkpoint format. A loaded model that saves as the format it was read from hands it a `saved_as`
object (io/loading.FormatTensors) that gives the tensors its state dict holds; this module only asks for them.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol

import torch
import torch.nn as nn

from compress_export.kernels.base import KernelRequest, LinearKernel, choose_kernel


class SavedAs(Protocol):
    """What a QuantLinear's state dict holds for its weight, besides its bias parameter."""

    def attach(self, qw, kernel: LinearKernel, act_dtype: torch.dtype) -> None:
        """Called once the kernel is prepared from qw (the kernel may give qw back later, or may not)."""

    def tensors(self, bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The tensors to save, named by their suffix after the module's prefix."""

    def held(self) -> List[torch.Tensor]:
        """Tensors it keeps in memory (counted by weight_bytes)."""


class QuantLinear(nn.Module):
    def __init__(self, qw, act_dtype=torch.float32, device: str = "cpu", saved_as: Optional[SavedAs] = None):
        super().__init__()
        req = KernelRequest.for_weight(qw, act_dtype, device)
        self.kernel = choose_kernel(req)(qw, req)
        self.in_features, self.out_features = req.in_features, req.out_features
        self.bias = nn.Parameter(qw.bias.to(act_dtype), requires_grad=False) if qw.bias is not None else None
        self.saved_as = saved_as
        if saved_as is not None:
            saved_as.attach(qw, self.kernel, act_dtype)

    def forward(self, x):
        y = self.kernel(x)
        return y + self.bias if self.bias is not None else y

    def held_tensors(self) -> list:
        """The tensors this module keeps besides its parameters and buffers (the kernel's prepared layout)."""
        extra = self.saved_as.held() if self.saved_as is not None else []
        return list(self.kernel.tensors().values()) + extra

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.saved_as is not None:
            for k, v in self.saved_as.tensors(self.bias).items():
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
            tensors += m.held_tensors()
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
