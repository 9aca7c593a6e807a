"""Every format: pack/unpack round trips over the schemes it can store, its declared tensor layout, the errors
for what it cannot store, and golden words of hand-worked examples so a layout change never passes silently."""

import pytest
import torch

from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.formats.base import FORMATS


def random_qw(out_f, in_f, scheme, seed=0, min_zero=0):
    g = torch.Generator().manual_seed(seed)
    G = scheme.groups(in_f)
    codes = torch.randint(0, scheme.maxq + 1, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, G, generator=g) * 0.1 + 1e-3).half().float()
    if scheme.symmetric:
        zeros = torch.full((out_f, G), scheme.sym_zero, dtype=torch.int32)
    else:
        zeros = torch.randint(min_zero, scheme.maxq + 1, (out_f, G), generator=g).int()
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    g_idx = (torch.arange(in_f) // gs).int()
    if scheme.act_order == "group":
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return QuantizedWeight(codes, scales, zeros, g_idx, scheme, torch.randn(out_f, generator=g))


CASES = [
    ("gptq", Scheme(4, 32, True, "static")),
    ("gptq", Scheme(3, 32, False, "group")),
    ("gptq", Scheme(2, -1, True)),
    ("gptq", Scheme(8, 64, False)),
    ("awq", Scheme(4, 32, False)),
    ("awq", Scheme(4, 64, True, "static")),
    ("compressed-tensors", Scheme(4, 32, True, "static")),
    ("compressed-tensors", Scheme(4, 32, False)),
    ("compressed-tensors", Scheme(3, 32, False, "group")),
    ("compressed-tensors", Scheme(2, -1, True)),
    ("compressed-tensors", Scheme(8, 64, False, "group")),
]


@pytest.mark.parametrize("fmt,scheme", CASES)
@pytest.mark.parametrize("shape", [(64, 128), (96, 192)])
def test_round_trip_and_declared_layout(fmt, scheme, shape):
    f = FORMATS.get(fmt)()
    f.check(scheme)
    qw = random_qw(*shape, scheme, min_zero=f.min_zero)
    tensors = f.pack(qw)
    qcfg = f.quantization_config(scheme, ["lm_head"], {})
    back = f.unpack(tensors, qcfg)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.bias, qw.bias)
    assert f.scheme_from_config(qcfg).bits == scheme.bits
    layout = f.tensor_layout(scheme, shape[1], shape[0])
    for name, spec in layout.items():
        assert tuple(tensors[name].shape) == spec.shape, name
        assert tensors[name].dtype == spec.dtype, name
    assert set(tensors) - {"bias"} == set(layout)


def test_awq_golden_words():
    # 1 input row, 8 output columns with codes 0..7: AWQ stores columns 0,2,4,6,1,3,5,7 at nibbles 0..7
    s = Scheme(4, 1, False)
    qw = QuantizedWeight(
        torch.arange(8, dtype=torch.uint8)[:, None],
        torch.ones(8, 1),
        torch.tensor([[9], [1], [2], [3], [4], [5], [6], [15]], dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        s,
    )
    t = FORMATS.get("awq")().pack(qw)
    assert t["qweight"].shape == (1, 1) and int(t["qweight"]) & 0xFFFFFFFF == 0x75316420
    # zeros stored as they are (no −1), same interleave: 9,2,4,6,1,3,5,15 at nibbles 0..7
    assert int(t["qzeros"]) & 0xFFFFFFFF == 0xF5316429


def test_gptq_golden_words():
    # qweight packs along the input dim: codes 0..7 of one output column → 0x76543210; qzeros store zero − 1
    s = Scheme(4, 8, False)
    qw = QuantizedWeight(
        torch.arange(8, dtype=torch.uint8)[None],
        torch.ones(1, 1),
        torch.tensor([[5]], dtype=torch.int32),
        torch.zeros(8, dtype=torch.int32),
        s,
    )
    qw8 = QuantizedWeight(
        qw.codes.repeat(8, 1),
        torch.ones(8, 1),
        torch.arange(1, 9, dtype=torch.int32)[:, None],
        torch.zeros(8, dtype=torch.int32),
        s,
    )
    t = FORMATS.get("gptq")().pack(qw8)
    assert (t["qweight"] & 0xFFFFFFFF).tolist() == [[0x76543210] * 8]
    assert int(t["qzeros"]) & 0xFFFFFFFF == 0x76543210  # zeros 1..8 stored as 0..7


def test_compressed_tensors_golden_words():
    # weight_packed along the input dim, aligned; zero points packed along the OUTPUT dim (dim 0)
    s = Scheme(4, 8, False)
    codes = torch.arange(8, dtype=torch.uint8)[None].repeat(8, 1)
    qw = QuantizedWeight(
        codes, torch.ones(8, 1), torch.arange(8, dtype=torch.int32)[:, None], torch.zeros(8, dtype=torch.int32), s
    )
    t = FORMATS.get("compressed-tensors")().pack(qw)
    assert (t["weight_packed"] & 0xFFFFFFFF).tolist() == [[0x76543210]] * 8
    assert t["weight_zero_point"].shape == (1, 1) and int(t["weight_zero_point"]) == 0x76543210
    assert t["weight_shape"].tolist() == [8, 8]


@pytest.mark.parametrize(
    "scheme,match",
    [
        (Scheme(3, 32), "cannot store 3-bit"),
        (Scheme(4, 32, act_order="group"), "no g_idx"),
        (Scheme(4, -1), "grouped scales"),
    ],
)
def test_awq_refuses_what_it_cannot_store(scheme, match):
    with pytest.raises(UserError, match=match):
        FORMATS.get("awq")().check(scheme)


def test_compressed_tensors_config_is_what_the_library_reads():
    ct = pytest.importorskip("compressed_tensors.quantization")
    f = FORMATS.get("compressed-tensors")()
    for scheme in (Scheme(4, 64, False, "static"), Scheme(8, -1, True), Scheme(3, 32, True, "group")):
        qcfg = f.quantization_config(scheme, ["lm_head"], {"method": "gptq"})
        parsed = ct.QuantizationConfig.model_validate(
            {
                k: v
                for k, v in qcfg.items()
                if k not in ("compress_export", "quantizer", "version", "sparsity_config", "transform_config")
            }
        )
        w = parsed.config_groups["group_0"].weights
        assert (w.num_bits, w.symmetric) == (scheme.bits, scheme.symmetric)
        assert f.scheme_from_config(qcfg) == scheme


@pytest.mark.parametrize(
    "scheme", [Scheme(4, 32, False, "static"), Scheme(4, 32, True, "group"), Scheme(8, -1, True), Scheme(2, 32, False)]
)
def test_compressed_tensors_library_decompresses_our_tensors(scheme):
    """The reference decompressor, given our tensors, rebuilds exactly our dequantized weight."""
    pq = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    q = pytest.importorskip("compressed_tensors.quantization")
    qargs = q.QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy="channel" if scheme.group_size == -1 else "group",
        group_size=None if scheme.group_size == -1 else scheme.group_size,
        actorder={"none": None, "static": "static", "group": "group"}[scheme.act_order],
    )
    qw = random_qw(64, 128, scheme, seed=3)
    state = FORMATS.get("compressed-tensors")().pack(qw)
    state.pop("bias")
    state["weight_scale"] = state["weight_scale"].float()
    out = pq.PackedQuantizationCompressor.decompress(state, q.QuantizationScheme(targets=["Linear"], weights=qargs))
    assert torch.allclose(out["weight"].float(), qw.dequantize(), atol=1e-6)


def test_transformers_with_compressed_tensors_loads_the_tiny_export(tiny_model, tiny_text, tmp_path):
    """Reference library end to end on the tiny model: asymmetric (packed zero points) and group act-order."""
    pytest.importorskip("compressed_tensors")
    from compress_export.integrations.conformance import compare_reference
    from compress_export.pipeline.compress import compress

    for name, scheme in (("asym", Scheme(4, 32, False, "static")), ("gidx", Scheme(4, 32, True, "group"))):
        out = tmp_path / name
        compress(
            tiny_model,
            out,
            method="gptq",
            fmt="compressed-tensors",
            scheme=scheme,
            dataset=str(tiny_text),
            num_samples=8,
            seq_len=32,
            progress=False,
        )
        r = compare_reference(out, tiny_text, window=64)
        assert r["top1_agreement"] >= 0.99 and r["max_abs_dlogit"] < 1e-3, (name, r)


def test_quantization_configs_are_the_fields_engines_read_and_parse_back():
    """Each format's typed config model writes the keys AutoGPTQ/GPTQModel, AutoAWQ, compressed-tensors and vLLM
    read, with the values written out by hand here, and parses its own output back to the same model."""
    from compress_export._version import __version__
    from compress_export.formats.awq import AWQConfig
    from compress_export.formats.compressed_tensors import CompressedTensorsConfig
    from compress_export.formats.gptq import GPTQConfig
    from compress_export.formats.sparse import Sparse24Config

    ours = [f"compress-export:{__version__}"]
    extra = {"method": "gptq", "damp": 0.05}
    gptq = FORMATS.get("gptq")().quantization_config(Scheme(3, 32, False, "group"), ["lm_head"], extra)
    assert gptq == {
        "quant_method": "gptq",
        "bits": 3,
        "group_size": 32,
        "desc_act": True,
        "sym": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "damp_percent": 0.05,
        "quantizer": ours,
        "modules_not_quantized": ["lm_head"],
        "compress_export": extra,
    }
    awq = FORMATS.get("awq")().quantization_config(Scheme(4, 64, True), [], {"method": "awq"})
    assert awq == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": [],
        "quantizer": ours,
        "compress_export": {"method": "awq", "symmetric": True},
    }
    ct = FORMATS.get("compressed-tensors")().quantization_config(Scheme(8, -1, True), ["lm_head"], {})
    w = ct["config_groups"]["group_0"]["weights"]
    assert (ct["format"], w["num_bits"], w["strategy"], w["group_size"], w["actorder"], ct["ignore"]) == (
        "pack-quantized",
        8,
        "channel",
        None,
        None,
        ["lm_head"],
    )
    for model, qcfg in ((GPTQConfig, gptq), (AWQConfig, awq), (CompressedTensorsConfig, ct)):
        assert model.parse(qcfg).to_dict() == qcfg
    s24 = Sparse24Config(Scheme(4, 32, True), torch.bfloat16, ("lm_head",), {})
    assert s24.to_dict()["value_dtype"] == "bfloat16" and Sparse24Config.parse(s24.to_dict()) == s24
    assert GPTQConfig.parse(gptq).scheme == Scheme(3, 32, False, "group")
    assert AWQConfig.parse(awq).scheme == Scheme(4, 64, True, "none")
