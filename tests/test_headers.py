"""The safetensors header check against hostile files: every broken header ends as one UserError naming the file
(and the tensor), and whatever it accepts, safetensors' own reader opens and reads byte for byte.

Files are built from raw bytes here (8-byte little-endian length, JSON, data), so the facts compared against are
the bytes written and safetensors' reader, never the function under test."""

import json
import os
import random
import re
import struct
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from compress_export.core.errors import UserError
from compress_export.io.model_io import check_safetensors, safetensors_header, tensor_index

DAMAGED = "the file is damaged or incomplete: write or download it again"
TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WIDTH = {
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
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
UNSUPPORTED = ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U16", "U32", "U64", "C64", "F7", "f32"]


def entry(dtype="F32", shape=(2,), start=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def blob(header, data=b"", *, length=None):
    """A safetensors file's bytes: header is a dict (dumped as JSON), a str (JSON text) or bytes (taken as is)."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def write(tmp_path, content: bytes, name="model.safetensors"):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def refused(path, *parts):
    """safetensors_header(path) raises one UserError, on one line, naming the file and containing every part."""
    with pytest.raises(UserError) as e:
        safetensors_header(path)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert path.name in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def safe_open_refuses(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001  (any failure of safetensors' own reader counts)
        return True
    return False


# ---- valid files -------------------------------------------------------------------------------------------------


def test_a_file_written_by_safetensors_passes_and_returns_its_header(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.zeros(4, dtype=torch.bfloat16),
        "i": torch.arange(5),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(1.5, dtype=torch.float64),
        "e": torch.zeros(0, 7, dtype=torch.int16),
    }
    p = tmp_path / "model.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert safetensors_header(p) == json.loads(raw[8 : 8 + n])  # the header as written, parsed independently
    assert safetensors_header(str(p))["w"]["shape"] == [3, 4]


def test_empty_tensors_may_share_a_start_and_whitespace_padding_is_fine(tmp_path):
    h = {
        "a": entry("F32", [0], 0, 0),
        "b": entry("I8", [0, 3], 0, 0),
        "c": entry("F32", [2], 0, 8),
        "d": entry("U8", [0], 8, 8),
        "__metadata__": {"k": "v"},
    }
    p = write(tmp_path, blob("  " + json.dumps(h) + "    ", b"\1" * 8))
    assert safetensors_header(p)["c"]["data_offsets"] == [0, 8]
    assert not safe_open_refuses(p)


def test_an_empty_file_of_no_tensors_passes(tmp_path):
    assert safetensors_header(write(tmp_path, blob({}))) == {}


# ---- length prefix and JSON ---------------------------------------------------------------------------------------


def test_too_short(tmp_path):
    refused(write(tmp_path, b"\x10\0\0"), "too short", DAMAGED)


def test_length_larger_than_the_file(tmp_path):
    refused(write(tmp_path, blob({}, length=1 << 40)), f"claims {1 << 40} bytes")


def test_length_over_the_limit_in_a_large_sparse_file(tmp_path):
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as fh:  # sparse: nothing of the 110 MB is written, and nothing may be read
        fh.write((105_000_000).to_bytes(8, "little"))
        fh.truncate(110_000_000)
    refused(p, "claims 105000000 bytes", "more than")


@pytest.mark.parametrize(
    "raw, part",
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        ('{"a": 1}'.encode("utf-16"), "not valid UTF-8 JSON"),  # Python's json alone would guess UTF-16
        (b"\xef\xbb\xbf{}", "not valid UTF-8 JSON"),  # a byte-order mark
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"a": 1}\0', "not valid UTF-8 JSON"),
        (b"", "not valid UTF-8 JSON"),
        (b'{"__metadata__": {"x": NaN}}', "NaN is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError"),
        (b'{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', "-0 is not a size"),
        (b"[]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (b"12", "not a JSON object"),
    ],
)
def test_header_not_a_json_object(tmp_path, raw, part):
    refused(write(tmp_path, blob(raw)), part, DAMAGED)


def test_duplicate_names(tmp_path):
    raw = '{"w": %s, "w": %s}' % (json.dumps(entry("F32", [1], 0, 4)), json.dumps(entry("F32", [1], 4, 8)))
    refused(write(tmp_path, blob(raw, b"\0" * 8)), "names w twice")


# ---- __metadata__ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta, part",
    [
        (None, "__metadata__ is null"),
        ([], "__metadata__ is a list"),
        ("x", "__metadata__ is \"x\""),
        ({"format": 1}, "entry format is 1"),
        ({"format": {"a": "b"}}, "entry format is an object"),
        ({"format": None}, "entry format is null"),
    ],
)
def test_metadata_must_be_strings(tmp_path, meta, part):
    refused(write(tmp_path, blob({"__metadata__": meta, "w": entry()}, b"\0" * 8)), part)


def test_metadata_with_a_lone_surrogate(tmp_path):
    refused(write(tmp_path, blob('{"__metadata__": {"k": "\\udc00"}}')), "not a UTF-8 string")


# ---- tensor entries -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "info, part",
    [
        ([1, 2], "its entry is a list"),
        ("F32", "its entry is \"F32\""),
        (None, "its entry is null"),
        ({"dtype": "F32", "shape": [2]}, "not exactly dtype, shape and data_offsets"),
        (dict(entry(), extra=1), "keys [data_offsets, dtype, extra, shape]"),
        (dict(entry(), offsets=[0, 8]), "not exactly dtype, shape and data_offsets"),
    ],
)
def test_entry_must_be_exactly_three_keys(tmp_path, info, part):
    refused(write(tmp_path, blob({"w": info}, b"\0" * 8)), "tensor w", part)


@pytest.mark.parametrize("raw_name, part", [('""', "name ''"), ('"\\ud800"', "\\ud800")])
def test_names_must_be_non_empty_utf8(tmp_path, raw_name, part):
    refused(
        write(tmp_path, blob('{%s: %s}' % (raw_name, json.dumps(entry())), b"\0" * 8)),
        part,
        "not a non-empty UTF-8 string",
    )


def test_a_name_with_a_newline_stays_on_one_line(tmp_path):
    msg = refused(write(tmp_path, blob({"a\nb": entry("F32", [3], 0, 8)}, b"\0" * 8)), "tensor a\\nb")
    assert "needs 12 bytes" in msg


# ---- dtypes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", UNSUPPORTED)
def test_unsupported_dtypes(tmp_path, dtype):
    width = WIDTH.get(dtype, 1)
    msg = refused(
        write(tmp_path, blob({"m.w": entry(dtype, [2], 0, 2 * width)}, b"\0" * 2 * width)),
        f"unsupported dtype {dtype} in tensor m.w",
    )
    assert "convert" in msg


def test_a_float8_checkpoint_from_torch(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"layers.0.q.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "b": torch.zeros(2)}, str(p))
    refused(p, "unsupported dtype F8_E4M3 in tensor layers.0.q.weight")


@pytest.mark.parametrize("dtype, part", [(4, "dtype is 4,"), (None, "dtype is null"), (["F32"], "dtype is a list")])
def test_dtype_must_be_a_name(tmp_path, dtype, part):
    refused(write(tmp_path, blob({"w": entry(dtype)}, b"\0" * 8)), "tensor w", part, "not a dtype name")


# ---- shapes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, part",
    [
        ("2", "shape is \"2\", not a list"),
        ({"0": 2}, "shape is an object"),
        (2, "shape is 2, not a list"),
        ([True, 2], "the size true"),
        ([2.0], "the size 2.0"),
        (["2"], "the size \"2\""),
        ([-2], "the size -2"),
        ([None], "the size null"),
        ([[2]], "the size a list"),
        ([2**40, 2**40, 0], "more than"),
        ([0, 10**100], "more than"),
        ([2**64], "more than"),
    ],
)
def test_shape_must_be_sizes(tmp_path, shape, part):
    refused(
        write(tmp_path, blob({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}, b"\0" * 8)),
        "tensor w",
        part,
    )


def test_shape_must_match_the_range(tmp_path):
    refused(write(tmp_path, blob({"w": entry("F32", [3], 0, 8)}, b"\0" * 8)), "tensor w", "needs 12 bytes", "holds 8")
    refused(write(tmp_path, blob({"w": entry("BF16", [2, 2], 0, 4)}, b"\0" * 4)), "needs 8 bytes")


# ---- data_offsets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offsets, part",
    [
        ([0], "not a list of two integers"),
        ([0, 4, 8], "not a list of two integers"),
        ("0-8", "is \"0-8\""),
        ([False, 8], "not a list of two integers"),
        ([0.0, 8], "not a list of two integers"),
        ([0, "8"], "not a list of two integers"),
        (None, "data_offsets is null"),
        ([8, 0], "not a range"),
        ([-8, 0], "not a range"),
    ],
)
def test_offsets_must_be_two_ints_in_order(tmp_path, offsets, part):
    refused(
        write(tmp_path, blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}, b"\0" * 8)),
        "tensor w",
        part,
    )


def test_range_past_the_data(tmp_path):
    refused(write(tmp_path, blob({"w": entry("F32", [2], 0, 8)}, b"\0" * 7)), "tensor w ends at byte 8", "holds only 7")
    refused(write(tmp_path, blob({"w": entry("U8", [0], 10**30, 10**30)}, b"")), "ends at byte")


# ---- layout: safetensors' reader refuses all of these too -----------------------------------------------------------


@pytest.mark.parametrize(
    "header, size, part",
    [
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, 8, "tensors a and b overlap in the bytes 4..8"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, 8, "tensors a and b share the bytes 0..8"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [0], 4, 4)}, 8, "tensors a and b overlap"),
        ({"a": entry("F32", [2], 4, 12)}, 12, "bytes 0..4 of the data belong to no tensor"),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, 12, "bytes 4..8 of the data belong to no"),
        ({"a": entry("F32", [2], 0, 8)}, 12, "bytes 8..12 at the end of the data belong to no tensor"),
        ({}, 4, "bytes 0..4 at the end"),
    ],
)
def test_ranges_tile_the_data(tmp_path, header, size, part):
    p = write(tmp_path, blob(header, b"\0" * size))
    refused(p, part)
    assert safe_open_refuses(p)  # the rule matches safetensors' own reader


# ---- files that are not files -------------------------------------------------------------------------------------


def test_missing_fifo_and_folder(tmp_path):
    refused(tmp_path / "gone.safetensors", "cannot be read")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):  # refused at once, never a hang
        safetensors_header(fifo)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        safetensors_header(tmp_path / "dir.safetensors")


# ---- shards, the shard index and tensor_index ------------------------------------------------------------------------


def shards(tmp_path, index=None):
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(tmp_path / "m-1.safetensors"))
    save_file({"c": torch.zeros(1, dtype=torch.int8)}, str(tmp_path / "m-2.safetensors"))
    if index is not None:
        text = index if isinstance(index, str) else json.dumps(index)
        (tmp_path / "model.safetensors.index.json").write_text(text)
    return tmp_path


GOOD_MAP = {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}


def test_a_sharded_folder_passes_and_is_indexed(tmp_path):
    p = shards(tmp_path, {"metadata": {"total_size": 21}, "weight_map": GOOD_MAP})
    check_safetensors(p)
    idx = tensor_index(p)
    assert {k: (f.name, dt, shape) for k, (f, dt, shape) in idx.items()} == {
        "a": ("m-1.safetensors", "F32", (2,)),
        "b": ("m-1.safetensors", "F32", (3,)),
        "c": ("m-2.safetensors", "I8", (1,)),
    }


@pytest.mark.parametrize(
    "index, part",
    [
        ("{broken", "not valid JSON"),
        ([], "weight_map is null"),
        ({"weight_map": []}, "weight_map is a list"),
        ({"weight_map": {"a": 1}}, "tensor a maps to 1, not a file name"),
        ({"weight_map": {"a": "../m-1.safetensors"}}, "not a plain *.safetensors file name"),
        ({"weight_map": {"a": "sub/m-1.safetensors"}}, "not a plain *.safetensors file name"),
        ({"weight_map": {"a": "/etc/passwd"}}, "not a plain *.safetensors file name"),
        ({"weight_map": {"a": "m-1.bin"}}, "not a plain *.safetensors file name"),
        ({"weight_map": {"a": ".."}}, "not a plain *.safetensors file name"),
        ({"weight_map": dict(GOOD_MAP, d="m-3.safetensors")}, "lists m-3.safetensors, missing from"),
        ({"weight_map": dict(GOOD_MAP, d="m-2.safetensors")}, "places tensor d in m-2.safetensors but no shard holds"),
        ({"weight_map": dict(GOOD_MAP, a="m-2.safetensors")}, "places tensor a in m-2.safetensors but it is in m-1"),
        ({"weight_map": dict(GOOD_MAP, __metadata__="m-1.safetensors")}, "places tensor __metadata__"),
    ],
)
def test_a_bad_shard_index(tmp_path, index, part):
    p = shards(tmp_path, index)
    with pytest.raises(UserError) as e:
        check_safetensors(p)
    assert part in str(e.value) and "model.safetensors.index.json" in str(e.value), str(e.value)


def test_a_bad_shard_fails_the_folder_check(tmp_path):
    p = shards(tmp_path)
    write(tmp_path, blob({"x": entry("F8_E5M2", [2], 0, 2)}, b"\0\0"), "m-3.safetensors")
    with pytest.raises(UserError, match="unsupported dtype F8_E5M2 in tensor x"):
        check_safetensors(p)


def test_a_tensor_in_two_shards(tmp_path):
    p = shards(tmp_path)
    save_file({"b": torch.ones(3)}, str(tmp_path / "m-3.safetensors"))
    for check in (tensor_index, check_safetensors):
        with pytest.raises(UserError) as e:
            check(p)
        assert (
            "tensor b is in both m-1.safetensors and m-3.safetensors; a checkpoint must hold each tensor once"
            in str(e.value)
        )


# ---- property-based fuzz ------------------------------------------------------------------------------------------

# Text with the characters that trip readers: lone surrogates (JSON can escape them, UTF-8 cannot hold them),
# newlines, non-ASCII. Joined lists, since st.text() leaves surrogates out.
TEXT = st.lists(st.sampled_from("ab._ \n\ud800\udc00\u00e9\u20ac\U0001d11e") | st.characters(), max_size=6).map("".join)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | TEXT
    | st.sampled_from(list(WIDTH) + ["F4", "F6_E2M3", "-0"])
)
ANY_JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=8)
NAMES = st.sampled_from(["\ud800", "", "__metadata__", "\udfff", "a\nb", "w", "t0", "x.y"]) | TEXT
DTYPES = st.sampled_from(list(WIDTH) + ["F4", "F6_E3M2", "C64"]) | st.text(max_size=4)
HUGE = st.sampled_from([2**63, 2**64, 2**70, 2**62, 2**49, 2**31])  # sizes past int64 and u64
KINDS = [
    "retype",
    "move",
    "dim",
    "offset",
    "retype",
    "move",
    "dim",
    "offsets",
    "shape",
    "dtype",
    "name",
    "extra",
    "drop",
    "entry",
    "dup",
    "meta",
    "swap",
    "deep",
]  # the subtle kinds twice: they reach the deepest checks


@st.composite
def valid_files(draw):
    """[(name, entry)], data: tensors laid out back to back as safetensors writes them."""
    items, pos = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(TORCH)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.integers(0, 3)) == 0:  # an empty tensor: the layout rules for those are the subtle ones
            shape.insert(draw(st.integers(0, len(shape))), 0)
        n = WIDTH[dtype]
        for d in shape:
            n *= d
        items.append((f"t{i}", entry(dtype, shape, pos, pos + n)))
        pos += n
    if draw(st.booleans()):
        items.append(("__metadata__", {"format": "pt"}))
    return items, random.Random(draw(st.integers(0, 1 << 30))).randbytes(pos)


def retyped(draw, vals: list) -> list:
    """The same list with one number in another JSON type: 1 -> true, 2 -> 2.0, 2 -> "2"."""
    vals = list(vals)
    j = draw(st.integers(0, len(vals) - 1))
    v = vals[j]
    if isinstance(v, int):
        vals[j] = draw(st.sampled_from([bool(v)] * 2 + [float(v), str(v)] if v in (0, 1) else [float(v), str(v)]))
    return vals


def mutate_entry(draw, kind: str, info: dict, offsets: list):
    """One change to one tensor entry (a copy); `offsets` are all the file's data_offsets, to move to."""
    offs, shape = info.get("data_offsets"), info.get("shape")
    is_pair = isinstance(offs, list) and len(offs) == 2 and all(isinstance(v, int) for v in offs)
    if kind == "offset" and is_pair:  # one end moved
        j = draw(st.integers(0, 1))
        info["data_offsets"] = [v + draw(st.integers(-9, 9)) if k == j else v for k, v in enumerate(offs)]
    elif kind == "move" and is_pair:  # the range moved whole into another's: an empty tensor stays empty
        ranges = [o for o in offsets if isinstance(o, list) and len(o) == 2 and all(isinstance(v, int) for v in o)]
        a, b = draw(st.sampled_from(ranges))
        start = a + draw(st.integers(0, max(0, b - a) + 1))
        info["data_offsets"] = [start, start + offs[1] - offs[0]]
    elif kind in ("offsets", "shape"):
        info["data_offsets" if kind == "offsets" else "shape"] = draw(
            ANY_JSON | st.lists(st.integers(-3, 9), max_size=3)
        )
    elif kind == "dtype":
        info["dtype"] = draw(DTYPES)
    elif kind == "dim" and isinstance(shape, list):  # a size added (a huge one keeps an empty tensor empty)
        if shape and draw(st.integers(0, 2)) == 0:
            info["shape"] = shape[1:]
        else:
            at = draw(st.integers(0, len(shape)))
            info["shape"] = shape[:at] + [draw(HUGE if 0 in shape else st.integers(0, 3) | HUGE)] + shape[at:]
    elif kind == "retype":
        key = draw(st.sampled_from(["shape", "data_offsets"]))
        if isinstance(info.get(key), list) and info[key]:
            info[key] = retyped(draw, info[key])
    elif kind == "extra":
        info[draw(TEXT)] = draw(ANY_JSON)
    elif kind == "drop" and info:
        info.pop(draw(st.sampled_from(sorted(info))))
    elif kind == "swap" and offsets:
        info["data_offsets"] = draw(st.sampled_from(offsets))
    elif kind == "entry":
        return draw(ANY_JSON)
    elif kind == "deep":
        return "[" * draw(st.integers(1, 30_000))  # closed in to_text: nested past any stack
    return info


def mutate_items(draw, items: list) -> list:
    """One structural change to the header: a field, a name, a whole entry, a duplicate, the metadata."""
    kind = draw(st.sampled_from(KINDS))
    tensors = [i for i, (k, v) in enumerate(items) if k != "__metadata__" and isinstance(v, dict)]
    if kind == "meta" or not tensors:
        items.append(("__metadata__", draw(ANY_JSON | st.dictionaries(TEXT, TEXT, max_size=3))))
        return items
    i = draw(st.sampled_from(tensors))
    name, info = items[i]
    if kind == "name":
        items[i] = (draw(NAMES), info)
    elif kind == "dup":  # the same name twice: Python's json keeps the last, another reader may keep the first
        items.append((name, draw(st.sampled_from([items[j][1] for j in tensors]))))
    else:
        offsets = [items[j][1].get("data_offsets") for j in tensors]
        items[i] = (name, mutate_entry(draw, kind, dict(info), offsets))
    return items


def to_text(items, draw, pads) -> bytes:
    """The JSON text of (possibly duplicated) items, in ASCII or raw UTF-8 (lone surrogates become invalid UTF-8)."""
    ascii_ = draw(st.booleans())
    parts = []
    for k, v in items:
        val = v + "]" * len(v) if isinstance(v, str) and v.startswith("[[") else json.dumps(v, ensure_ascii=ascii_)
        parts.append(json.dumps(k, ensure_ascii=ascii_) + ":" + val)
    text = "{" + ",".join(parts) + "}" + draw(st.sampled_from(pads))
    if draw(st.integers(0, 7)) == 0:  # a zero spelled -0: Python reads the int 0, safetensors the float -0.0
        text = re.sub(r"([\[,] ?)0([,\]])", r"\1-0\2", text, count=1)
    return text.encode("utf-8", "surrogatepass")


def broken_bytes(draw, whole: bytes) -> bytes:
    """The file's bytes after damage: a wrong length prefix, truncated, extended, bytes flipped, or random."""
    kind = draw(st.sampled_from(["length", "truncate", "append", "flip", "random"]))
    if kind == "length":
        n = int.from_bytes(whole[:8], "little")
        return max(0, n + draw(st.integers(-12, 12))).to_bytes(8, "little") + whole[8:]
    if kind == "truncate":
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "append":
        return whole + draw(st.binary(min_size=1, max_size=12))
    if kind == "flip":
        b = bytearray(whole)
        for _ in range(draw(st.integers(1, 3))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    return draw(st.binary(max_size=64))


@st.composite
def hostile_files(draw) -> bytes:
    """Mostly a valid file with one or two header changes (the cases a lenient check lets through); else bytes
    damaged after that, a bad tail after the JSON, or a header of random JSON."""
    mode = draw(st.sampled_from(["one", "one", "one", "one", "two", "none", "bytes", "tail", "json"]))
    if mode == "json":
        raw, payload = json.dumps(draw(ANY_JSON)).encode(), draw(st.binary(max_size=16))
    else:
        items, payload = draw(valid_files())
        for _ in range({"one": 1, "two": 2, "none": 0}.get(mode, draw(st.integers(0, 1)))):
            items = mutate_items(draw, items)
        raw = to_text(items, draw, ["\0", "x", "}", "\x01"] if mode == "tail" else ["", "", " ", "  \n\t\r"])
    whole = len(raw).to_bytes(8, "little") + raw + payload
    return broken_bytes(draw, whole) if mode == "bytes" else whole


def reads_back(path, header):
    """safetensors' own reader opens the file, finds exactly the header's tensors and metadata, and reads each
    with the header's dtype and shape and exactly the bytes of its range."""
    raw = path.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}
        assert f.metadata() == header.get("__metadata__")
        for k in f.keys():
            t = f.get_tensor(k)
            start, end = header[k]["data_offsets"]
            assert t.dtype == TORCH[header[k]["dtype"]] and list(t.shape) == header[k]["shape"], k
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == data[start:end], k


def test_fuzz_headers_refused_cleanly_or_read_by_safetensors(tmp_path_factory):
    """Every generated file is refused with one clean UserError or read back by safetensors exactly as accepted.
    The budget was sized so that dropping any one check this property can see (the layout tiling, -0, bool, float
    or string sizes and offsets, lone surrogates, the element cap, string metadata) makes this test fail."""
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"
    outcomes = Counter()

    @settings(
        max_examples=3500, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(hostile_files())
    def check(content):
        path.write_bytes(content)
        try:
            header = safetensors_header(path)
        except UserError as e:
            msg = str(e)
            assert "\n" not in msg and "\r" not in msg and path.name in msg, msg
            outcomes["refused"] += 1
        else:
            reads_back(path, header)
            outcomes["accepted"] += 1

    check()
    assert outcomes["accepted"] >= 200 and outcomes["refused"] >= 500, outcomes  # both sides exercised
