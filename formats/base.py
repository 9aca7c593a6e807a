"""Format interface and registry. A format only packs the in-memory QuantizedWeight (or SparseWeight) into named
tensors and unpacks them again; it holds no state: what a write depends on besides the result (the dtype that
unquantized values are stored in) is an argument, and what a read depends on is the checkpoint's quantization_config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Dict, Optional, Tuple, Union

import torch

from compress_export.core.errors import UserError
from compress_export.core.registry import Registry
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme

FORMATS: Registry = Registry(
    "format", builtins=[f"compress_export.formats.{m}" for m in ("gptq", "awq", "compressed_tensors", "sparse")]
)
register_format = FORMATS.register
STORAGE_DTYPE = torch.float16  # unquantized values' dtype when the writer names none


@dataclass(frozen=True)
class TensorSpec:
    """Shape and sharding roles of one stored tensor, so engines can allocate and shard it without the format.

    input_dim / output_dim: which axis runs along the linear's input / output features (None: neither).
    packed_dim: the axis whose entries hold `pack_factor` values each (None: unpacked).
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    input_dim: Optional[int]
    output_dim: Optional[int]
    packed_dim: Optional[int] = None
    pack_factor: Fraction = Fraction(1)
    per_group: bool = False  # the input axis counts groups, not features


class Format:
    """Subclasses pack one linear's QuantizedWeight into named tensors and write a quantization_config."""

    name = "base"
    quant_method = ""
    supported_bits: tuple = ()
    activation_bits: tuple = (16,)  # 8: it can also record int8 activation quantization (W8A8) for the engine
    default_method = "gptq"  # the pass used when --method is not given
    # The smallest zero point the format can store (GPTQ v1 stores zero-1, so an asymmetric zero of 0 is lost).
    min_zero = 0

    def check(self, scheme: Optional[Scheme], sparsity=None) -> None:
        """Raise a UserError before any work starts when the format cannot express this scheme (None: the
        weights are pruned, not quantized) or sparsity."""
        if scheme is None:
            raise UserError(
                f"--format {self.name} stores quantized weights: add --bits, or write pruned weights "
                "with --format sparse24 (2:4) or --format dense"
            )
        if scheme.act_bits not in self.activation_bits:
            raise UserError(
                f"--format {self.name} is weight-only; 8-bit activations (W8A8) are written as "
                "--format compressed-tensors (int-quantized), which vLLM runs with its own int8 kernels"
            )
        if scheme.bits not in self.supported_bits:
            raise UserError(
                f"--format {self.name} cannot store {scheme.bits}-bit weights (it stores {self.supported_bits})"
            )

    def check_linear(self, name: str, in_f: int, out_f: int, sparsity=None) -> None:
        """Raise a UserError naming the layer when this format cannot store a linear of this shape."""
        if sparsity is not None and sparsity.structured and in_f % sparsity.m:
            raise UserError(f"{name}: input size {in_f} is not a multiple of {sparsity.m} ({sparsity} sparsity)")

    def pack(self, qw, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Dict[str, torch.Tensor]:
        """qw (QuantizedWeight or SparseWeight) as this format's tensors. storage_dtype: the dtype unquantized
        values are written in (the pipeline passes the source's); formats that store only codes and fp16 scales
        ignore it."""
        raise NotImplementedError

    def config_extras(self, ignore: list, extra: dict) -> dict:
        """Top-level config.json entries besides quantization_config (the dense format records its sparsity)."""
        return {}

    def unpack(self, tensors: Dict[str, torch.Tensor], qcfg: dict) -> Union[QuantizedWeight, SparseWeight]:
        """Inverse of pack: one linear's tensors (as read, unchecked: see read) back into the in-memory result."""
        raise NotImplementedError

    def quantization_config(
        self, scheme: Optional[Scheme], ignore: list, extra: dict, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Optional[dict]:
        raise NotImplementedError

    def stored_dtype(self, qcfg: dict) -> torch.dtype:
        """The storage_dtype a checkpoint with this quantization_config was packed with (what tensor_layout needs
        to allocate its float values); only formats that store unquantized values record one."""
        return STORAGE_DTYPE

    def module_config(self, qcfg: dict, name: str) -> Optional[dict]:
        """The quantization_config that describes module `name`: the checkpoint's own, except in a format that
        stores per-module overrides (GPTQ's `dynamic`), where it is the one the overrides give that module; None
        where they leave the module unquantized. Every reader of one module's tensors goes through this."""
        return qcfg

    def record_overrides(self, qcfg: dict, overrides: dict, base: Scheme) -> dict:
        """quantization_config with per-module schemes ({full linear name: Scheme} where they differ from
        `base`) recorded in this format's own way; a format without one refuses (plan_mixed stops runs first)."""
        if not overrides:
            return qcfg
        raise UserError(f"--format {self.name} cannot record a scheme per module (mixed precision)")

    def module_scheme(self, qcfg: dict, name: str, base):
        """The scheme of module `name` under per-module overrides; `base` (the model's, already parsed) where it
        has none, or where the overrides leave it unquantized (its readers name that themselves)."""
        own = self.module_config(qcfg, name)
        return base if own is None or own is qcfg else self.scheme_from_config(own)

    def module_configs(self, qcfg: dict) -> list:
        """Every distinct quantization_config the checkpoint's quantized modules are read with (the model's own,
        then its overrides'), each without per-module rules."""
        return [qcfg]

    def module_schemes(self, qcfg: dict) -> list:
        """The scheme of each of module_configs."""
        return [self.scheme_from_config(c) for c in self.module_configs(qcfg)]

    def has_module_overrides(self, qcfg: dict) -> bool:
        """Whether modules differ in scheme (readers that assume one scheme for the whole model refuse these)."""
        return False

    @classmethod
    def claims(cls, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == cls.quant_method

    def tensor_layout(
        self, scheme: Optional[Scheme], in_features: int, out_features: int, storage_dtype: torch.dtype = STORAGE_DTYPE
    ) -> Dict[str, TensorSpec]:
        """The tensors pack writes for an out_features×in_features linear (storage_dtype: as for pack)."""
        raise NotImplementedError

    @staticmethod
    def scheme_from_config(qcfg: dict) -> Optional[Scheme]:
        raise NotImplementedError

    # The tensor an export always stores for a packed linear, and the linear's (in, out) read from its shape.
    primary = ""
    optional: tuple = ()  # layout tensors an export may leave out (GPTQ's trivial g_idx)

    def linear_shape(self, t: Dict[str, torch.Tensor], scheme) -> Tuple[int, int]:
        raise NotImplementedError

    def primary_tensor(self, qcfg: dict) -> str:
        """`primary` for this checkpoint (compressed-tensors' W8A8 stores another layout than its 4-bit)."""
        return self.primary

    def read(self, name: str, tensors: Dict[str, torch.Tensor], qcfg: dict, groups: Optional[int] = None):
        """Unpack one linear after checking its tensors against this format's own layout: a missing or extra
        tensor, a wrong shape or dtype, out-of-range zero points or groups, or non-finite scales end as one
        UserError naming the tensor, never as a KeyError deep in unpacking or as wrong numbers.
        groups: a tensor-parallel shard whose per-group tensors hold all `groups` groups of the whole linear
        (see replicated_groups)."""
        own = self.module_config(qcfg, name)
        if own is None:
            raise UserError(
                f"{name}: quantization_config leaves this module unquantized, yet the checkpoint stores it packed"
            )
        qcfg = own
        scheme = scheme_from_config(qcfg)
        primary = self.primary_tensor(qcfg)
        if primary not in tensors:
            raise UserError(
                f"{name}: tensor {name}.{primary} is missing ({self.name} stores it for every packed linear)"
            )
        try:
            in_f, out_f = self.linear_shape(tensors, scheme)
        except (IndexError, ValueError, RuntimeError, TypeError, KeyError):
            raise UserError(
                f"{name}: {name}.{primary} has an impossible shape {tuple(tensors[primary].shape)}"
            ) from None
        layout = self.tensor_layout(scheme, in_f, out_f, self.stored_dtype(qcfg))
        if groups is not None:
            layout = replicated_groups(layout, groups)
        for k, spec in layout.items():
            if k not in tensors:
                if k in self.optional:
                    continue
                raise UserError(f"{name}: tensor {name}.{k} is missing")
            t = tensors[k]
            if tuple(t.shape) != tuple(spec.shape):
                raise UserError(
                    f"{name}.{k} has shape {tuple(t.shape)}; a {out_f}×{in_f} linear in this "
                    f"{self.name} checkpoint needs {tuple(spec.shape)}"
                )
            if t.dtype.is_floating_point != spec.dtype.is_floating_point:
                raise UserError(f"{name}.{k} is {t.dtype}; {self.name} stores it as {spec.dtype}")
        extra = sorted(set(tensors) - set(layout) - {"bias"})
        if extra:
            raise UserError(f"{name}: unexpected tensor {name}.{extra[0]} for a {self.name} checkpoint")
        if "bias" in tensors and tuple(tensors["bias"].shape) != (out_f,):
            raise UserError(f"{name}.bias has shape {tuple(tensors['bias'].shape)}; the linear has {out_f} outputs")
        try:
            w = self.unpack(tensors, qcfg)
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise UserError(f"{name}: its tensors do not unpack as {self.name} ({e})") from None
        _check_values(name, w)
        return w


def replicated_groups(layout: Dict[str, TensorSpec], groups: int) -> Dict[str, TensorSpec]:
    """The layout of a row-parallel shard whose per-group tensors are not split: per-channel scales (one group
    cannot be cut) and act-order (a shard's columns belong to groups all over the input) keep every one of the
    whole linear's `groups` groups on every rank, as vLLM's own GPTQ method does; the axis is then no input axis
    (so the engine's loader copies it whole instead of narrowing it)."""
    out = {}
    for k, spec in layout.items():
        if spec.per_group and spec.input_dim is not None:
            shape = list(spec.shape)
            shape[spec.input_dim] = groups
            spec = replace(spec, shape=tuple(shape), input_dim=None)
        out[k] = spec
    return out


def shard_replicates_groups(scheme, input_size: int, input_size_per_partition: int) -> Optional[int]:
    """The whole linear's group count when a row-parallel shard must hold every group (per-channel, act-order),
    else None (no split along the input, or contiguous groups that split with the columns)."""
    if scheme is None or input_size == input_size_per_partition:
        return None
    if scheme.per_channel:
        return 1
    if scheme.act_order == "group":
        return input_size // scheme.group_size
    return None


def format_for_config(qcfg: dict) -> Format:
    if not isinstance(qcfg, dict):
        raise UserError(f"quantization_config must be a JSON object, not {type(qcfg).__name__}")
    for _name, cls in FORMATS.items():
        if cls.claims(qcfg):
            return cls()
    raise UserError(f"quantization_config with quant_method={qcfg.get('quant_method')!r} is not a format we read")


def _check_values(name: str, w) -> None:
    """What a checkpoint can hold that unpacking cannot catch: zero points outside the code range, groups
    outside the scales, scales that are not finite numbers."""
    if isinstance(w, SparseWeight):
        if not torch.isfinite(w.values).all():
            raise UserError(f"{name}: its weight values hold NaN or Inf")
        return
    G = w.scales.shape[1]
    if not torch.isfinite(w.scales).all():
        raise UserError(f"{name}: its scales hold NaN or Inf")
    if int(w.zeros.min()) < 0 or int(w.zeros.max()) > w.scheme.maxq:
        raise UserError(f"{name}: zero points outside 0..{w.scheme.maxq} for {w.scheme.bits}-bit codes")
    if w.g_idx.numel() and (int(w.g_idx.min()) < 0 or int(w.g_idx.max()) >= G):
        raise UserError(f"{name}: g_idx refers to groups outside the {G} its scales hold")


def ignored_modules(qcfg: dict) -> list:
    """Modules a checkpoint leaves unquantized, whichever key its format uses (GPTQ, AWQ, compressed-tensors)."""
    return [n for k in ("modules_not_quantized", "modules_to_not_convert", "ignore") for n in qcfg.get(k) or []]


def scheme_from_config(qcfg: dict) -> Optional[Scheme]:
    """The scheme a quantization_config describes (None: pruned, unquantized weights); a missing or malformed
    field is one UserError naming it."""
    fmt = format_for_config(qcfg)
    try:
        return fmt.scheme_from_config(qcfg)
    except KeyError as e:
        raise UserError(f"quantization_config ({fmt.name}) has no {e.args[0]!r} field") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"quantization_config ({fmt.name}) has a malformed field: {e}") from None
