"""GGUF export (formats/gguf.py, io/gguf_file.py, `convert --format gguf`): each block type against the gguf
package's own dequantizer, the exports read back by transformers' GGUF loader (its own q/k un-permutation and
dequantization, its own tokenizer conversion) against the numbers our loader reads from the source export, and
refusals in one line before anything is written. llama.cpp itself loads and generates in the last test, where
benchmarks/vs_llamacpp.py's venv has been built (it is not a dependency)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_TEXT, make_tiny_llama
from test_cli import assert_one_line_error, cli
from transformers import AutoTokenizer

from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.formats import gguf as G
from compress_export.io.gguf_file import qk_rows

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType


def random_result(bits, sym, out_f=8, in_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    scheme = Scheme(bits=bits, group_size=32, symmetric=sym)
    G_ = in_f // 32
    codes = torch.randint(0, scheme.maxq + 1, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, G_, generator=g) * 0.1 + 1e-3).half().float()
    if sym:  # symmetric grids below 8 bits give negative scales where a group's extreme weight is positive
        scales = torch.where(torch.rand(out_f, G_, generator=g) < 0.5, -scales, scales)
    zeros = (
        torch.full((out_f, G_), scheme.sym_zero, dtype=torch.int32)
        if sym
        else torch.randint(0, scheme.maxq + 1, (out_f, G_), generator=g).int()
    )
    return QuantizedWeight(codes, scales, zeros, (torch.arange(in_f) // 32).int(), scheme)


@pytest.mark.parametrize(
    "bits,sym,ggml", [(4, True, GT.Q4_0), (4, False, GT.Q4_1), (8, True, GT.Q8_0)], ids=["Q4_0", "Q4_1", "Q8_0"]
)
def test_blocks_dequantize_by_the_gguf_package_to_our_numbers(bits, sym, ggml):
    for seed in range(4):
        qw = random_result(bits, sym, seed=seed)
        t, why = G.block_type(qw.scheme)
        assert t == int(ggml) and why == ""
        raw = G.pack_blocks(qw, t)
        assert raw.dtype == np.uint8 and raw.shape == (8, 3 * gguf.GGML_QUANT_SIZES[ggml][1])
        theirs = torch.from_numpy(gguf.quants.dequantize(raw, ggml)).float()
        ours = qw.dequantize().float()
        if ggml == GT.Q4_1:  # the block offset m = -d·z is one fp16 rounding: |error| ≤ 2^-11 |m|
            m = (qw.scales * qw.zeros).repeat_interleave(32, dim=1)
            assert ((theirs - ours).abs() <= m.abs() * 2.0**-11 + 1e-12).all()
        else:
            assert torch.equal(theirs, ours)


def test_rtn_q4_0_is_llamacpps_own_q4_0():
    """Our symmetric 4-bit grid is llama.cpp's Q4_0 (the block's signed extreme on code 0, d = extreme / −8): RTN
    g32 packed as Q4_0 against the gguf package's port of llama.cpp's reference quantizer. d is bit-identical in
    every block; the codes may differ only where the weight sits at a rounding boundary (llama.cpp rounds with
    d before its fp16 rounding, and half up)."""
    from compress_export.math.quant import rtn_quantize

    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    W[3, 5], W[7, 40] = 0.9, -0.9  # an outlier of each sign
    ours = G.pack_blocks(rtn_quantize(W, Scheme(4, 32)), G.Q4_0).reshape(-1, 18)
    theirs = gguf.quants.quantize(W.numpy(), GT.Q4_0).reshape(-1, 18)
    assert np.array_equal(ours[:, :2], theirs[:, :2])
    d = torch.from_numpy(theirs[:, :2].copy().view(np.float16).astype(np.float32)).view(64, 8, 1)
    x = W.view(64, 8, 32) / d
    near_tie = ((x - x.floor() - 0.5).abs() < 1e-2).view(-1, 32)
    mine, llama = (
        torch.from_numpy(gguf.quants.dequantize(b.reshape(64, -1), GT.Q4_0)).view(-1, 32) for b in (ours, theirs)
    )
    assert torch.equal(mine[~near_tie], llama[~near_tie])
    assert (d.view(64, 8)[3, 0] < 0) and (d.view(64, 8)[7, 1] > 0)  # a positive extreme gets a negative d


def test_one_block_by_hand():
    """Q4_0 of codes 0..15, 15..0 with d = 0.5: bytes are d's fp16 (0x3800 little-endian) and nibble pairs."""
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.uint8)
    qw = QuantizedWeight(
        codes, torch.tensor([[0.5]]), torch.tensor([[8]]), torch.zeros(32, dtype=torch.int32), Scheme(4, 32)
    )
    raw = G.pack_blocks(qw, G.Q4_0)[0]
    assert list(raw[:2]) == [0x00, 0x38]
    assert list(raw[2:]) == [j | ((15 - j) << 4) for j in range(16)]


@pytest.mark.parametrize(
    "scheme,needle",
    [
        (Scheme(4, 64), "--group-size 32"),
        (Scheme(3, 32), "3-bit"),
        (Scheme(4, 32, act_order="group"), "act-order"),
        (Scheme(8, 32, symmetric=False), "Q8_0 has no zero point"),
        (Scheme(8, -1, act_bits=8), "int8 activations"),
        (None, "pruned"),
    ],
)
def test_what_no_block_type_holds_is_refused_with_the_reason(scheme, needle):
    t, why = G.block_type(scheme)
    assert t is None and needle in why


def test_qk_rows_by_hand():
    assert qk_rows(4, 1).tolist() == [0, 2, 1, 3]
    assert qk_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture(scope="module")
def bpe_family(tmp_path_factory):
    """family → a tiny random model of it with a byte-level BPE tokenizer (what GGUF's gpt2 tokenizer holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TINY_TEXT], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def get(family: str = "llama", vocab=None) -> Path:
        key = f"{family}-{vocab}"
        if key not in made:
            made[key] = make_tiny_llama(
                root / f"bpe-{key}", tie=False, max_pos=256, tokenizer=hf_tok, model_type=family, vocab=vocab
            )
        return made[key]

    return get


@pytest.fixture(scope="module")
def bpe_llama(bpe_family):
    return bpe_family("llama")


def gguf_file(folder: Path) -> Path:
    (f,) = sorted(folder.glob("*.gguf"))
    return f


def transformers_reads(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = gguf_file(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=f.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=f.name)


@pytest.mark.parametrize(
    "family,flags,ggml",
    [
        ("llama", (), "Q4_0"),
        ("llama", ("--asym",), "Q4_1"),
        ("llama", ("--bits", "8"), "Q8_0"),
        ("qwen2", (), "Q4_0"),  # q/k/v biases, no row interleaving
    ],
    ids=["llama-Q4_0", "llama-Q4_1", "llama-Q8_0", "qwen2-Q4_0"],
)
def test_tiny_models_through_gguf_read_back_in_transformers(bpe_family, tmp_path, family, flags, ggml):
    bpe_llama = bpe_family(family)
    from compress_export import load_model
    from compress_export.io.export_check import check_export
    from compress_export.io.loading import read_export

    exp, out = tmp_path / "exp", tmp_path / "g"
    fmt = "compressed-tensors" if "--asym" in flags else "gptq"  # CT stores any zero point (GPTQ v1 not 0)
    rc, so, err = cli("--method", "rtn", "--group-size", "32", *flags, "--format", fmt, bpe_llama, "-o", exp, "-q")
    assert rc == 0, err
    rc, so, err = cli("convert", exp, "--format", "gguf", "--gguf-embeddings", "f16", "-o", out)
    assert rc == 0, err
    assert gguf_file(out).name == f"model-{ggml}.gguf"
    reader = gguf.GGUFReader(str(gguf_file(out)))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (
        kinds["blk.0.attn_q.weight"] == ggml
        and kinds["output.weight"] == "F16"
        and kinds["output_norm.weight"] == "F32"
    )
    model, tok = transformers_reads(out)
    _, qweights, _ = read_export(check_export(exp))
    sd = model.state_dict()
    for name, qw in qweights.items():
        ours, theirs = qw.dequantize().float(), sd[f"{name}.weight"]
        bound = (qw.scales * qw.zeros).abs().repeat_interleave(32, dim=1) * 2.0**-11 if ggml == "Q4_1" else 0
        assert ((theirs - ours).abs() <= bound + 0).all(), name
    ours_model, ours_tok = load_model(exp)
    text = "the quick brown fox , a stitch in time"
    ids = ours_tok(text, return_tensors="pt").input_ids
    assert tok(text).input_ids == ids[0].tolist()  # the tokenizer survives the trip
    with torch.no_grad():
        a, b = model(ids).logits, ours_model(ids).logits
    assert (a - b).abs().max() < (1e-2 if ggml == "Q4_1" else 1e-4)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card[4 : card.index("\n---", 4)])
    assert "gguf" in meta["tags"] and f"model-{ggml}.gguf" in card


def test_q8_0_embeddings_by_default_and_overwrite_only_our_gguf(bpe_llama, tmp_path):
    exp, out = tmp_path / "exp", tmp_path / "g"
    assert cli("--method", "rtn", "--group-size", "32", bpe_llama, "-o", exp, "-q")[0] == 0
    assert cli("convert", exp, "--format", "gguf", "-o", out)[0] == 0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_file(out))).tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["output.weight"] == "Q8_0"
    rc, so, err = cli("convert", exp, "--format", "gguf", "-o", out)
    assert rc == 2 and "exists" in err
    rc, so, err = cli("convert", exp, "--format", "gguf", "-o", out, "--overwrite")
    assert rc == 0, err  # a GGUF folder we wrote (its mark) may be replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, so, err = cli("convert", exp, "--format", "gguf", "-o", foreign, "--overwrite")
    assert rc == 2 and (foreign / "notes.txt").read_text() == "mine"


def test_refusals_come_before_anything_is_written(bpe_llama, tiny_model, tmp_path):
    g64 = tmp_path / "g64"
    assert cli("--method", "rtn", "--group-size", "64", bpe_llama, "-o", g64, "-q")[0] == 0
    rc, so, err = cli("convert", g64, "--format", "gguf", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--group-size 32")
    olmo = tmp_path / "olmo"
    make_tiny_llama(tmp_path / "olmo-src", model_type="olmo")
    assert cli("--method", "rtn", "--group-size", "32", tmp_path / "olmo-src", "-o", olmo, "-q")[0] == 0
    rc, so, err = cli("convert", olmo, "--format", "gguf", "-o", tmp_path / "y")
    assert_one_line_error(rc, err, "model_type 'olmo'")
    wordlevel = tmp_path / "wl"  # the conftest tiny model's tokenizer is word-level, which GGUF's gpt2 cannot hold
    assert cli("--method", "rtn", "--group-size", "32", tiny_model, "-o", wordlevel, "-q")[0] == 0
    rc, so, err = cli("convert", wordlevel, "--format", "gguf", "-o", tmp_path / "z")
    assert_one_line_error(rc, err, "byte-level BPE", "WordLevel")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["g64", "olmo", "olmo-src", "wl"])


LLAMA_VENV = Path.home() / ".cache" / "compress-export" / "llamacpp-venv" / "bin" / "python"


def llamacpp_ready() -> bool:
    if not LLAMA_VENV.exists():
        return False
    return subprocess.run([str(LLAMA_VENV), "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not llamacpp_ready(), reason="llama-cpp-python's venv is not built (benchmarks/vs_llamacpp.py)")
def test_llamacpp_loads_our_smollm2_gguf_and_generates(smollm2, tmp_path):
    exp, out = tmp_path / "exp", tmp_path / "g"
    assert cli("--method", "rtn", "--group-size", "32", smollm2, "-o", exp, "-q")[0] == 0
    assert cli("convert", exp, "--format", "gguf", "-o", out)[0] == 0
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)\n"
        "r = m.create_completion('The capital of France is', max_tokens=8, temperature=0)\n"
        "print(json.dumps(r['choices'][0]['text']))\n"
    )
    r = subprocess.run([str(LLAMA_VENV), "-c", code, str(gguf_file(out))], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = json.loads(r.stdout.strip().splitlines()[-1])
    # against our loader on the export the file was converted from: the same first greedy token (llama.cpp rounds
    # Q4_0 matmuls' activations to Q8_0, so later tokens may part ways); a misread block would not agree
    from compress_export.io.loading import load_model

    tok = AutoTokenizer.from_pretrained(str(exp))
    model, _ = load_model(exp)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    assert text.strip() and text.startswith(tok.decode([first])), (text, tok.decode([first]))


def test_format_gguf_runs_the_pass_and_writes_one_file(bpe_llama, tiny_model, tiny_text, tmp_path):
    out = tmp_path / "g"
    rc, so, err = cli(
        "--format",
        "gguf",
        "--method",
        "gptq",
        "--dataset",
        tiny_text,
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        bpe_llama,
        "-o",
        out,
    )
    assert rc == 0, err
    assert "gptq → gguf" in so and "'group_size': 32" in so  # group size auto → GGUF's block
    assert sorted(p.name for p in out.iterdir()) == [".compress-export-gguf", "README.md", "model-Q4_0.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # the intermediate export is gone
    model, _ = transformers_reads(out)
    assert model.config.num_hidden_layers == 2
    for flags, needle in [
        (("--group-size", "64"), "--group-size 32"),
        (("--lowrank-rank", "4"), "low-rank"),
        (("--bits", "3"), "3-bit"),
    ]:
        rc, so, err = cli("--format", "gguf", *flags, "--method", "rtn", bpe_llama, "-o", tmp_path / "x")
        assert_one_line_error(rc, err, "--format gguf", needle)
    rc, so, err = cli("--format", "gguf", "--method", "rtn", tiny_model, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "byte-level BPE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_a_padded_vocabulary_gets_one_token_per_embedding_row(bpe_family, tmp_path):
    """vocab_size past the tokenizer's tokens (as Qwen2's 151936 over 151665): llama.cpp wants a token per row."""
    src = bpe_family("llama", vocab=352)
    exp, out = tmp_path / "exp", tmp_path / "g"
    assert cli("--method", "rtn", "--group-size", "32", src, "-o", exp, "-q")[0] == 0
    assert cli("convert", exp, "--format", "gguf", "-o", out)[0] == 0
    reader = gguf.GGUFReader(str(gguf_file(out)))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 352
    model, tok = transformers_reads(out)
    assert model.get_input_embeddings().weight.shape[0] == 352
    assert (
        tok("the quick brown fox").input_ids == AutoTokenizer.from_pretrained(str(src))("the quick brown fox").input_ids
    )


def test_format_gguf_under_torchrun_is_refused_before_any_work(bpe_llama, tmp_path, monkeypatch):
    from compress_export import CompressionConfig, compress
    from compress_export.core.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="convert OUT --format gguf"):
        compress(str(bpe_llama), str(tmp_path / "g"), CompressionConfig(method="rtn", format="gguf"))
    assert list(tmp_path.iterdir()) == []
