"""QuantLinear: an nn.Module that runs a QuantizedWeight through the kernel the registry chooses."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress_export.result import QuantizedWeight

from .base import KernelRequest, choose_kernel


class QuantLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, act_dtype=torch.float32, device: str = "cpu"):
        super().__init__()
        req = KernelRequest.for_weight(qw, act_dtype, device)
        self.kernel = choose_kernel(req)(qw, req)
        self.in_features, self.out_features = req.in_features, req.out_features
        self.bias = nn.Parameter(qw.bias.to(act_dtype), requires_grad=False) if qw.bias is not None else None

    def forward(self, x):
        y = self.kernel(x)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, kernel={type(self.kernel).__name__}"


def replace_linears(model: nn.Module, qweights: dict, act_dtype=torch.float32) -> None:
    for name, qw in qweights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(qw, act_dtype))
