"""The one pipeline the CLI, the Python API and torchrun (distributed.py) drive.

resolve the config into a Plan (plan.py) → validate everything → load → calibration ids → layer by layer: stats
forward, compress, pack, propagate → write atomically. Passes never see hooks; formats never see the model; the
plan's modifiers (modifiers/base.py) are called at their hooks, and the pipeline knows nothing about any one of them.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from compress_export.core import hardware
from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index
from compress_export.core.progress import Progress
from compress_export.core.scheme import Scheme
from compress_export.core.structure import describe
from compress_export.io import model_io
from compress_export.io.model_card import source_facts
from compress_export.io.source import open_source
from compress_export.io.writer import CheckpointWriter, dir_weight_bytes
from compress_export.modifiers.base import RunContext
from compress_export.passes.sequential import (
    CompressOnFirstCall,
    InputGroups,
    capture_states,
    probe_groups,
    run_layer,
)
from compress_export.pipeline.config import CompressionConfig
from compress_export.pipeline.distributed import Dist, join
from compress_export.pipeline.layer_compressor import LayerCompressor
from compress_export.pipeline.plan import Plan, resolve

log = logging.getLogger(__name__)


@dataclass
class Summary:
    output: str
    method: str
    format: str
    scheme: Optional[dict]
    decoder_layers: int
    linears: int
    calibration: str
    seconds: float
    peak_rss_mb: float
    size_before_mb: float
    size_after_mb: float
    timings: dict = field(default_factory=dict)
    sparsity: str = ""
    kept_dense: list = field(default_factory=list)  # targeted linears calibration never reached, written as-is
    unrouted: list = field(default_factory=list)  # MoE expert linears no calibration token reached (round-to-nearest)
    fused_dense: list = field(default_factory=list)  # fused expert tensors (not nn.Linear), written as-is
    streamed: bool = False  # read one decoder layer at a time from the shards (else the whole model in memory)
    device: str = "cpu"
    ranks: int = 1  # processes that shared the calibration (torchrun)
    lowrank_rank: int = 0  # rank of the low-rank correction written as a LoRA adapter in OUT/lowrank (0: none)
    smoothquant: Optional[float] = None  # SmoothQuant's α when it ran (W8A8), else None
    recover: str = ""  # the layer-wise distillation's steps and mean loss before → after, when it ran
    asymmetric: str = ""  # asymmetric calibration's α and how many linears it fitted, when it ran
    mixed: list = field(default_factory=list)  # mixed precision's allocation table (lines), when it ran

    def lines(self):
        what = " ".join(
            x
            for x in (f"sparsity {self.sparsity}" if self.sparsity else "", str(self.scheme) if self.scheme else "")
            if x
        )
        return [
            f"wrote {self.output}",
            f"  {self.method} → {self.format} {what}"
            + (f"; SmoothQuant α = {self.smoothquant}" if self.smoothquant is not None else ""),
            f"  {self.linears} linears in {self.decoder_layers} decoder layers; calibration: {self.calibration}",
            *(
                [
                    f"  {len(self.unrouted)} MoE expert linear(s) got no calibration tokens and were compressed "
                    f"without data ({'magnitude pruning' if self.sparsity else 'round to nearest'}) at the same "
                    "scheme: "
                    f"{', '.join(self.unrouted[:4])}{' ...' if len(self.unrouted) > 4 else ''}"
                ]
                if self.unrouted
                else []
            ),
            *(
                [f"  kept unquantized (never reached by calibration): {', '.join(self.kept_dense)}"]
                if self.kept_dense
                else []
            ),
            *(
                [
                    f"  kept unquantized (fused MoE expert tensors, not supported yet): {len(self.fused_dense)}, e.g. "
                    f"{self.fused_dense[0]}"
                ]
                if self.fused_dense
                else []
            ),
            f"  {self.seconds:.1f} s on {self.device}{f' × {self.ranks} ranks' if self.ranks > 1 else ''}, "
            f"peak RSS {self.peak_rss_mb:.0f} MB "
            f"({'streamed layer by layer' if self.streamed else 'whole model in memory'})",
            f"  size {self.size_before_mb:.1f} MB → {self.size_after_mb:.1f} MB "
            f"({self.size_before_mb / max(self.size_after_mb, 1e-9):.2f}× smaller)",
            *(
                [
                    f"  low-rank correction: rank {self.lowrank_rank}, a LoRA adapter in {self.output}/lowrank "
                    f"(compress-export serve enables it; vLLM requests name the model 'corr')"
                ]
                if self.lowrank_rank
                else []
            ),
            *([f"  asymmetric calibration (GPTAQ): {self.asymmetric}"] if self.asymmetric else []),
            *([f"  recovery: {self.recover}"] if self.recover else []),
            *(f"  {line}" for line in self.mixed),
        ]


def check_shapes(layout, scheme: Optional[Scheme], fmt, sparsity=None) -> None:
    """Group size must divide every compressed layer's input size; packing needs whole words."""
    from compress_export.formats.packing import period

    bad, sizes = {}, set()
    for i, lin in enumerate(layout.linears):
        for name, m in lin:
            sizes.add(m.in_features)
            fmt.check_linear(layout.full_name(i, name), m.in_features, m.out_features, sparsity)
            if scheme is None:
                continue
            if not scheme.divides(m.in_features):
                bad.setdefault((name, m.in_features), []).append(i)
            p = period(scheme.bits)
            if m.in_features % p or m.out_features % p:
                raise UserError(
                    f"{layout.full_name(i, name)} [{m.out_features}×{m.in_features}] cannot be packed "
                    f"at {scheme.bits} bits: both sizes must be multiples of {p}"
                )
    if bad:
        which = ", ".join(f"{n} (in={k})" for n, k in sorted(bad))
        ok = [g for g in (32, 64, 128, 256) if all(s % g == 0 for s in sizes)]
        raise UserError(
            f"--group-size {scheme.group_size} does not divide the input size of {which}; "
            f"group sizes that fit every layer: {', '.join(map(str, ok)) or 'none'} (or -1)"
        )


def compress(
    model_dir,
    out_dir=None,
    config: Optional[CompressionConfig] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    on_result=None,
    device: str = "auto",
    stream: Optional[bool] = None,
    **settings,
) -> Summary:
    """Compress MODEL_DIR into OUT as `config` describes (the CLI, the Python API and export-on-load all call
    this). Keyword settings are the older spelling of the same (method=, fmt=, scheme=Scheme(...), options=,
    dataset=, num_samples=, seq_len=, batch_size=, seed=, sparsity=) and are turned into a CompressionConfig.
    on_result(name, result): called with each linear's in-memory result (QuantizedWeight or SparseWeight, bias
    set, on the CPU) before its format packs it.
    device: where each layer's statistics and sweeps run (auto, cpu, cuda, cuda:N); the layer moves there and back.
    stream: None (default) reads one decoder layer at a time from the shards when the checkpoint allows it, so
    memory does not grow with depth; False loads the whole model; True insists on streaming.
    Under torchrun (or inside an initialised torch.distributed group) the ranks share the calibration and the
    sweeps, and rank 0 writes (distributed.py)."""
    if settings:
        if config is not None:
            raise TypeError("compress() takes a CompressionConfig or keyword settings, not both")
        config = CompressionConfig.from_settings(**settings)
    t0 = time.time()
    plan = resolve(config, model_dir, out_dir, overwrite=overwrite, device=device)
    if plan.container == "gguf":
        run = dict(progress=progress, trust_remote_code=trust_remote_code, on_result=on_result, device=device)
        return _compress_to_gguf(plan, model_dir, stream=stream, **run)
    src, out, format_, the_pass, calib = plan.src, plan.out, plan.format, plan.the_pass, plan.calibration
    dev, skeleton, layout, index = preflight(plan, trust_remote_code)
    dist, dev = join(dev)  # torchrun (or the caller's process group): this rank's place; else a run of one
    try:
        if plan.mixed is not None and dist.active:
            raise UserError("mixed precision (--avg-bits/--size-mb) runs in one process, not under torchrun (yet)")
        # only text the model writes itself needs the whole model (calibration loads it then, even when streaming)
        source = open_source(
            src,
            skeleton,
            index,
            stream,
            needs_model_forward=calib.needed and calib.dataset == "self",
            trust_remote_code=trust_remote_code,
        )
        if source.model is not skeleton:  # loaded whole: the same structure, other module objects
            layout = describe(source.model, str(src))
        if source.streamed:  # so that peak memory stays that of one layer however deep the model (see there)
            hardware.fix_mmap_threshold()
        timings = {"load": time.time() - t0}
        unrouted: list = []
        ids, calib_desc = _calibration(source, calib, progress and dist.main, timings, dist, trust_remote_code)
        table = _choose_mixed(plan, source, layout, ids, dev, dist, index, progress and dist.main, timings)
        if not (the_pass.needs_calibration or any(m.needs_calibration for m in plan.modifiers)):
            ids = None  # loaded only for mixed precision's measuring: a data-free pass runs without the states
        ctx = RunContext(src=src, layout=layout, dist=dist, storage_dtype=model_io.source_dtype(src))
        writer = CheckpointWriter(out) if dist.main else None  # rank 0 writes; the others only compute
        try:
            compressed = _run_layers(
                source,
                layout,
                the_pass,
                format_,
                writer,
                ids,
                calib.batch_size,
                progress and dist.main,
                timings,
                on_result,
                dev,
                dist,
                plan.modifiers,
                ctx,
                unrouted,
            )
            kept_dense = sorted(
                {layout.full_name(i, n) for i, lin in enumerate(layout.linears) for n, _ in lin} - compressed
            )
            if writer is not None:
                _finish(writer, source, plan, layout, compressed, kept_dense, calib_desc, ctx, trust_remote_code)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        dist.barrier()  # every rank returns once the checkpoint is in place
    finally:
        dist.close()
    scheme = the_pass.scheme
    return Summary(
        output=str(out),
        streamed=source.streamed,
        device=str(dev),
        method=the_pass.name,
        format=format_.name,
        scheme=asdict(scheme) if scheme else None,
        ranks=dist.world,
        **plan.summary_fields(),
        sparsity=str(the_pass.sparsity or ""),
        decoder_layers=len(layout.layers),
        linears=len(compressed),
        calibration=calib_desc,
        seconds=time.time() - t0,
        kept_dense=kept_dense,
        unrouted=unrouted,
        fused_dense=layout.fused_dense,
        peak_rss_mb=hardware.peak_rss_mb(),
        size_before_mb=dir_weight_bytes(src) / 1e6,
        size_after_mb=dir_weight_bytes(out) / 1e6,
        timings=timings,
        mixed=table,
    )


def _calibration(source, calib, progress: bool, timings: dict, dist, trust_remote_code: bool = False):
    """(ids [samples, seq_len], description) of the calibration set, or (None, ...) when nothing needs one (RTN
    without SmoothQuant). Rank 0 makes it (text the model writes is slow) and every rank receives the same ids.
    The description names the source: a path, the built-in text (the default) or the model itself."""
    if not calib.needed:
        return None, "none (RTN)"
    from compress_export.io.calibration import calibration_set

    t = time.time()
    made = None
    if dist.main:
        # a streamed source's weights are on the meta device: the whole model is loaded only if it must write
        # text, under the same trust as everything else (never more than the user gave)
        def load_whole():
            return model_io.load_source_model(source.src, trust_remote_code=trust_remote_code)[0]

        bar = []

        def writing(done, total):  # a progress bar only while the model writes (reading text is instant)
            if not bar:
                bar.append(Progress(total, "calibration text written by the model", enabled=progress))
            bar[0].update(done)

        made = calibration_set(
            load_whole if source.streamed else source.model,
            source.tokenizer,
            calib.dataset,
            calib.num_samples,
            calib.seq_len,
            calib.seed,
            progress=writing,
        )
    made = dist.broadcast_object(made)
    vocab = getattr(getattr(source.model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and made[0].numel() and int(made[0].max()) >= vocab:  # else an IndexError later
        raise UserError(
            f"{source.src}: its tokenizer gives token id {int(made[0].max())}, beyond the model's "
            f"vocab_size {vocab} in config.json; the tokenizer does not belong to this model"
        )
    timings["calibration_data"] = time.time() - t
    return made


def _finish(
    writer,
    source,
    plan: Plan,
    layout,
    compressed: set,
    kept_dense: list,
    calib_desc: str,
    ctx,
    trust_remote_code: bool = False,
) -> None:
    """The tensors outside the decoder layers, config.json with the format's quantization_config, and the
    atomic rename into place. Without --trust-remote-code the model ran on transformers' own classes, so the
    export describes it that way: the folder's code (auto_map and its .py files) is not carried over. Each
    modifier adds its files to the folder being assembled and its extras to quantization_config, in plan order."""
    src, the_pass, format_ = plan.src, plan.the_pass, plan.format
    if kept_dense:  # never dropped: written as they are, listed as unquantized, reported
        log.warning(
            "%d targeted linear(s) never ran during calibration (e.g. MoE experts no token was routed "
            "to) and are kept unquantized: %s",
            len(kept_dense),
            ", ".join(kept_dense[:6]),
        )
    if layout.fused_dense:
        log.warning(
            "%d fused MoE expert tensor(s) are not nn.Linear layers and stay unquantized (e.g. %s)",
            len(layout.fused_dense),
            layout.fused_dense[0],
        )
    dtype = model_io.source_dtype(src)
    for name, t in source.outer_tensors(layout.layers_path):
        writer.add(name, t.to(dtype) if t.is_floating_point() else t)
    ignore = [n for n, m in source.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in compressed]
    # matrices in the layers that no nn.Linear holds (MoE routers, transformers' TopKRouter): engines build these as
    # linear layers, so they are named as unquantized too, or vLLM would expect them packed
    ignore += [
        n
        for n, m in source.model.named_modules()
        if n.startswith(layout.layers_path + ".")
        and not isinstance(m, torch.nn.Linear)
        and isinstance(m._parameters.get("weight"), torch.Tensor)
        and m._parameters["weight"].dim() == 2
    ]
    # fused expert modules stay dense: named in ignore too, so engines that read it leave them unquantized
    ignore += sorted({n.rpartition(".")[0] for n in layout.fused_dense})
    extra = {"method": the_pass.name, "calibration": calib_desc, **asdict(the_pass.options)}
    if the_pass.name != "awq":
        extra.pop("awq_score")
    if the_pass.sparsity is not None:
        extra["sparsity"] = str(the_pass.sparsity)
    for m in plan.modifiers:
        m.at_export(ctx, writer.tmp, extra)
    cfg = model_io.read_config(src)
    extra.update(source_facts(src, cfg))  # the model card names the source by them (and convert keeps them)
    if not trust_remote_code:
        cfg.pop("auto_map", None)
    if plan.mixed is not None:  # the recipe of the allocation; the choice itself is in the overrides
        extra["mixed_precision"] = {"avg_bits": plan.mixed.avg_bits, "size_mb": plan.mixed.size_mb}
        extra["mixed_precision"]["bits"] = list(plan.mixed.bits)
    qc = format_.quantization_config(the_pass.scheme, ignore, extra, dtype)
    if qc is not None:
        cfg["quantization_config"] = format_.record_overrides(qc, the_pass.overrides, the_pass.scheme)
    cfg.update(format_.config_extras(ignore, extra))
    writer.finish(cfg, src, plan.overwrite, code=trust_remote_code)


def _compress_to_gguf(plan: Plan, model_dir, **run) -> Summary:
    """--format gguf: the pass's result written by the container's format into a private folder beside OUT (our
    owner mark in it, so a killed run's leftovers are cleaned like any partial output), then repacked as one GGUF
    file into OUT (pipeline/convert.py), which appears only when complete."""
    import shutil

    from compress_export.io.writer import new_partial
    from compress_export.pipeline.config import CONTAINERS
    from compress_export.pipeline.convert import convert_gguf
    from compress_export.pipeline.distributed import launched_world_size

    if launched_world_size() > 1:  # each rank would assemble its own intermediate export
        raise UserError("--format gguf runs in one process: compress under torchrun, then `convert OUT --format gguf`")
    out = plan.out
    work = new_partial(out)
    try:
        inner = plan.config.model_copy(
            update={"format": CONTAINERS["gguf"], "group_size": plan.scheme.group_size if plan.scheme else None}
        )
        summary = compress(model_dir, work / out.name, inner, overwrite=False, **run)
        convert_gguf(work / out.name, out, plan.overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.output, summary.format = str(out), "gguf"
    summary.size_after_mb = sum(f.stat().st_size for f in out.glob("*.gguf")) / 1e6
    return summary


def preflight(plan: Plan, trust_remote_code: bool = False):
    """Everything config.json, the safetensors headers and the model's structure (built on the meta device, no
    weights) can tell, checked before any weight is read and reported together: the device, the dataset, group
    size and packing against every layer, the pass and the modifiers against the architecture, the disk space
    (everything else was checked when the plan was resolved). Returns (torch
    device, the weightless model, its layout, the checkpoint's tensor index)."""
    from compress_export.core.hardware import resolve_device
    from compress_export.io.calibration import check_calibration_size, check_dataset
    from compress_export.io.source import build_skeleton, check_tensors

    src, out, the_pass, format_, calib = plan.src, plan.out, plan.the_pass, plan.format, plan.calibration
    problems = []
    dev = _collect(problems, resolve_device, plan.device)
    if calib.dataset:  # checked whenever given (a modifier may calibrate a pass that needs no statistics)
        _collect(problems, check_dataset, calib.dataset)
    skeleton = build_skeleton(src, trust_remote_code)
    index = model_io.tensor_index(src)
    _collect(problems, check_tensors, src, skeleton, index)
    layout = _collect(problems, describe, skeleton, str(src))
    if layout is not None:
        # mixed precision: every candidate width must pack every linear (any may be chosen)
        widths = plan.mixed.bits if plan.mixed is not None else (None,)
        largest = the_pass.scheme if plan.mixed is None else the_pass.scheme.with_(bits=widths[-1])
        for b in widths:
            scheme = the_pass.scheme if b is None else the_pass.scheme.with_(bits=b)
            _collect(problems, check_shapes, layout, scheme, format_, the_pass.sparsity)
        _collect(problems, the_pass.check_layout, layout, getattr(skeleton.config, "model_type", ""))
        if calib.needed:
            _collect(
                problems,
                check_calibration_size,
                calib.num_samples,
                calib.seq_len,
                calib.batch_size,
                skeleton.config,
                dev,
            )
        for m in plan.modifiers:
            _collect(problems, m.check, layout)
        if plan.mixed is not None:
            from compress_export.pipeline.mixed import check_layout
            from compress_export.pipeline.sensitivity import check_spool_room, spool_bytes

            _collect(problems, check_layout, layout, skeleton)
            hidden = int(getattr(getattr(skeleton.config, "text_config", None) or skeleton.config, "hidden_size", 0))
            tokens = calib.num_samples * calib.seq_len
            _collect(problems, check_spool_room, out.parent, spool_bytes(len(layout.layers), tokens, hidden))
        _collect(problems, check_disk_space, out, index, layout, largest, the_pass.sparsity)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems with this run (no weight was read):\n  - " + "\n  - ".join(problems))
    return dev, skeleton, layout, index


def _collect(problems: list, check, *args):
    try:
        return check(*args)
    except UserError as e:
        problems.append(str(e))
        return None


def estimate_output_bytes(index: dict, layout, scheme, sparsity) -> int:
    """The export's size from the headers alone (`index`: model_io.tensor_index): targeted linears at `bits`
    (plus ~fp16 scale and zero per group), 2:4 values halved, everything else as it is on disk."""
    targeted = {layout.full_name(i, n) + ".weight" for i, lin in enumerate(layout.linears) for n, _ in lin}
    total = 0
    for name, (_, dtype, shape) in index.items():
        numel = math.prod(shape)
        per = model_io.SAFETENSORS_DTYPES.get(dtype, 4)
        if name in targeted:
            keep = 0.5 if sparsity is not None and getattr(sparsity, "structured", False) else 1.0
            if scheme is None:
                per = per * keep + (0.125 if keep < 1 else 0)
            else:
                gs = shape[-1] if scheme.group_size in (-1, 0) else scheme.group_size
                per = scheme.bits / 8 * keep + 3 / gs + (0.125 if keep < 1 else 0)
        total += int(numel * per)
    return total


def check_disk_space(out: Path, index: dict, layout, scheme, sparsity) -> None:
    """The export (plus one shard being assembled) must fit on the output's file system."""
    from compress_export.io.writer import DEFAULT_SHARD_BYTES, free_space

    need = estimate_output_bytes(index, layout, scheme, sparsity)
    need += min(need, DEFAULT_SHARD_BYTES)
    where, free = free_space(out)
    if free < need:
        raise UserError(
            f"{where} has {free / 1e9:.2f} GB free; this export needs about {need / 1e9:.2f} GB "
            "while it is written: free space or choose another -o"
        )


def auto_batch_size(model, ids) -> int:
    """Whole set in one batch (one forward per layer) when its activations fit the budget, else chunks."""
    from compress_export.io.calibration import auto_batch

    cfg = model.config
    width = max(getattr(cfg, "intermediate_size", 0) or 0, getattr(cfg, "hidden_size", 0) or 0, 1)
    return auto_batch(ids.shape[0], ids.shape[1], width)


@torch.no_grad()
def _run_layers(
    source,
    layout,
    the_pass,
    format_,
    writer,
    ids,
    batch_size,
    progress,
    timings,
    on_result=None,
    device=torch.device("cpu"),
    dist=Dist(),
    modifiers=(),
    ctx=None,
    unrouted: Optional[list] = None,
) -> set:
    """Each decoder layer in turn: read it, move it to `device`, let the modifiers prepare it (before_layer:
    SmoothQuant), compress its linears, write it, drop it. writer None: a distributed rank other than 0, which
    computes its share and writes nothing. unrouted: gets the full names of the MoE expert linears no calibration
    token reached (compressed by the pass's data-free fallback)."""
    t = time.time()
    states, single = None, False
    if ids is not None:
        batch_size = batch_size or auto_batch_size(source.model, ids)  # from config.json alone
        # decided on the whole set, so that any number of ranks runs the same algorithm; except that MoE experts
        # under torchrun take two passes, where ranks agree on the groups before any statistics are merged (a rank
        # whose samples reach no token of an expert never calls it)
        experts = dist.active and any(expert_index(n) >= 0 for lin in layout.linears for n, _ in lin)
        single = ids.shape[0] <= batch_size and not the_pass.layer_wise and not experts
        states = capture_states(source, layout, dist.samples(ids), batch_size, device)
    timings["capture"] = time.time() - t
    bar = Progress(len(layout.layers), "compressing decoder layers", enabled=progress)
    done, t0, turns = set(), time.time(), itertools.count()
    for m in modifiers:
        m.before_pass(ctx)
    dtype = model_io.source_dtype(source.src)  # float values are written in the source's dtype
    for i in range(len(layout.layers)):
        layer = source.load_layer(layout, i).to(device)
        compress = LayerCompressor(
            layout, i, the_pass, format_, writer, done, on_result, dist, turns, modifiers, ctx, dtype
        )
        for m in modifiers:
            m.before_layer(ctx, i, layer, states)
        inputs = states
        if states is None or not the_pass.needs_calibration:  # RTN: no statistics (after a modifier: propagate)
            compress([([n], None) for n, _ in layout.linears[i]])
            states = states and [(run_layer(layer, h, kw), kw) for h, kw in states]
        elif single:
            states = _single_pass(layer, layout.linears[i], states[0], the_pass, compress, dist)
        else:
            states = _two_pass(layer, layout, i, states, the_pass, compress, dist)
        if the_pass.needs_calibration and states is not None:  # (the two-pass path did it before propagating)
            compress.unseen()
            (unrouted if unrouted is not None else []).extend(layout.full_name(i, n) for n in compress.unrouted)
        refined = [m.refine_layer(ctx, i, layer, compress.results) for m in modifiers]  # a list: every one runs
        if any(refined):  # the layer changed after calibration: propagate the states through what is written
            states = [(run_layer(layer, h, kw), kw) for h, kw in inputs]
        compress.flush()
        for local, t in layer.state_dict().items() if writer is not None else ():
            name = layout.full_name(i, local)  # norms, buffers, linears calibration never reached
            owner, _, what = name.rpartition(".")
            if not (owner in done and what in ("weight", "bias")):  # packed linears were written above
                writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        for m in modifiers:
            m.after_layer(ctx, i, layer)
        source.release_layer(layout, i)
        bar.update(i + 1, " ".join([f"({len(done)} linears)", *filter(None, (m.layer_note() for m in modifiers))]))
    timings["layers"] = time.time() - t0
    if unrouted:
        log.warning(
            "%d MoE expert linear(s) got no calibration tokens and were compressed without data (%s) at the same "
            "scheme, e.g. %s; more calibration samples route tokens to more experts",
            len(unrouted),
            the_pass.unseen_method,
            unrouted[0],
        )
    return done


def _choose_mixed(plan: Plan, source, layout, ids, dev, dist, index, progress, timings) -> list:
    """Mixed precision: each linear set's bits, measured and allocated before the pass (pipeline/mixed.py), set
    on the pass as its overrides; returns the allocation table (also logged). [] when the plan has no budget."""
    from compress_export.pipeline import mixed

    if plan.mixed is None:
        return []
    t = time.time()
    the_pass, calib = plan.the_pass, plan.calibration
    batch = calib.batch_size or auto_batch_size(source.model, ids)
    spool = plan.out.parent  # beside the output: the system's temporary directory may be a small RAM disk
    spool.mkdir(parents=True, exist_ok=True)
    entries = mixed.measure(source, layout, plan.format, the_pass.scheme, plan.mixed, ids, batch, dev, progress, spool)
    chosen, limit = mixed.choose(entries, plan.mixed, index, the_pass.scheme)
    the_pass.overrides = {n: s for n, s in chosen.items() if s != the_pass.scheme}
    table = mixed.allocation_table(entries, chosen, plan.mixed, limit)
    for line in table:
        log.info("%s", line)
    timings["mixed"] = time.time() - t
    return table


def _single_pass(layer, linears, state, the_pass, compress, dist):
    """One forward: each group is compressed when first called, on every calibration token at once."""
    hidden, kw = state
    groups = probe_groups(layer, linears, hidden, kw)

    def on_group(names, x):
        stats = the_pass.make_stats(x.shape[-1])
        stats.add(x)
        dist.merge_stats(stats)
        compress([(names, stats)])

    hooks = CompressOnFirstCall(dict(linears), groups, on_group)
    try:
        out = run_layer(layer, hidden, kw)
    finally:
        hooks.remove()
    return [(out, kw)]


def _two_pass(layer, layout, i, states, the_pass, compress, dist):
    """Chunked calibration set: a statistics forward over all chunks, compress, then a propagation forward."""
    groups = InputGroups(layout.linears[i], the_pass.make_stats)
    observers = the_pass.observe_layer(layer)
    try:
        for hidden, kw in states:
            run_layer(layer, hidden, kw)
            groups.next_batch()
    finally:
        groups.remove()
        for h in observers:
            h.remove()
    where = layout.full_name(i, "")[:-1]
    members, stats = dist.all_groups(groups.members, groups.stats, dict(layout.linears[i]), the_pass.make_stats, where)
    for st in stats:
        dist.merge_stats(st)
    the_pass.prepare_layer(
        layer,
        members,
        stats,
        layout.full_name(i, ""),  # same on every rank
        sum_over_ranks=dist.sum_ if dist.active else None,
    )
    compress(list(zip(members, stats)))
    # experts no token reached are compressed before the propagation forward, whose routing (after attention is
    # compressed) may reach them: the next layer must see the outputs the exported model gives
    compress.unseen()
    return [(run_layer(layer, h, kw), kw) for h, kw in states]
