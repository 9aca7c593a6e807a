"""Recovery by layer-wise distillation (modifiers/recover.py, math/reconstruct.py): what is trained starts exactly at
the pass's result, a layer's reconstruction error against the original falls, a 2:4 mask stays 2:4, the trained
result is what the export holds, and it runs only when asked for."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, recorder

from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity, nm_mask
from compress_export.math.quant import rtn_quantize
from compress_export.math.reconstruct import Trainable, normalized_mse
from compress_export.modifiers.base import PlanContext
from compress_export.modifiers.recover import Recover
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig


def _rtn(out_f=16, in_f=64, bits=3, seed=0, mask=None):
    torch.manual_seed(seed)
    qw = rtn_quantize(torch.randn(out_f, in_f), Scheme(bits, 32, True, "none"))
    if mask is not None:
        qw.mask = mask
        qw.codes = torch.where(mask, qw.codes, qw.zeros[:, qw.g_idx.long()].to(qw.codes.dtype))
    return qw


def test_trainable_starts_at_the_pass_result_exactly():
    qw = _rtn()
    t = Trainable(qw)
    assert torch.equal(t.weight().detach(), qw.dequantize())  # v = 0, m = 1: the pass's weight, not a rounding of it
    back = t.result()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)


def test_codes_move_at_most_one_step_and_scales_stay_fp16_exact():
    qw = _rtn(bits=4)
    t = Trainable(qw)
    with torch.no_grad():
        t.v.uniform_(-0.5, 0.5)
        t.m.fill_(1.1)
    r = t.result()
    w0_codes = qw.dequantize() / (qw.scales * 1.1)[:, qw.g_idx.long()] + qw.zeros[:, qw.g_idx.long()].float()
    assert (r.codes.float() - w0_codes.round()).abs().max() <= 1
    assert r.codes.min() >= 0 and r.codes.max() <= 15
    assert torch.equal(r.scales, r.scales.half().float())


def test_signed_steps_fit_a_linear_output():
    """One linear, fitted to its float outputs on correlated inputs (as activations are): the trained result's
    output error is well below RTN's, both computed directly from the weights."""
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.05
    x = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.3 * torch.randn(2048, 256)
    qw = rtn_quantize(w, Scheme(3, 32, True, "none"))
    t, steps = Trainable(qw, original=w), 100
    for s in range(steps):
        rows = torch.randint(0, 2048, (256,))
        normalized_mse(x[rows] @ t.weight().T, x[rows] @ w.T).backward()
        t.step(1.0 / steps * (1 - s / steps))
    trained = t.result()
    err = lambda q: float(normalized_mse(x @ q.dequantize().T, x @ w.T))  # noqa: E731
    assert err(trained) < 0.5 * err(qw)  # measured: 0.0088 vs 0.0427
    assert (trained.codes.float() - qw.codes.float()).abs().max() <= 1  # no code moves more than one step


def test_pruned_values_train_with_the_mask_fixed():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    mask = nm_mask(w.abs(), 2, 4)
    sw = SparseWeight(values=w * mask, mask=mask, sparsity=Sparsity.parse("2:4"))
    x = torch.randn(128, 64)
    t = Trainable(sw, values_lr=1e-2)
    for _ in range(20):
        normalized_mse(x @ t.weight().T, x @ w.T).backward()
        t.step(1.0)
    r = t.result()
    assert torch.equal(r.mask, mask) and not r.values[~mask].any()  # still 2:4, pruned places exactly 0
    assert (r.values.view(16, -1, 4) != 0).sum(-1).max() <= 2
    assert float(normalized_mse(x @ r.values.T, x @ w.T)) < float(normalized_mse(x @ sw.values.T, x @ w.T))


def _plan(**kw):
    cfg = CompressionConfig(**kw)
    scheme = cfg.to_scheme()
    return Recover.plan(cfg, PlanContext(scheme=scheme, method=cfg.resolved_method(), model_type="llama"))


def test_off_unless_asked_for():
    assert _plan(method="gptq") is None and _plan(method="gptq", bits=3) is None
    assert _plan(method="gptq", recover="none") is None
    assert _plan(method="gptq", recover="kd").steps == 100
    assert _plan(method="gptq", recover="kd", recover_steps=0) is None
    assert _plan(method="sparsegpt", sparsity="2:4", recover="kd", recover_steps=7).steps == 7
    with pytest.raises(UserError, match="--recover kd trains weight-only"):
        _plan(method="gptq", scheme="W8A8", recover="kd")
    with pytest.raises(UserError, match="recover must be kd or none"):
        CompressionConfig(recover="yes")


def _run(tiny_model, tiny_text, out, **kw):
    results, on_result = recorder()
    cfg = CompressionConfig(dataset=str(tiny_text), num_samples=8, seq_len=32, group_size=32, **kw)
    s = compress(tiny_model, out, cfg, progress=False, on_result=on_result)
    return s, results


def test_recovery_lowers_each_layers_error_and_the_export_holds_it(tiny_model, tiny_text, tmp_path):
    s0, plain = _run(tiny_model, tiny_text, tmp_path / "plain", method="rtn", bits=3)
    s1, kd = _run(tiny_model, tiny_text, tmp_path / "kd", method="rtn", bits=3, recover="kd", recover_steps=30)
    assert "kd 30 steps/layer" in s1.recover and not s0.recover
    rec = s1.recover.split("mean layer loss ")[1]
    before, after = (float(x) for x in rec.split(" → "))
    assert after < before
    changed = sum(not torch.equal(plain[n].codes, kd[n].codes) for n in plain)
    assert changed > len(plain) // 2  # the training moved codes in most linears
    assert_written_as_computed(tmp_path / "kd", kd)  # the trained results are what was written
    extra = json.loads((tmp_path / "kd" / "config.json").read_text())["quantization_config"]["compress_export"]
    assert extra["recover"]["method"] == "kd" and extra["recover"]["steps"] == 30


def test_recovery_keeps_2_4(tiny_model, tiny_text, tmp_path):
    _, res = _run(
        tiny_model, tiny_text, tmp_path / "s", method="sparsegpt", sparsity="2:4", recover="kd", recover_steps=10
    )
    for name, r in res.items():
        assert isinstance(r, SparseWeight)
        nz = (r.values.view(r.values.shape[0], -1, 4) != 0).sum(-1)
        assert nz.max() <= 2 and torch.equal(r.values != 0, (r.values != 0) & r.mask), name
    assert_written_as_computed(tmp_path / "s", res)


def test_recovery_refuses_a_distributed_run(monkeypatch):
    from compress_export.modifiers.base import RunContext

    class D:
        active = True

    with pytest.raises(UserError, match="--recover none"):
        Recover(5).before_pass(RunContext(src=None, layout=None, dist=D()))


def test_quantized_with_mask_keeps_pruned_codes_at_zero():
    torch.manual_seed(3)
    mask = torch.rand(16, 64) > 0.5
    qw = _rtn(bits=4, mask=mask)
    t = Trainable(qw)
    with torch.no_grad():
        t.v.uniform_(-0.5, 0.5)
    r = t.result()
    assert isinstance(r, QuantizedWeight)
    assert torch.equal(r.dequantize()[~mask], torch.zeros(int((~mask).sum())))


def test_gptq_records_rounding_positions_only_for_a_modifier_that_reads_them(tiny_model, tiny_text, tmp_path):
    """With an identity Hessian GPTQ has no error to feed forward: each weight's position before rounding is
    w / scale + zero, so its recorded offset is that minus its code (within ±1/2 where it was not clipped). The
    plan asks for them only with --recover kd (an [in, out] buffer per sweep otherwise)."""
    from compress_export.math.sweep import gptq_quantize
    from compress_export.pipeline.plan import resolve

    torch.manual_seed(3)
    w = torch.randn(8, 64)
    scheme = Scheme(4, 32, True, "none")
    assert gptq_quantize(w, torch.eye(64), scheme).offsets is None
    qw = gptq_quantize(w, torch.eye(64), scheme, damp=0.0, record_offsets=True)
    g = qw.g_idx.long()
    position = w / qw.scales[:, g] + qw.zeros[:, g].float()
    inside = (position - qw.codes.float()).abs() <= 0.5
    assert inside.float().mean() > 0.9
    assert torch.allclose(qw.offsets[inside], (position - qw.codes.float())[inside], atol=1e-5)
    cfg = dict(dataset=str(tiny_text), num_samples=8, seq_len=32, group_size=32)
    assert not resolve(CompressionConfig(**cfg), tiny_model, tmp_path / "a").the_pass.options.record_offsets
    plan = resolve(CompressionConfig(recover="kd", **cfg), tiny_model, tmp_path / "b")
    assert plan.the_pass.options.record_offsets


def test_norm_training_writes_the_trained_norms(tiny_model, tiny_text, tmp_path, monkeypatch):
    """With a rate for the layers' norm weights the layer losses still fall, and the export's norm tensors are the
    trained ones: different from the source's, which the linears-only run writes unchanged."""
    from safetensors.torch import load_file

    from compress_export.modifiers import recover

    def norms(folder):
        tensors = {}
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(str(f)).items() if k.endswith("layernorm.weight")})
        return tensors

    kw = dict(method="rtn", bits=3, recover="kd", recover_steps=30)
    _run(tiny_model, tiny_text, tmp_path / "lin", **kw)
    monkeypatch.setattr(recover, "NORMS_LR", 1e-3)
    s1, _ = _run(tiny_model, tiny_text, tmp_path / "norms", **kw)
    before, after = (float(x) for x in s1.recover.split("mean layer loss ")[1].split(" → "))
    assert after < before
    src, lin, trained = norms(tiny_model), norms(tmp_path / "lin"), norms(tmp_path / "norms")
    assert src and sorted(src) == sorted(lin) == sorted(trained)
    assert all(torch.equal(src[k], lin[k]) for k in src)
    assert sum(not torch.equal(src[k], trained[k]) for k in src) >= len(src) // 2
    extra = json.loads((tmp_path / "norms" / "config.json").read_text())["quantization_config"]["compress_export"]
    assert extra["recover"]["norms_lr"] == 1e-3 and extra["recover"]["train_dtype"] in ("float32", "bfloat16")


def test_training_matmuls_run_in_the_machines_fast_dtype(monkeypatch):
    """bf16 autocast for the steps only where bf16 is this machine's fast dtype (COMPRESS_EXPORT_DTYPE stands in
    for the CPU kind here); other devices train in float32."""
    from compress_export.modifiers.recover import train_in_bf16

    monkeypatch.setenv("COMPRESS_EXPORT_DTYPE", "float32")
    assert not train_in_bf16("cpu")
    monkeypatch.setenv("COMPRESS_EXPORT_DTYPE", "bfloat16")
    assert train_in_bf16("cpu") and not train_in_bf16("mps")
