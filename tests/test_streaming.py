"""Streaming a model from disk one decoder layer at a time: the same export as the whole model in memory, only
one layer's weights alive at a time, every check done before any weight is read, and the streaming writer."""

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.model_io import safetensors_header
from compress_export.io.writer import CheckpointWriter
from compress_export.pipeline.compress import compress


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_same_export(a, b):
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb


def run(src, out, text, **kw):
    kw.setdefault("scheme", Scheme(4, 32, True, "none"))
    return compress(src, out, dataset=str(text), num_samples=8, seq_len=32, progress=False, **kw)


@pytest.fixture(scope="module")
def untied_bias_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("ub") / "m", tie=False, bias=True, layers=3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="rtn"),
        dict(method="gptq"),
        dict(method="gptq", batch_size=3),
        dict(method="gptq", scheme=Scheme(4, 32, True, "group")),
        dict(method="awq", fmt="awq", scheme=Scheme(4, 32, False, "none")),
        dict(method="sparsegpt", fmt="sparse24", sparsity="2:4", scheme=None),
        dict(method="wanda", fmt="dense", sparsity="0.5", scheme=None),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values() if v is not None)[:40],
)
@pytest.mark.parametrize("which", ["tied", "untied-bias"])
def test_streamed_export_equals_in_memory_export(tiny_model, untied_bias_model, tiny_text, tmp_path, kw, which):
    src = tiny_model if which == "tied" else untied_bias_model
    s = run(src, tmp_path / "stream", tiny_text, **kw)
    m = run(src, tmp_path / "memory", tiny_text, stream=False, **kw)
    assert s.streamed and not m.streamed
    assert_same_export(tmp_path / "stream", tmp_path / "memory")


def test_only_one_decoder_layer_holds_weights_at_a_time(untied_bias_model, tiny_text, tmp_path, monkeypatch):
    """The independent fact behind flat memory: when layer i is read, every other decoder layer (and the
    embeddings, once the calibration inputs are captured) is on the meta device."""
    from compress_export.io import source as src_mod

    seen = []
    real = src_mod.StreamedSource.load_layer

    def load_layer(self, layout, i):
        layer = real(self, layout, i)
        real_layers = [j for j, lay in enumerate(layout.layers) if any(not p.is_meta for p in lay.parameters())]
        emb = self.model.get_input_embeddings().weight
        seen.append((i, real_layers, emb.is_meta))
        return layer

    monkeypatch.setattr(src_mod.StreamedSource, "load_layer", load_layer)
    s = run(untied_bias_model, tmp_path / "o", tiny_text, method="gptq")
    assert s.streamed and seen == [(i, [i], True) for i in range(3)]


def test_every_problem_is_reported_together_before_any_weight_is_read(tiny_model, tmp_path, monkeypatch):
    from compress_export.io import source as src_mod

    def no_reads(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(src_mod.StreamedSource, "_read", no_reads)
    monkeypatch.setattr(src_mod, "InMemorySource", no_reads)
    with pytest.raises(UserError) as e:
        compress(
            tiny_model,
            tmp_path / "o",
            method="gptq",
            scheme=Scheme(4, 48, True),
            device="cuda:7",
            dataset=str(tmp_path / "nope.txt"),
            progress=False,
        )
    msg = str(e.value)
    assert msg.startswith("3 problems") and "--group-size 48" in msg and "--device cuda:7" in msg
    assert "nope.txt does not exist" in msg
    assert not (tmp_path / "o").exists()


def test_disk_space_is_checked_from_the_headers(tiny_model, tmp_path, monkeypatch):
    import collections

    from compress_export.core.structure import describe
    from compress_export.io.model_io import tensor_index
    from compress_export.io.source import build_skeleton
    from compress_export.pipeline.compress import estimate_output_bytes

    est = estimate_output_bytes(
        tensor_index(tiny_model), describe(build_skeleton(tiny_model)), Scheme(4, 32, True), None
    )
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, est // 2))
    with pytest.raises(UserError, match=r"GB free; this export needs about"):
        compress(tiny_model, tmp_path / "o", method="rtn", scheme=Scheme(4, 32, True), progress=False)
    monkeypatch.undo()
    s = compress(tiny_model, tmp_path / "o", method="rtn", scheme=Scheme(4, 32, True), progress=False)
    actual = sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))
    assert 0.7 * actual < est < 1.5 * actual, (est, actual)  # the estimate is close to what was written
    assert s.streamed


def test_stream_true_refuses_what_cannot_stream(tiny_model, tmp_path):
    with pytest.raises(UserError, match="data-free calibration"):
        compress(
            tiny_model,
            tmp_path / "o",
            method="gptq",
            scheme=Scheme(4, 32, True),
            stream=True,
            num_samples=2,
            seq_len=8,
            progress=False,
            dataset="self",
        )


def test_device_option_is_checked():
    from compress_export.core.hardware import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(UserError, match="want auto, cpu, cuda"):
            resolve_device(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_export_matches_cpu_export(tiny_model, tiny_text, tmp_path):
    """The same GPTQ export on the GPU and on the CPU: float32 reductions run in another order there, so codes may
    differ where a value sits on a rounding boundary; scales agree within 1%, every unpacked tensor exactly."""
    run(tiny_model, tmp_path / "cpu", tiny_text, method="gptq", device="cpu")
    run(tiny_model, tmp_path / "gpu", tiny_text, method="gptq", device="cuda")
    a, b = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    assert set(a) == set(b)
    for k in a:
        if k.endswith("scales"):
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-2), k
        elif not k.endswith(("qweight", "qzeros")):
            assert torch.equal(a[k], b[k]), k


def test_writer_streams_mixed_dtypes_aligned_into_indexed_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    want = {
        "a": torch.randn(3, 5),
        "b": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "c": torch.randn(3).bfloat16(),
        "d": torch.randint(-5, 5, (4, 3), dtype=torch.int32),
        "e": torch.tensor(2.0, dtype=torch.float16),
        "f": torch.zeros(0, 4),
        "g": torch.randn(300),
        "h": torch.randn(40, dtype=torch.float64),
        "i": torch.tensor([True, False]),
    }
    w = CheckpointWriter(tmp_path / "out", shard_bytes=1000)
    for k, v in want.items():
        w.add(k, v)
    with pytest.raises(ValueError, match="written twice"):
        w.add("a", want["a"])
    w.finish({}, src)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    got = {}
    for f in files:
        header = safetensors_header(tmp_path / "out" / f)  # our own header check: sizes and ranges consistent
        n = int.from_bytes((tmp_path / "out" / f).read_bytes()[:8], "little")
        assert (8 + n) % 8 == 0
        for name, info in header.items():
            if name != "__metadata__":
                width = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}[info["dtype"]]
                assert info["data_offsets"][0] % width == 0, name  # every tensor starts aligned
        with safe_open(str(tmp_path / "out" / f), "pt") as fh:
            got.update({k: fh.get_tensor(k) for k in fh.keys()})
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert not list((tmp_path / "out").glob("*.spill*"))
