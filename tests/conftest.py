"""Shared fixtures: a tiny random Llama built in seconds, the shared texts, the SmolLM2 example model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "text"

TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "all that glitters is not gold . to be or not to be , that is the question . "
) * 40


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([TINY_TEXT], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_llama(
    path: Path,
    *,
    tie=True,
    hidden=64,
    inter=128,
    layers=2,
    seed=0,
    bias=False,
    kv_heads=2,
    model_type="llama",
    heads=4,
    max_pos=512,
    tokenizer=None,
    vocab=None,
) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    tok = tokenizer or _tiny_tokenizer()  # another tokenizer: the vocabulary is its size
    cfg = LlamaConfig(
        vocab_size=vocab or (len(tok) if tokenizer is not None else 64),  # vocab: padded past the tokenizer
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attention_bias=bias,
        mlp_bias=bias,
    )
    if model_type != "llama":  # same weights layout under another family's name (e.g. olmo, mistral)
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def _isa_in_use() -> str:
    from compress_export.kernels import cpu_wna16

    ext = cpu_wna16.extension()
    return ext.isa() if ext is not None else "auto"


# The C extension's variant for this session: auto's choice, or a COMPRESS_EXPORT_CPU_ISA pin (a CI job may pin
# one). Tests that switch variants put this one back, so a pinned job keeps testing its variant.
ISA_IN_USE = _isa_in_use()


@contextlib.contextmanager
def isa_variant(ext, name):
    """Run the block with the extension's `name` variant, then restore the one the session pinned (ISA_IN_USE), even
    when the block fails. A refused switch changes nothing, so there is nothing to restore when set_isa raises."""
    ext.set_isa(name)
    try:
        yield
    finally:
        ext.set_isa(ISA_IN_USE)


@pytest.fixture(autouse=True)
def _no_fused_lowrank_from_the_shell(monkeypatch):
    """COMPRESS_EXPORT_LOWRANK=fused in a developer's or CI's shell would change what vLLM runs in every test (the
    tests that want it set it themselves)."""
    monkeypatch.delenv("COMPRESS_EXPORT_LOWRANK", raising=False)


@pytest.fixture(autouse=True)
def _exact_prefill(monkeypatch):
    """Tests that compare a kernel's model with the dequantized math to 1e-4 run the exact float prefill
    (COMPRESS_EXPORT_PREFILL=float; vLLM's child inherits the environment). The default int8 prefill (W4A8) is
    tested where a test asks for it: its kernels against the exact path within the int8 rounding bound
    (test_cpu_w4a8.py, test_cpu_kernel.py), whole models within a wider one (test_pipeline.py, test_vllm.py)."""
    monkeypatch.setenv("COMPRESS_EXPORT_PREFILL", "float")


@pytest.fixture
def int8_prefill(monkeypatch):
    """The default W4A8 prefill, for the tests that check it."""
    monkeypatch.setenv("COMPRESS_EXPORT_PREFILL", "int8")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TINY_TEXT)
    return p


@pytest.fixture(scope="session")
def calib_txt() -> Path:
    p = SHARED_TEXT / "calib.txt"
    if not p.exists():
        pytest.skip(f"{p} is missing (the shared data folder sits beside the checkout)")
    return p


@pytest.fixture(scope="session")
def eval_txt() -> Path:
    p = SHARED_TEXT / "eval.txt"
    if not p.exists():
        pytest.skip(f"{p} is missing")
    return p


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from compress_export.pipeline.example_model import example_model_dir

    return example_model_dir()


@pytest.fixture(scope="session")
def smollm2_w4(smollm2, calib_txt, tmp_path_factory) -> Path:
    """SmolLM2 GPTQ W4 g64 (static act-order), calibrated on 8×256 tokens of calib.txt to keep CI short."""
    from compress_export.core.scheme import Scheme
    from compress_export.pipeline.compress import compress

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-gptq-w4g64"
    compress(
        smollm2,
        out,
        method="gptq",
        fmt="gptq",
        scheme=Scheme(4, 64, True, "static"),
        dataset=str(calib_txt),
        num_samples=8,
        seq_len=256,
        progress=False,
    )
    return out


def have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and os.environ.get("COMPRESS_EXPORT_SKIP_VLLM") != "1"


@pytest.fixture(scope="session")
def smollm2_awq(smollm2, calib_txt, tmp_path_factory) -> Path:
    """SmolLM2 AWQ W4 g64 asymmetric in the AWQ GEMM format, 8×256 calibration tokens."""
    from compress_export.core.scheme import Scheme
    from compress_export.pipeline.compress import compress

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-awq-w4g64"
    compress(
        smollm2,
        out,
        method="awq",
        fmt="awq",
        scheme=Scheme(4, 64, False),
        dataset=str(calib_txt),
        num_samples=8,
        seq_len=256,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def smollm2_ct(smollm2_awq, tmp_path_factory) -> Path:
    """The AWQ export's very numbers repacked as compressed-tensors (asymmetric: packed zero points)."""
    from compress_export.pipeline.convert import convert

    return convert(smollm2_awq, "compressed-tensors", str(tmp_path_factory.mktemp("smollm2") / "smollm2-ct"))


@pytest.fixture(scope="session")
def smollm2_s24(smollm2, calib_txt, tmp_path_factory) -> Path:
    """SmolLM2 pruned 2:4 by SparseGPT (unquantized values, sparse24 format), 8×256 calibration tokens."""
    from compress_export.pipeline.compress import compress

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-sparsegpt-24"
    compress(
        smollm2,
        out,
        method="sparsegpt",
        sparsity="2:4",
        dataset=str(calib_txt),
        num_samples=8,
        seq_len=256,
        progress=False,
    )
    return out


def assert_written_as_computed(out_dir, results: dict) -> None:
    """The export on disk, unpacked by its format, is exactly the pipeline's in-memory results (recorded through
    compress(on_result=...) before packing): an independent fact, not the loader checked against itself."""
    from compress_export.core.result import SparseWeight
    from compress_export.io.loading import read_quantized

    _, written, _ = read_quantized(out_dir)
    assert sorted(written) == sorted(results)
    for name, ref in results.items():
        got = written[name]
        if isinstance(ref, SparseWeight):
            assert torch.equal(got.values.float(), ref.values.float()) and torch.equal(got.mask, ref.mask), name
            continue
        for field in ("codes", "zeros", "g_idx"):
            assert torch.equal(getattr(got, field).long(), getattr(ref, field).long()), (name, field)
        assert torch.equal(got.scales.float(), ref.scales.float()), (name, "scales")
        if ref.mask is not None:
            assert torch.equal(got.mask, ref.mask), (name, "mask")


def recorder():
    """(results dict, on_result callback) for compress()."""
    results = {}
    return results, lambda name, qw: results.__setitem__(name, qw)
