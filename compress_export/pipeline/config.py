"""`CompressionConfig`: one validated, typed description of an export, shared by every entry point.

The CLI builds it from its flags (or from a recipe file, `--recipe recipe.json`, which its flags then override),
the Python API takes it (`compress(model_dir, out, config)`), Optimum-style export on load takes it
(`AutoCompressedModelForCausalLM.from_pretrained(MODEL_DIR, export=True, quantization_config=...)`), and torchrun
runs the same CLI in every rank. It is a frozen pydantic model: saved and read as JSON, its JSON schema published
(`compress-export recipe --schema`); unknown keys and bad values are one UserError naming the field. Fields left
None are decided once, by `plan.resolve` (through the `resolved_*` rules below and the model's shapes: group size
128 where it divides every layer, else 64 or 32); nothing downstream derives a default again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress_export.core.errors import UserError
from compress_export.core.scheme import ACT_ORDERS, PRESETS, SUPPORTED_BITS, Scheme
from compress_export.formats.base import FORMATS
from compress_export.passes import AWQ_SCORES, PASSES, PassOptions, default_scheme


def _choices(names):
    """json_schema_extra that lists the allowed names of an optional string field (evaluated when the schema is
    made, so the registries are read then, not at import)."""

    def extra(schema: dict) -> None:
        branches = schema.get("anyOf") or [schema]
        for b in branches:
            if b.get("type") == "string":
                b["enum"] = list(names())

    return extra


class CompressionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", title="compress-export recipe")

    method: Optional[str] = Field(
        None,
        description="the pass (rtn, gptq, awq, magnitude, wanda, sparsegpt); None: the format's own",
        json_schema_extra=_choices(PASSES.names),
    )
    format: Optional[str] = Field(
        None,
        description="gptq, awq, compressed-tensors, sparse24, dense; None: gptq "
        "(W8A8: compressed-tensors; pruning: sparse24 for N:M, else dense)",
        json_schema_extra=_choices(FORMATS.names),
    )
    scheme: Optional[str] = Field(
        None,
        description="a preset (W4A16, W8A16, W8A8, ...); the fields below override it",
        json_schema_extra=_choices(lambda: sorted(PRESETS)),
    )
    bits: Optional[int] = Field(None, description="weight bits: 2, 3, 4 or 8 (default 4)")
    group_size: Optional[int] = Field(
        None,
        description="columns per scale group; -1 per output channel; "
        "None or 0: 128 where it divides every layer, else 64 or 32",
    )
    symmetric: Optional[bool] = Field(None, description="None: asymmetric for awq, else symmetric")
    act_order: Optional[str] = Field(
        None, description="GPTQ column order", json_schema_extra=_choices(lambda: ACT_ORDERS)
    )
    sparsity: Optional[str] = Field(None, description='"2:4" or a fraction such as "0.5"; needs a pruning method')
    dataset: Optional[str] = Field(
        None, description='.txt, .jsonl, a datasets folder, "builtin" or "self"; None: "builtin"'
    )
    num_samples: int = Field(64, description="calibration samples")
    seq_len: int = Field(512, description="tokens per calibration sample")
    batch_size: Optional[int] = Field(
        None, description="calibration samples per forward; None: all at once when they fit in memory"
    )
    damp: float = Field(0.01, description="GPTQ dampening, a fraction of mean diag(H), in [0, 1)")
    clip_search: bool = Field(True, description="MSE clip search of the scales (else plain min-max)")
    awq_score: str = Field(
        "block",
        description="AWQ scale candidates scored on the block's output (block) or the linears' (linear)",
        json_schema_extra={"enum": list(AWQ_SCORES)},
    )
    seed: int = Field(0, description="calibration seed")
    smoothquant: Optional[float] = Field(
        None,
        description="W8A8: SmoothQuant's α before the weight pass; None: "
        "0.5 where it applies (W8A8 with rtn/gptq on a model with mappings), "
        "else off; 0: off",
    )
    lowrank_rank: int = Field(
        0, description="rank of the low-rank error correction (a LoRA adapter in OUT/lowrank); 0: none"
    )
    asymmetric: Optional[float] = Field(
        None,
        description="GPTAQ's asymmetric calibration for gptq/sparsegpt: α in [0, 1], how far each linear's "
        "target moves towards the original model's outputs; None: the default; 0: off",
    )
    recover: Optional[str] = Field(
        None,
        description='layer-wise distillation after the pass (training what the format holds against the '
        'original model): "kd", or "none" (None: none)',
        json_schema_extra={"enum": ["kd", "none"]},
    )
    recover_steps: Optional[int] = Field(
        None, description="training steps per decoder layer for --recover kd; None: 100"
    )
    avg_bits: Optional[float] = Field(
        None,
        description="mixed precision: the quantized linears within the size uniform weights of this many bits "
        "(e.g. 3.5) would take, each set of linears sharing an input at one of mixed_bits, chosen by measured "
        "sensitivity; None: one bit width",
    )
    size_mb: Optional[float] = Field(
        None, description="mixed precision: the export's weights within this many MB (instead of avg_bits)"
    )
    mixed_bits: Tuple[int, ...] = Field(
        (3, 4, 8), description="the bit widths mixed precision chooses from (with avg_bits or size_mb)"
    )

    @model_validator(mode="wrap")
    @classmethod
    def _one_user_error(cls, data, handler, info):
        """Every entry point gets our one-line UserError, never pydantic's report; `where` (a recipe's path, or
        quantization_config) comes in the validation context, else the class is named."""
        try:
            return handler(data)
        except ValidationError as e:
            raise UserError(one_line(e, (info.context or {}).get("where") or cls.__name__)) from None

    # -- validation (each message names its field; one_line adds where it came from) --------------------------
    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_text(cls, v):
        # 0.5 in Python or JSON means the fraction "0.5"; a Sparsity object its own spelling
        return v if v is None or isinstance(v, (str, bool)) else str(v)

    @field_validator("scheme")
    @classmethod
    def _preset(cls, v):
        if v is not None and v not in PRESETS:
            raise ValueError(f"scheme {v!r} is not a preset; choose one of {sorted(PRESETS)}")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        return _registered(PASSES, v)

    @field_validator("format")
    @classmethod
    def _format(cls, v):
        return v if v in CONTAINERS else _registered(FORMATS, v)

    @field_validator("act_order")
    @classmethod
    def _act_order(cls, v):
        if v is not None and v not in ACT_ORDERS:
            raise ValueError(f"act_order must be one of {', '.join(ACT_ORDERS)} (got {v!r})")
        return v

    @field_validator("num_samples", "seq_len")
    @classmethod
    def _at_least_one(cls, v, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be at least 1 (got {v})")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"batch_size must be at least 1 (got {v})")
        return v

    @field_validator("damp")
    @classmethod
    def _damp(cls, v):
        if not 0 <= v < 1:
            raise ValueError(f"damp must be in [0, 1) (got {v})")
        return v

    @field_validator("smoothquant")
    @classmethod
    def _alpha(cls, v):
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"smoothquant must be an α between 0 and 1 (got {v})")
        return v

    @field_validator("asymmetric")
    @classmethod
    def _asymmetric(cls, v):
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"asymmetric must be an α between 0 (off) and 1 (got {v})")
        return v

    @field_validator("recover")
    @classmethod
    def _recover(cls, v):
        if v is not None and v not in ("kd", "none"):
            raise ValueError(f"recover must be kd or none (got {v!r})")
        return v

    @field_validator("recover_steps", "lowrank_rank")
    @classmethod
    def _zero_is_off(cls, v, info):
        if v is not None and v < 0:
            what = "a positive rank" if info.field_name == "lowrank_rank" else "a number of steps"
            raise ValueError(f"{info.field_name} must be 0 (none) or {what} (got {v})")
        return v

    @field_validator("avg_bits", "size_mb")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and not v > 0:
            raise ValueError(f"{info.field_name} must be positive (got {v})")
        return v

    @field_validator("mixed_bits")
    @classmethod
    def _mixed_bits(cls, v):
        if len(set(v)) < 2 or any(b not in SUPPORTED_BITS for b in v):
            raise ValueError(f"mixed_bits must name two or more of {SUPPORTED_BITS} (got {list(v)})")
        return tuple(sorted(set(v)))

    @field_validator("awq_score")
    @classmethod
    def _awq_score(cls, v):
        if v not in AWQ_SCORES:
            raise ValueError(f"awq_score must be one of {', '.join(AWQ_SCORES)} (got {v!r})")
        return v

    # -- the rules plan.resolve applies (the only place the config's defaults are decided) ---------------------
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        if self.scheme and PRESETS[self.scheme].act_bits == 8:
            return "compressed-tensors"  # the one format that records activation quantization (int-quantized)
        if self.sparsity:
            return "sparse24" if ":" in str(self.sparsity) else "dense"
        return "gptq"

    def resolved_method(self) -> str:
        fmt = self.resolved_format()
        return self.method or ("gptq" if fmt in CONTAINERS else FORMATS.get(fmt).default_method)

    def to_scheme(self) -> Optional[Scheme]:
        """The scheme these fields describe; None for a pruning run that asked for no bits (no quantization).
        A group size of 0 stays 0 ("auto") until plan.resolve has read the model's shapes."""
        method = self.resolved_method()
        pass_cls = PASSES.get(method)
        if pass_cls.prunes and self.bits is None and self.scheme is None:
            return None
        if self.scheme:
            base = PRESETS[self.scheme]
        else:
            base = default_scheme(method)
        kw = {
            k: getattr(self, k)
            for k in ("bits", "group_size", "symmetric", "act_order")
            if getattr(self, k) is not None
        }
        return base.with_(**kw)

    def pass_options(self):
        return PassOptions(damp=self.damp, clip_search=self.clip_search, awq_score=self.awq_score)

    # -- recipes -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")  # JSON types (mixed_bits a list), as a recipe file holds them

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> CompressionConfig:
        if not isinstance(d, dict):
            raise UserError(f"{where}: want a JSON object of compression settings")
        return cls.model_validate(d, context={"where": where})

    def save(self, path) -> Path:
        """Write the recipe atomically (never half a file, never through a link at its name)."""
        from compress_export.io.safety import write_text_atomic

        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> CompressionConfig:
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

    @classmethod
    def json_schema(cls) -> dict:
        """The published schema of a recipe file (`compress-export recipe --schema`)."""
        return cls.model_json_schema()

    def with_(self, **kw) -> CompressionConfig:
        """A copy with the given fields replaced, validated again; None values leave the field as it is (unset
        CLI flags)."""
        return type(self)(**{**self.model_dump(), **{k: v for k, v in kw.items() if v is not None}})

    @classmethod
    def from_scheme(cls, scheme: Optional[Scheme], **kw) -> CompressionConfig:
        """From a Scheme object (the older Python API) plus other fields."""
        if scheme is not None:
            kw.update(
                bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric, act_order=scheme.act_order
            )
            if scheme.act_bits == 8:
                kw.setdefault("scheme", "W8A8")
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_settings(
        cls,
        method=None,
        fmt=None,
        scheme: Optional[Scheme] = None,
        options: Optional[PassOptions] = None,
        sparsity=None,
        **rest,
    ) -> CompressionConfig:
        """The older keyword spelling of compress() (method=, fmt=, scheme=Scheme(...), options=PassOptions(...),
        sparsity=, dataset=, ...) as a config: a translation only, every default is still the config's."""
        opts = options or PassOptions()
        return cls.from_scheme(
            scheme,
            method=method,
            format=fmt,
            sparsity=None if sparsity is None else str(sparsity),
            damp=opts.damp,
            clip_search=opts.clip_search,
            awq_score=rest.pop("awq_score", opts.awq_score),
            **rest,
        )


# Output files that are not a checkpoint format: the pass's result is packed by a format (CONTAINERS[name]) and
# then repacked as one file of another kind (pipeline/convert.py): "gguf" for llama.cpp.
CONTAINERS = {"gguf": "compressed-tensors"}


def _registered(registry, name):
    """`name` when the registry has it; else the registry's own message (unknown pass 'x'; choose one of ...)."""
    if name is not None:
        try:
            registry.get(name)
        except UserError as e:
            raise ValueError(str(e)) from None
    return name


def one_line(e: ValidationError, where: str) -> str:
    """pydantic's report as our one line: unknown keys listed with the valid ones, else each bad field named with
    what is wrong and the value given."""
    errors = e.errors()
    unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden" and err["loc"])
    if unknown:
        known = sorted(CompressionConfig.model_fields)
        return f"{where}: unknown setting(s) {unknown}; valid ones are {known}"
    parts = []
    for err in errors:
        field = ".".join(str(x) for x in err["loc"]) or "?"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":  # pydantic's own wording: show the value it refused
            shown = repr(err.get("input"))
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        parts.append(f"field '{field}': {msg}")
    return f"{where}: " + "; ".join(parts)
