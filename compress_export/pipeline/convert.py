"""Repack an export into another format: the same QuantizedWeights, differently packed (no requantization).

Formats only pack and unpack, so any export converts to any format that can express its scheme; what cannot
be expressed (3-bit into AWQ GEMM, a zero point of 0 into GPTQ v1) is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compress_export.core.errors import UserError
from compress_export.io.export_check import check_export
from compress_export.io.loading import read_export
from compress_export.io.lowrank import ADAPTER_DIR
from compress_export.io.safety import allowed_roots, check_output, copy_tree
from compress_export.io.writer import CheckpointWriter


def convert(src, fmt: str, out_dir: Optional[str] = None, overwrite: bool = False) -> Path:
    from compress_export.formats.base import FORMATS, format_for_config, ignored_modules

    # what eval refuses, convert refuses too, before anything is read or written; lenient: convert builds no
    # model, so an architecture only vLLM or remote code knows is converted with its linears' own layouts checked
    info = check_export(src, lenient=True)
    src = info.path
    out = Path(out_dir) if out_dir else src.parent / f"{src.name}-{fmt}"
    check_output(out, [src], overwrite)  # before read_export reads every tensor: a bad -o fails at once
    cfg, qweights, rest = read_export(info)  # NaN or Inf in any tensor is refused here
    source_fmt = format_for_config(cfg["quantization_config"])
    target = FORMATS.get(fmt)()
    scheme = source_fmt.scheme_from_config(cfg["quantization_config"])
    target.check(scheme)
    for name, qw in qweights.items():
        if int(qw.zeros.min()) < target.min_zero:
            raise UserError(
                f"{name}: zero point {int(qw.zeros.min())} cannot be stored by --format {fmt} "
                f"(smallest it stores: {target.min_zero}); compress again with --format {fmt}"
            )
        if not qw.has_trivial_g_idx() and scheme.act_order != "group":
            raise UserError(f"{name}: regrouped columns (g_idx) cannot be stored by --format {fmt}")
    extra = dict(cfg["quantization_config"].get("compress_export") or {}, converted_from=source_fmt.name)
    ignore = ignored_modules(cfg["quantization_config"])
    writer = CheckpointWriter(out)
    try:
        for name, qw in qweights.items():
            for suffix, t in target.pack(qw).items():
                writer.add(f"{name}.{suffix}", t)
        for name, t in rest.items():
            writer.add(name, t)
        new_cfg = dict(cfg)
        new_cfg["quantization_config"] = target.quantization_config(scheme, ignore, extra)
        if (src / ADAPTER_DIR).is_dir():  # the low-rank correction is the same numbers in every format
            # content only; links may reach where the export's own may (a hub-cache snapshot's blobs)
            copy_tree(src / ADAPTER_DIR, writer.tmp / ADAPTER_DIR, allowed_roots(src))
        return writer.finish(new_cfg, src, overwrite)
    except BaseException:
        writer.abort()
        raise
