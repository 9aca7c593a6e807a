"""`CompressionConfig`: one typed description of an export, shared by every entry point.

The CLI builds it from its flags (or from a recipe file, `--recipe recipe.json`, which its flags then override),
the Python API takes it (`compress(model_dir, out, config)`), and Optimum-style export on load takes it
(`AutoCompressedModelForCausalLM.from_pretrained(MODEL_DIR, export=True, quantization_config=...)`). Saved and read
as JSON; unknown keys are an error naming the valid ones. Fields left None take the pipeline's defaults (which
depend on the method and the model: group size 128 where it divides every layer, else 64 or 32).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

from compress_export.core.errors import UserError
from compress_export.formats.base import FORMATS
from compress_export.passes import AWQ_SCORES, PASSES, PassOptions, default_scheme
from compress_export.core.scheme import PRESETS, Scheme


@dataclass(frozen=True)
class CompressionConfig:
    method: Optional[str] = None  # the pass (rtn, gptq, awq, magnitude, wanda, sparsegpt); None: the format's own
    format: Optional[str] = None  # gptq, awq, compressed-tensors, sparse24, dense; None: gptq (pruning: see below)
    scheme: Optional[str] = None  # a preset (W4A16, W8A16, ...); the fields below override it
    bits: Optional[int] = None
    group_size: Optional[int] = None
    symmetric: Optional[bool] = None
    act_order: Optional[str] = None
    sparsity: Optional[str] = None  # "2:4" or a fraction such as "0.5"; needs a pruning method
    dataset: Optional[str] = None  # .txt, .jsonl, a datasets folder, "builtin" or "self"; None: "builtin"
    num_samples: int = 64
    seq_len: int = 512
    batch_size: Optional[int] = None
    damp: float = 0.01
    clip_search: bool = True
    awq_score: str = "block"  # AWQ scale candidates scored on the block's output ("block") or the linears' ("linear")
    seed: int = 0
    smoothquant: Optional[float] = None  # W8A8: SmoothQuant's α before the weight pass; None: 0.5 where it applies
    # (W8A8 with RTN/GPTQ on a model with mappings), else off; 0: off
    lowrank_rank: int = 0  # rank of the low-rank error correction (a LoRA adapter in OUT/lowrank); 0: none

    def __post_init__(self):
        if self.scheme is not None and self.scheme not in PRESETS:
            raise UserError(f"scheme {self.scheme!r} is not a preset; choose one of {sorted(PRESETS)}")
        for name in ("num_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1 (got {self.batch_size})")
        if not 0 <= self.damp < 1:
            raise UserError(f"damp must be in [0, 1) (got {self.damp})")
        if self.smoothquant is not None and not 0 <= self.smoothquant <= 1:
            raise UserError(f"smoothquant must be an α between 0 and 1 (got {self.smoothquant})")
        if self.lowrank_rank < 0:
            raise UserError(f"lowrank_rank must be 0 (none) or a positive rank (got {self.lowrank_rank})")
        if self.awq_score not in AWQ_SCORES:
            raise UserError(f"awq_score must be one of {', '.join(AWQ_SCORES)} (got {self.awq_score!r})")

    # -- what the pipeline needs -------------------------------------------------------------------------------
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        if self.scheme and PRESETS[self.scheme].act_bits == 8:
            return "compressed-tensors"  # the one format that records activation quantization (int-quantized)
        if self.sparsity:
            return "sparse24" if ":" in str(self.sparsity) else "dense"
        return "gptq"

    def resolved_method(self) -> str:
        return self.method or FORMATS.get(self.resolved_format()).default_method

    def to_scheme(self) -> Optional[Scheme]:
        """The scheme these fields describe; None for a pruning run that asked for no bits (no quantization).
        A group size of 0 stays 0 ("auto") until the pipeline has read the model's shapes."""
        method = self.resolved_method()
        pass_cls = PASSES.get(method)
        if pass_cls.prunes and self.bits is None and self.scheme is None:
            return None
        if self.scheme:
            base = PRESETS[self.scheme]
        else:
            base = default_scheme(method)
        kw = {k: getattr(self, k) for k in ("bits", "group_size", "symmetric", "act_order")
              if getattr(self, k) is not None}
        return base.with_(**kw)

    def pass_options(self):
        return PassOptions(damp=self.damp, clip_search=self.clip_search, awq_score=self.awq_score)

    # -- recipes -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "CompressionConfig":
        if not isinstance(d, dict):
            raise UserError(f"{where}: want a JSON object of compression settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{where}: unknown setting(s) {unknown}; valid ones are {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from None

    def save(self, path) -> Path:
        """Write the recipe atomically (never half a file, never through a link at its name)."""
        from compress_export.io.safety import write_text_atomic

        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "CompressionConfig":
        from compress_export.io.safety import read_json, regular_file

        path = Path(path)
        try:
            d = read_json(regular_file(path, "--recipe"), f"--recipe {path}")
        except OSError as e:
            raise UserError(f"--recipe {path}: cannot read it ({e.strerror or e})") from None
        return cls.from_dict(d, where=f"--recipe {path}")

    @classmethod
    def is_recipe(cls, path) -> bool:
        """Whether `path` holds a recipe (what save writes): --save-recipe --overwrite replaces nothing else."""
        try:
            cls.load(path)
        except (UserError, OSError):
            return False
        return True

    def with_(self, **kw) -> "CompressionConfig":
        """A copy with the given fields replaced; None values leave the field as it is (unset CLI flags)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_scheme(cls, scheme: Optional[Scheme], **kw) -> "CompressionConfig":
        """From a Scheme object (the older Python API) plus other fields."""
        if scheme is not None:
            kw.update(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric,
                      act_order=scheme.act_order)
            if scheme.act_bits == 8:
                kw.setdefault("scheme", "W8A8")
        return cls(**{k: v for k, v in kw.items() if v is not None})
