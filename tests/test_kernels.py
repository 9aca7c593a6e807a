"""Kernels against the dequantized reference; the registry explains itself when nothing fits."""

import pytest
import torch

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.kernels.base import KERNELS, KernelRequest, choose_kernel
from compress_export.kernels.linear import QuantLinear
from compress_export.math.hessian import HessianAccumulator
from compress_export.math.sweep import gptq_quantize


@pytest.mark.parametrize(
    "bits,group,sym,act",
    [(4, 32, True, "group"), (3, 64, False, "none"), (8, -1, True, "static"), (2, 16, False, "group")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_the_reference(bits, group, sym, act, dtype):
    torch.manual_seed(0)
    X = torch.randn(512, 128) * torch.linspace(0.1, 2, 128)
    acc = HessianAccumulator(128)
    acc.add(X)
    qw = gptq_quantize(torch.randn(96, 128), acc.H, Scheme(bits, group, sym, act))
    qw.bias = torch.randn(96)
    x = torch.randn(5, 128)
    ref = x @ qw.dequantize().T + qw.bias
    ran = []
    for name, cls in KERNELS.items():
        req = KernelRequest.for_weight(qw, dtype, "cpu")
        ok, why = cls.can_implement(req)
        if not ok:
            continue
        y = cls(qw, req)(x.to(dtype)).float() + qw.bias
        # fp32: 1e-4 of the largest output (cpu-wna16's int16 activations; its exact bound is in test_cpu_kernel)
        tol = (1e-4 if dtype == torch.float32 else 0.02) * ref.abs().max().item()
        assert torch.allclose(y, ref, atol=tol), name
        ran.append(name)
    assert "torch-dequant" in ran
    y = QuantLinear(qw, dtype)(x.to(dtype)).float()  # the module adds the bias and runs the registry's choice
    assert torch.allclose(y, ref, atol=tol)


def test_no_kernel_fits_lists_every_reason():
    req = KernelRequest(4, 48, True, False, 128, 64, torch.float32, "cpu")
    with pytest.raises(UserError) as e:
        choose_kernel(req)
    assert "torch-dequant: group size 48 does not divide in_features 128" in str(e.value)
