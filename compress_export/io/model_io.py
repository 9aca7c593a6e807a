"""Reading a source model directory safely: safetensors only, no remote code unless asked, never written to."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress_export.core.errors import UserError
from compress_export.core.moe import unfuse_experts
from compress_export.io import safety

PICKLE_SUFFIXES = safety.PICKLE_SUFFIXES


def check_model_dir(path, what: str = "MODEL_DIR") -> Path:
    """A model folder or export, checked before anything reads it: every entry a regular file or folder inside it
    (safety.scan_folder), config.json a JSON object, safetensors weights (never pickles) whose headers match the
    files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a directory (give a Hugging Face model directory)")
    safety.scan_folder(p, what)
    safety.check_file_references(p)
    cfg = p / "config.json"
    if not cfg.exists():
        raise UserError(f"{p} is not a model directory: it has no config.json")
    if not isinstance(safety.read_json(cfg), dict):
        raise UserError(f"{cfg} is not a JSON object of model settings")
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(
                f"{p} holds only pickle weights ({', '.join(pickles[:3])}); pickles are never loaded: "
                "convert them to safetensors first (e.g. with transformers' save_pretrained("
                "safe_serialization=True) on a machine where you trust them)"
            )
        raise UserError(f"{p} has no *.safetensors weights")
    check_safetensors(p)
    return p


# The dtypes our pipeline computes with. safetensors also knows U16/U32/U64, F8_*, F4 and F6_*: torch computes
# with them poorly or not at all, and nothing here writes them (writer._ST_DTYPES), so they are refused.
SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_MAX_HEADER = 100_000_000  # safetensors' own MAX_HEADER_SIZE (under 100 MiB): a larger header never opens
_ST_MAX_ELEMENTS = 1 << 48  # more elements than any real tensor; also keeps safetensors' and torch's size
#                             arithmetic (u64 products, int64 strides) clear of overflow for empty tensors
_ST_KEYS = ("data_offsets", "dtype", "shape")


class _StDuplicate(ValueError):
    """A JSON object naming one key twice: Python keeps the last, other readers may keep another."""


def _st_clean(s, n: int = 120) -> str:
    """A string from a stranger's file, safe to put on one line of a message."""
    s = str(s)
    s = s if s.isprintable() else repr(s)[1:-1]
    return s if len(s) <= n else s[: n - 3] + "..."


def _st_show(v) -> str:
    """A JSON value for a message: scalars as written, containers by kind (never printed whole: they can be huge
    or nested too deep to print)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return _st_clean(json.dumps(v) if not isinstance(v, int) or abs(v) < 10**30 else "a huge number", 60)
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__


def _st_utf8(s: str) -> bool:
    """JSON escapes can spell lone surrogates, which Python keeps and safetensors' reader refuses."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _st_object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _StDuplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _st_constant(name):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; safetensors' reader does not


def _st_int(text: str) -> int:
    if text == "-0":  # Python reads -0 as the int 0, safetensors' reader as the float -0.0 (and refuses it)
        raise ValueError("-0 is not a size")
    return int(text)


def _st_read_header(f: Path, bad):
    """(the parsed header, the size of the data region) of f, opened as a regular file only (a FIFO would hang)."""
    try:
        with safety.open_regular(f.resolve()) as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"only {size} bytes, too short for a safetensors header")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise bad(f"its header claims {n} bytes but the file has {size}")
            if n > _ST_MAX_HEADER:
                raise bad(f"its header claims {n} bytes, more than the {_ST_MAX_HEADER} safetensors allows")
            raw = fh.read(n)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on Python < 3.13
        raise UserError(
            f"{_st_clean(f, 200)}: cannot be read ({_st_clean(e)}); check the file and its permissions"
        ) from None
    if len(raw) < n:
        raise bad(f"it shrank to {8 + len(raw)} bytes while being read")
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_st_object, parse_constant=_st_constant, parse_int=_st_int
        )
    except _StDuplicate as e:
        raise bad(f"its header names {_st_clean(e)} twice") from None
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError) as e:  # deep nesting: RecursionError
        raise bad(f"its header is not valid UTF-8 JSON ({_st_clean(type(e).__name__ + ': ' + str(e), 200)})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is {_st_show(header)}, not a JSON object")
    return header, size - 8 - n


def _st_check_metadata(meta, bad) -> None:
    if not isinstance(meta, dict):
        raise bad(f"its __metadata__ is {_st_show(meta)}, not an object of strings")
    for k, v in meta.items():
        if not isinstance(v, str) or not _st_utf8(k) or not _st_utf8(v):
            raise bad(f"its __metadata__ entry {_st_clean(k, 60)} is {_st_show(v)}, not a UTF-8 string")


def _st_numel(shape, shown: str, bad) -> int:
    """The element count of a checked shape: a list of ints >= 0, refused before its product grows absurd."""
    if not isinstance(shape, list):
        raise bad(f"tensor {shown}: shape is {_st_show(shape)}, not a list of sizes")
    span = 1  # the product of the non-zero sizes, stopped as soon as it is absurd
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise bad(f"tensor {shown}: shape has the size {_st_show(d)}, not an integer >= 0")
        span *= d or 1
        if span > _ST_MAX_ELEMENTS:
            raise bad(f"tensor {shown}: its shape has more than {_ST_MAX_ELEMENTS} elements")
    return 0 if 0 in shape else span


def _st_offsets(offsets, shown: str, bad) -> tuple:
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(not isinstance(v, int) or isinstance(v, bool) for v in offsets)
    ):
        raise bad(f"tensor {shown}: data_offsets is {_st_show(offsets)}, not a list of two integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise bad(f"tensor {shown}: data_offsets [{_st_show(start)}, {_st_show(end)}] is not a range 0 <= start <= end")
    return start, end


def _st_check_entry(f: Path, name, info, data: int, bad) -> tuple:
    """(start, end, name) of one tensor entry, checked completely."""
    shown = _st_clean(name)
    if not name or not _st_utf8(name):
        raise bad(f"a tensor has the name '{shown}', not a non-empty UTF-8 string")
    if not isinstance(info, dict):
        raise bad(f"tensor {shown}: its entry is {_st_show(info)}, not an object of dtype, shape and data_offsets")
    if tuple(sorted(info)) != _ST_KEYS:
        keys = ", ".join(_st_clean(k, 30) for k in sorted(info)[:6])
        raise bad(f"tensor {shown}: its entry has the keys [{keys}], not exactly dtype, shape and data_offsets")
    dtype = info["dtype"]
    if not isinstance(dtype, str):
        raise bad(f"tensor {shown}: dtype is {_st_show(dtype)}, not a dtype name")
    if dtype not in SAFETENSORS_DTYPES:
        raise UserError(
            f"{f}: unsupported dtype {_st_clean(dtype, 30)} in tensor {shown}; compress-export computes "
            f"only with {', '.join(SAFETENSORS_DTYPES)}: convert the checkpoint to BF16, F16 or F32 first"
        )
    numel = _st_numel(info["shape"], shown, bad)
    start, end = _st_offsets(info["data_offsets"], shown, bad)
    if end > data:
        raise bad(f"tensor {shown} ends at byte {end} of the data but the file holds only {data}")
    need = numel * SAFETENSORS_DTYPES[dtype]
    if end - start != need:
        raise bad(
            f"tensor {shown}: shape {_st_clean(info['shape'], 60)} of {dtype} needs {need} bytes, "
            f"its range {start}..{end} holds {end - start}"
        )
    return start, end, shown


def _st_check_layout(ranges: list, data: int, bad) -> None:
    """The tensors' byte ranges tile the data region exactly, as safetensors' reader insists: no overlap, no two
    non-empty tensors on the same bytes, no hole, nothing after the last tensor (empty ones may share a start)."""
    pos, last = 0, None
    for start, end, shown in sorted(ranges):
        if start < pos:
            how = "share" if (start, end) == last[:2] else "overlap in"
            raise bad(
                f"tensors {last[2]} and {shown} {how} the bytes {max(start, last[0])}..{pos} of the data; "
                "each tensor needs bytes of its own"
            )
        if start > pos:
            raise bad(f"bytes {pos}..{start} of the data belong to no tensor (before tensor {shown})")
        pos, last = end, (start, end, shown)
    if pos != data:
        raise bad(f"bytes {pos}..{data} at the end of the data belong to no tensor")


def safetensors_header(f: Path) -> dict:
    """A safetensors file's header, checked completely against the file itself before any tensor is read: a sane
    length, a JSON object, string metadata, each entry exactly dtype/shape/data_offsets with a supported dtype, its
    byte range matching its shape, and the ranges tiling the data (a truncated download, an interrupted copy or a
    hostile header fails here with one UserError naming the file, the tensor and what is wrong)."""
    f = Path(f)

    def bad(why):
        return UserError(f"{_st_clean(f, 200)}: {why}; the file is damaged or incomplete: write or download it again")

    header, data = _st_read_header(f, bad)
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            _st_check_metadata(info, bad)
        else:
            ranges.append(_st_check_entry(f, name, info, data, bad))
    _st_check_layout(ranges, data, bad)
    return header


def _st_owners(p: Path) -> dict:
    """{tensor name: (file, its header entry)} over every shard of p, each header checked; a tensor in two shards
    is refused (which copy a reader takes is arbitrary)."""
    owners = {}
    for f in sorted(Path(p).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            if name in owners:
                raise UserError(
                    f"{_st_clean(p, 200)}: tensor {_st_clean(name)} is in both "
                    f"{_st_clean(owners[name][0].name)} and {_st_clean(f.name)}; a checkpoint must hold "
                    "each tensor once"
                )
            owners[name] = (f, info)
    return owners


def _st_index_map(index: Path) -> dict:
    """The weight_map of a shard index, {tensor: plain *.safetensors file name}, checked."""

    def bad(why):
        return UserError(f"{_st_clean(index, 200)} is not a valid shard index: {why}; download the checkpoint again")

    try:
        doc = safety.read_json(index)
    except OSError as e:
        raise UserError(f"{_st_clean(index, 200)}: cannot be read ({_st_clean(e)}); check its permissions") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict):
        raise bad(f"its weight_map is {_st_show(wmap)}, not an object of tensor names to file names")
    for name, fname in wmap.items():
        if not isinstance(fname, str):
            raise bad(f"tensor {_st_clean(name)} maps to {_st_show(fname)}, not a file name")
        if "/" in fname or "\\" in fname or ".." in fname or "\0" in fname or not fname.endswith(".safetensors"):
            raise bad(f"tensor {_st_clean(name)} maps to '{_st_clean(fname)}', not a plain *.safetensors file name")
    return wmap


def check_safetensors(p: Path) -> None:
    """Every safetensors file of a model directory, headers against sizes, and the shard index against the files:
    each file it names present, each tensor it names in the header of that file."""
    p = Path(p)
    index = p / "model.safetensors.index.json"
    wmap = _st_index_map(index) if index.exists() else {}
    missing = sorted({f for f in wmap.values() if not (p / f).is_file()})
    if missing:
        raise UserError(
            f"{_st_clean(index, 200)} lists {_st_clean(', '.join(missing[:3]))}, missing from "
            f"{_st_clean(p, 200)}; the download is incomplete"
        )
    owners = _st_owners(p)
    for name, fname in wmap.items():
        if name not in owners or owners[name][0].name != fname:
            where = f"it is in {_st_clean(owners[name][0].name)}" if name in owners else "no shard holds it"
            raise UserError(
                f"{_st_clean(index, 200)} places tensor {_st_clean(name)} in {_st_clean(fname)} but "
                f"{where}; the index does not match the shards: download the checkpoint again"
            )


def read_config(path) -> dict:
    cfg = safety.read_json(Path(path) / "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{Path(path) / 'config.json'} is not a JSON object of model settings")
    return cfg


def check_not_quantized(p: Path) -> None:
    qc = read_config(p).get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise UserError(f"{p} is already quantized ({method}); compress the unquantized model instead")


def tensor_index(p: Path) -> dict:
    """{tensor name: (the safetensors file holding it, dtype tag, shape)}, from the checked headers alone; a tensor
    in two shards is refused."""
    return {name: (f, info["dtype"], tuple(info["shape"])) for name, (f, info) in _st_owners(p).items()}


def load_source_model(path, dtype=torch.float32, trust_remote_code: bool = False):
    """Load an unquantized HF causal LM and its tokenizer for compression (fp32 compute on CPU). A weight the
    checkpoint lacks is an error: transformers would initialise it randomly, and random numbers must never reach
    an export."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    check_not_quantized(p)
    safety.check_remote_code(p, trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (a stranger's config can break transformers in any way: one line)
        raise UserError(f"{p}: transformers cannot load this model ({type(e).__name__}: {_first_line(e)})") from None
    tied = {n for n in info.get("missing_keys", ()) if _tied_name(model, n)}
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    bad = missing + [str(k) for k in info.get("mismatched_keys", ())]
    if bad:
        raise UserError(
            f"{p}: the checkpoint lacks {len(bad)} weight(s) the model needs (e.g. {', '.join(bad[:3])}); "
            "transformers would fill them with random numbers: download the checkpoint again"
        )
    unfuse_experts(model, tensor_index(p))  # per-expert linears (core/moe.py): what passes compress, engines read
    model.eval()
    return model, load_tokenizer(p, trust_remote_code)


def _tied_name(model, name: str) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight and name.endswith("lm_head.weight")


def load_tokenizer(p: Path, trust_remote_code: bool = False):
    """The folder's tokenizer; the folder was scanned and its remote code checked by the caller."""
    from transformers import AutoTokenizer

    safety.check_remote_code(p, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exception on a bad tokenizer.json)
        raise UserError(f"{p}: transformers cannot read its tokenizer ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def check_finite(model, where: str) -> None:
    for name, t in model.state_dict().items():
        check_tensor_finite(t, name, where)


def check_tensor_finite(t: torch.Tensor, name: str, where) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise UserError(f"{where}: tensor {name} has NaN or Inf values; fix the checkpoint first")


FLOAT_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}


def source_dtype(path) -> torch.dtype:
    """The dtype the source's float tensors are stored in, from config.json (float32 when it names none). Any other
    name is refused: a non-float dtype would turn every stored float tensor of the export into wrong numbers."""
    cfg = read_config(path)
    key = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"
    name = cfg.get(key)
    if name is None or name == "auto":
        return torch.float32
    dtype = FLOAT_DTYPES.get(str(name).replace("torch.", ""))
    if dtype is None:
        raise UserError(
            f"{Path(path) / 'config.json'}: {key} {name!r} is not a floating-point dtype (float32, float16 "
            f"or bfloat16); fix config.json to name the dtype its weights are stored in"
        )
    return dtype
