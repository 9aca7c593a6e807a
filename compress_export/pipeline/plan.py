"""The Plan: a CompressionConfig resolved once, against the model folder, into everything a run does.

`resolve(config, model_dir, out_dir, ...)` is the one place where the config's open fields become decisions: the
format and the pass (config.resolved_*), the scheme (its group size chosen against config.json's sizes, act order
dropped where the pass has none), the modifiers (SmoothQuant with its α, the low-rank correction with its rank),
the calibration, the device and the output path. It checks everything that needs neither weights nor the model's
structure; compress() then checks the structure (preflight) and runs the Plan. Nothing downstream derives a default
again: compress(), preflight and the summary read the Plan.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity
from compress_export.formats.base import FORMATS
from compress_export.io import model_io, safety
from compress_export.modifiers.base import Modifier, PlanContext, plan_modifiers
from compress_export.passes import PASSES, PassOptions
from compress_export.pipeline.config import CONTAINERS, CompressionConfig
from compress_export.pipeline.mixed import MixedBudget, plan_mixed

log = logging.getLogger(__name__)

AUTO_GROUPS = (128, 64, 32)


@dataclass(frozen=True)
class Calibration:
    """The calibration set: `needed` when the pass or a modifier runs on calibration activations (else RTN runs
    without one). dataset None is the built-in text (io/calibration.py)."""

    needed: bool
    dataset: Optional[str]
    num_samples: int
    seq_len: int
    batch_size: Optional[int]  # None: all at once when they fit (auto_batch_size)
    seed: int


@dataclass(frozen=True)
class Plan:
    config: CompressionConfig  # what was asked (recorded in --save-recipe)
    src: Path
    out: Path
    overwrite: bool
    format: object  # the Format instance (formats/base.py)
    the_pass: object  # the Pass instance, holding the resolved scheme, options and sparsity
    modifiers: Tuple[Modifier, ...]
    calibration: Calibration
    device: str  # as asked (auto, cpu, cuda, cuda:N); preflight checks it against the machine
    model_type: str
    container: Optional[str] = None  # "gguf": the format's checkpoint is repacked as one GGUF file at the end
    mixed: Optional[MixedBudget] = None  # mixed precision's candidates and budget (pipeline/mixed.py)

    @property
    def scheme(self) -> Optional[Scheme]:
        return self.the_pass.scheme

    @property
    def method(self) -> str:
        return self.the_pass.name

    @property
    def sparsity(self):
        return self.the_pass.sparsity

    def summary_fields(self) -> dict:
        """The Summary's fields the modifiers fill (smoothquant, lowrank_rank)."""
        out: dict = {}
        for m in self.modifiers:
            out.update(m.summary())
        return out


def resolve(
    config: Optional[CompressionConfig], model_dir, out_dir=None, *, overwrite: bool = False, device: str = "auto"
) -> Plan:
    """The run `config` describes on MODEL_DIR, every default decided: paths, method × format, scheme, sparsity,
    modifiers and calibration, checked before any work starts (a UserError naming the flag otherwise)."""
    config = config or CompressionConfig()
    src = model_io.check_model_dir(model_dir)
    model_io.check_not_quantized(src)
    cfg = model_io.read_config(src)
    method, fmt = config.resolved_method(), config.resolved_format()
    sp = Sparsity.parse(config.sparsity) if config.sparsity else None
    container = fmt if fmt in CONTAINERS else None
    format_ = FORMATS.get(CONTAINERS.get(fmt, fmt))()
    pass_cls = PASSES.get(method)
    if pass_cls.prunes != (sp is not None):
        raise UserError(
            f"--method {method} needs --sparsity (2:4 or a fraction)"
            if pass_cls.prunes
            else f"--sparsity needs a pruning method (--method magnitude, wanda or sparsegpt), not {method}"
        )
    scheme = config.to_scheme()
    if scheme is not None and not pass_cls.uses_act_order:
        scheme = scheme.with_(act_order="none")
    format_.check(scheme, sp)
    if container == "gguf":
        scheme = check_gguf(config, scheme, cfg, src)
    if scheme is not None:
        scheme = resolve_group_size(scheme, cfg)
    mixed = plan_mixed(config, format_, method, scheme, sp, container)
    out = Path(out_dir) if out_dir else default_output(src, method, fmt, scheme, sp, mixed)
    safety.check_output(out, [src], overwrite)
    opts = config.pass_options()
    if scheme is not None and not scheme.symmetric:
        opts = PassOptions(**{**asdict(opts), "min_zero": max(opts.min_zero, format_.min_zero)})
    the_pass = pass_cls(scheme, opts, sp)
    model_type = cfg.get("model_type") or ""
    modifiers = plan_modifiers(config, PlanContext(scheme=the_pass.scheme, method=method, model_type=model_type))
    if any(m.needs_rounding_offsets for m in modifiers):
        the_pass.options = replace(the_pass.options, record_offsets=True)
    # mixed precision measures each linear's sensitivity on the calibration set, even for a data-free pass
    needed = the_pass.needs_calibration or mixed is not None or any(m.needs_calibration for m in modifiers)
    calibration = Calibration(
        needed, config.dataset, config.num_samples, config.seq_len, config.batch_size, config.seed
    )
    return Plan(
        config=config,
        src=src,
        out=out,
        overwrite=overwrite,
        format=format_,
        the_pass=the_pass,
        modifiers=modifiers,
        calibration=calibration,
        device=device,
        model_type=model_type,
        container=container,
        mixed=mixed,
    )


def check_gguf(config: CompressionConfig, scheme, cfg: dict, src: Path):
    """--format gguf: the scheme a GGUF block type holds (group size auto → 32, its block), the architecture and
    the tokenizer llama.cpp reads, checked before any weight is read."""
    from compress_export.formats.gguf import BLOCK, block_type
    from compress_export.io.gguf_file import check_architecture, check_tokenizer

    if scheme is not None and scheme.group_size == 0:
        scheme = scheme.with_(group_size=BLOCK)
    _, why = block_type(scheme)
    if why:
        raise UserError(f"--format gguf: {why}")
    if config.lowrank_rank:
        raise UserError("--format gguf: a GGUF file cannot carry the low-rank correction; drop --lowrank-rank")
    check_architecture(cfg)
    check_tokenizer(src)
    return scheme


def default_output(model_dir: Path, method: str, fmt: str, scheme: Optional[Scheme], sparsity=None, mixed=None) -> Path:
    tag = method + (f"-sp{str(sparsity).replace(':', 'of')}" if sparsity else "")
    if scheme is not None:
        g = "pc" if scheme.per_channel else f"g{scheme.group_size}"
        w = (f"{mixed.avg_bits:g}" if mixed.avg_bits else f"{mixed.size_mb:g}mb") if mixed else scheme.bits
        tag += f"-w{w}{g}" + ("a8" if scheme.act_bits == 8 else "") + ("" if scheme.symmetric else "-asym")
    return Path.cwd() / f"{model_dir.resolve().name}-{fmt}-{tag}"


def resolve_group_size(scheme: Scheme, cfg: dict) -> Scheme:
    """group_size 0 (auto): the largest of 128/64/32 dividing every linear input size named in config.json."""
    if scheme.group_size != 0:
        return scheme
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    sizes = {cfg.get("hidden_size"), cfg.get("intermediate_size"), heads * head_dim} - {None, 0}
    for g in AUTO_GROUPS:
        if all(s % g == 0 for s in sizes):
            if g != AUTO_GROUPS[0]:
                log.warning(
                    "group size %d chosen: %d does not divide the layer sizes %s", g, AUTO_GROUPS[0], sorted(sizes)
                )
            return scheme.with_(group_size=g)
    log.warning("no group size of %s divides %s; using per-channel scales", AUTO_GROUPS, sorted(sizes))
    return scheme.with_(group_size=-1)
