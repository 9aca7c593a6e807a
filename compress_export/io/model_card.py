"""The model card (README.md) every export carries: what it was made from and how, what was measured on it, how
to serve and load it. It opens with Hugging Face's card metadata header (YAML between `---` lines), so the folder
uploads to the hub as it is; the source's own card, when it had one, is kept below ours.

The card is written from the export's config.json alone (its quantization_config names the pass, the scheme and
the calibration; `compress_export` extras name the source), so `convert` and `eval --card` rebuild the same card.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from compress_export._version import __version__
from compress_export.core.errors import UserError
from compress_export.formats.base import scheme_from_config
from compress_export.io import safety

MARK = "<!-- compress-export model card -->"
SOURCE_HEADING = "## The source model's card"
FIGURES_BEGIN, FIGURES_END = "<!-- figures -->", "<!-- /figures -->"
# the source card's metadata that still holds for the export (what it is licensed under, what it speaks)
KEPT_METADATA = ("license", "license_name", "license_link", "language")
MAX_SOURCE_CARD = 1 << 20
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def config_sha256(path: Path) -> str:
    """The source's config.json hash: names exactly which model (and revision of its config) was compressed."""
    path = Path(path)
    safety.check_entry(path, safety.allowed_roots(path.parent), path.parent)  # a hub snapshot's link, inside its cache
    with safety.open_regular(path.resolve()) as f:
        return hashlib.sha256(f.read(safety.MAX_JSON_BYTES)).hexdigest()


def source_facts(src: Path, cfg: dict) -> dict:
    """What an export records about its source in quantization_config's compress_export extras."""
    name = cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or ""
    return {
        "source_model": name if isinstance(name, str) and HUB_ID.match(name) else Path(src).name,
        "source_config_sha256": config_sha256(Path(src) / "config.json"),
    }


def _split_front_matter(text: str):
    """(metadata header text, body) of a card; a card without a header has an empty one."""
    if not text.startswith("---\n"):
        return "", text
    end = text.find("\n---", 4)
    if end < 0:
        return "", text
    return text[4:end], text[end + 4 :].lstrip("\n")


def kept_metadata(card: str) -> dict:
    """KEPT_METADATA of a card's header (the source's, or ours, which carries them on): parsed as YAML by a safe
    loader and kept only as plain strings or lists of strings, re-emitted by us. A stranger's header cannot add
    keys to ours or break its syntax."""
    import yaml

    head, _ = _split_front_matter(card)
    try:
        meta = yaml.safe_load(head) if head else None
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict):
        return {}
    out = {}
    for k in KEPT_METADATA:
        v = meta.get(k)
        if isinstance(v, str) and v:
            out[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            out[k] = v
    return out


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _scheme_line(q: dict) -> str:
    if not q.get("bits"):
        return "unquantized values (pruned only)"
    g = q.get("group_size")
    group = "one scale per output channel" if g == -1 else f"groups of {g}"
    sym = "symmetric" if q.get("symmetric", True) else "asymmetric (zero points)"
    act = "int8 activations (W8A8)" if q.get("act_bits") == 8 else "16-bit activations"
    order = f", act-order {q['act_order']}" if q.get("act_order") not in (None, "none") else ""
    return f"{q['bits']}-bit weights, {group}, {sym}{order}, {act}"


def card_facts(cfg: dict) -> dict:
    """What the card states, from an export's config.json (any format we write)."""
    qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    extras = dict((qc or {}).get("compress_export") or cfg.get("compress_export_sparsity") or {})
    fmt = (qc or {}).get("quant_method") or ("dense" if "compress_export_sparsity" in cfg else "?")
    if qc is not None and isinstance(qc.get("format"), str):  # compressed-tensors names its packing
        fmt = f"{fmt} ({qc['format']})"
    scheme = scheme_from_config(qc) if qc is not None else None
    return {"extras": extras, "format": fmt, "scheme": asdict(scheme) if scheme is not None else {}}


def card_text(
    cfg: dict,
    out_name: str,
    figures: Optional[list] = None,
    source_card: str = "",
    gguf: Optional[str] = None,
    meta_src: Optional[dict] = None,
) -> str:
    """source_card: the source's card body; meta_src: its KEPT_METADATA (kept_metadata); gguf: what the GGUF file
    holds (a GGUF folder's card: its format and how to run it)."""
    facts = card_facts(cfg)
    if gguf:
        facts["format"] = f"gguf ({gguf})"
    x, meta_src = facts["extras"], meta_src or {}
    _, source_card = _split_front_matter(source_card)
    method = x.get("method", "?")
    tags = ["compress-export", method, facts["format"].split(" ")[0]]
    if gguf:
        tags.append("gguf")
    if facts["scheme"].get("bits"):
        tags.append(f"{facts['scheme']['bits']}-bit")
    if x.get("sparsity"):
        tags.append("sparse")
    head = ["---", f"library_name: {'gguf' if gguf else 'transformers'}", "pipeline_tag: text-generation"]
    src = str(x.get("source_model") or "")
    if HUB_ID.match(src):
        head += [f"base_model: {_yaml_str(src)}", "base_model_relation: quantized"]
    head.append("tags:")
    head += [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    for k, v in meta_src.items():
        head += [f"{k}: {_yaml_str(v)}"] if isinstance(v, str) else [f"{k}:", *(f"- {_yaml_str(i)}" for i in v)]
    head.append("---")
    rows = [
        ("source model", f"`{src or '?'}` (config.json sha256 `{x.get('source_config_sha256', '?')}`)"),
        ("pass", _pass_line(x)),
        ("format", facts["format"]),
        ("scheme", _scheme_line(facts["scheme"])),
        ("calibration", str(x.get("calibration", "?"))),
    ]
    mixed = x.get("mixed_precision")
    if isinstance(mixed, dict):  # the base scheme above is what the modules without an override use
        budget = f"{mixed.get('avg_bits')} average bits" if mixed.get("avg_bits") else f"{mixed.get('size_mb')} MB"
        bits = "/".join(str(b) for b in mixed.get("bits") or [])
        rows.append(("mixed precision", f"{budget}, each set of linears at {bits} bits by measured sensitivity"))
    if x.get("converted_from"):
        rows.append(("converted from", f"a {x['converted_from']} export (the same numbers, repacked)"))
    lines = [*head, MARK, f"# {out_name}", "", f"A compressed checkpoint written by compress-export {__version__}.", ""]
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    none_yet = GGUF_NO_FIGURES if gguf else NO_FIGURES
    lines += ["## Measured", "", FIGURES_BEGIN, *_figure_lines(figures or [], none_yet), FIGURES_END, ""]
    lines += (GGUF_USAGE if gguf else USAGE).format(name=out_name, file=(gguf or "").rpartition(" ")[2]).splitlines()
    if source_card.strip():
        lines += ["", SOURCE_HEADING, "", source_card.strip()]
    return "\n".join(lines) + "\n"


def _pass_line(x: dict) -> str:
    keys = ("sparsity", "recover", "lowrank_rank", "smoothquant")
    opts = ", ".join(f"{k} {x[k]}" for k in keys if x.get(k) not in (None, 0, "", False))
    return f"{x.get('method', '?')}" + (f" ({opts})" if opts else "")


USAGE = """## Use it

```bash
vllm serve {name}                  # wherever vLLM has the kernels (GPU); with compress-export installed, its plugin
compress-export serve {name}       # vLLM with settings that work on this machine (CPU included), on 127.0.0.1
compress-export eval {name} --text FILE     # perplexity with compress-export's loader
```

```python
from compress_export import AutoCompressedModelForCausalLM
model = AutoCompressedModelForCausalLM.from_pretrained("{name}")
```"""


GGUF_USAGE = """## Use it

```bash
llama-cli -m {name}/{file} -p "The capital of France is"    # llama.cpp
llama-perplexity -m {name}/{file} -f TEXT
```"""


NO_FIGURES = "No figures yet: `compress-export eval OUT --text FILE --card` records them here."
GGUF_NO_FIGURES = "No figures recorded: llama.cpp's `llama-perplexity` measures the file as it is."


def _figure_lines(figures: list, none_yet: str = NO_FIGURES) -> list:
    if not figures:
        return [none_yet]
    out = ["| what | text | value | how |", "|---|---|---|---|"]
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")  # a table cell holds no column break
    return out + ["| " + " | ".join(cell(f[k]) for k in ("what", "text", "value", "how")) + " |" for f in figures]


def read_figures(card: str) -> list:
    """The figures table of a card we wrote (empty for any other)."""
    if MARK not in card or FIGURES_BEGIN not in card:
        return []
    block = card.split(FIGURES_BEGIN, 1)[1].split(FIGURES_END, 1)[0]
    rows = []
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            rows.append(dict(zip(("what", "text", "value", "how"), cells)))
    return rows


def source_card_of(existing: str) -> str:
    """The source's card kept inside a card (ours: the part after SOURCE_HEADING; anyone else's: all of it)."""
    if MARK not in existing:
        return existing
    return existing.split(SOURCE_HEADING, 1)[1] if SOURCE_HEADING in existing else ""


def write_card(folder: Path, cfg: dict, out_name: str, gguf: Optional[str] = None) -> None:
    """README.md in an export being assembled (`folder`, still private): ours, with the card copied there from the
    source (or the export converted) kept below it, and the figures an earlier card recorded."""
    path = Path(folder) / "README.md"
    existing = ""
    if path.is_file():  # a copy we made of the source's card; a card past MAX_SOURCE_CARD is cut, not kept whole
        with open(path, "rb") as f:
            existing = f.read(MAX_SOURCE_CARD).decode("utf-8", errors="replace")
    figures = [] if gguf else read_figures(existing)  # a GGUF file is other numbers than the export measured
    text = card_text(cfg, out_name, figures, source_card_of(existing), gguf, kept_metadata(existing))
    path.write_text(text, encoding="utf-8")


def check_card_target(export) -> Path:
    """`export` when it is a folder compress-export wrote (checked before any measuring starts)."""
    export = Path(export)
    if not safety.is_our_output(export):
        raise UserError(f"--card: {export} is not an export written by compress-export; its README.md is left alone")
    return export


def record_figure(export: Path, figure: dict) -> Path:
    """Add (or replace: the same what and text) one measured figure in an export's card, atomically. Only in a
    folder compress-export wrote: a card goes nowhere it was not asked to."""
    export = check_card_target(export)
    cfg = safety.read_json(export / "config.json")
    path = export / "README.md"
    existing = ""
    if path.exists():
        with safety.open_regular(path) as f:
            existing = f.read(MAX_SOURCE_CARD).decode("utf-8", errors="replace")
    figures = [f for f in read_figures(existing) if (f["what"], f["text"]) != (figure["what"], figure["text"])]
    text = card_text(cfg, export.name, figures + [figure], source_card_of(existing), meta_src=kept_metadata(existing))
    safety.write_text_atomic(path, text)
    return path
