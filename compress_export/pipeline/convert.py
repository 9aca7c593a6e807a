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
from compress_export.io.writer import CheckpointWriter, commit, new_partial


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
    if source_fmt.has_module_overrides(cfg["quantization_config"]):
        raise UserError(
            f"{src}: its modules differ in scheme (per-module overrides); convert writes one scheme for the whole "
            "model: compress the original model again with --format " + fmt
        )
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


def convert_gguf(src, out_dir: Optional[str] = None, overwrite: bool = False, embeddings: str = "q8_0") -> Path:
    """An export as a folder holding one GGUF file (`model-Q4_0.gguf`, …) and its model card; the folder is
    assembled privately and renamed into place only when the file is complete."""
    import os
    import shutil

    from compress_export.formats.gguf import block_type
    from compress_export.io.gguf_file import check_architecture, write_gguf
    from compress_export.io.model_card import write_card
    from compress_export.io.safety import GGUF_MARK, check_output, write_mark

    info = check_export(src, lenient=True)
    src = info.path
    out = Path(out_dir) if out_dir else src.parent / f"{src.name}-gguf"
    check_output(out, [src], overwrite)
    # what config.json and the headers tell, before any tensor is read: the architecture, the block type
    check_architecture(info.config)
    _, why = block_type(info.scheme)
    if why:
        raise UserError(f"{src}: {why}")
    if (src / ADAPTER_DIR).is_dir():
        raise UserError(
            f"{src} has a low-rank correction ({ADAPTER_DIR}/) that a GGUF file cannot carry; "
            "convert an export made without --lowrank-rank"
        )
    cfg, qweights, rest = read_export(info)
    rest = {k: v for k, v in rest.items() if k not in info.ignored}  # an old rotary_emb.inv_freq: no GGUF tensor
    tmp = new_partial(out)
    try:
        _copy_source_card(src, tmp)
        part = tmp / "model.gguf.part"
        res = write_gguf(part, cfg, qweights, rest, src, embeddings)
        os.rename(part, tmp / f"model-{res['type']}.gguf")
        qc = dict(cfg.get("quantization_config") or {})
        qc["compress_export"] = dict(qc.get("compress_export") or {}, converted_from=qc.get("quant_method"))
        write_card(tmp, dict(cfg, quantization_config=qc), out.name, gguf=f"{res['type']} in model-{res['type']}.gguf")
        write_mark(tmp / GGUF_MARK, f"{res['type']}\n")
        commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for w in res["warnings"]:
        import logging

        logging.getLogger("compress_export").warning("%s: %s", out, w)
    return out


def _copy_source_card(src: Path, tmp: Path) -> None:
    """The source's card as README.md in `tmp`, where write_card keeps its source part under the new card: copied
    by content through the safe-path boundary (a hub-cache snapshot's link is followed inside its cache only)."""
    from compress_export.io.safety import check_entry, copy_file

    card = src / "README.md"
    if card.is_file():
        check_entry(card, allowed_roots(src), src)
        copy_file(card, tmp / "README.md")
