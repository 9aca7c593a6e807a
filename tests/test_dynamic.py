"""GPTQ checkpoints whose modules differ in scheme: GPTQModel's per-module overrides (`dynamic` in
quantization_config: a regex over the module's name → its bits and group size, or "-:" for a module left
unquantized). The independent fact: a mixed checkpoint spliced by hand from a W4 and a W8 export of the same model
(and one original weight) computes what the model with each module's weights from its own export computes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.formats.gptq import GPTQConfig, dynamic_override
from compress_export.io.export_check import check_export
from compress_export.io.loading import load_model, read_export
from compress_export.pipeline.compress import compress

DOWN = r"+:.*\.mlp\.down_proj"
O_PROJ0 = r"-:model\.layers\.0\.self_attn\.o_proj"


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    """(the mixed checkpoint, {module: the float32 weight it must compute with})."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("dynamic")
    exports = {}
    for bits in (4, 8):
        compress(tiny_model, tmp / f"w{bits}", method="rtn", fmt="gptq", scheme=Scheme(bits, 32, True), progress=False)
        exports[bits] = tmp / f"w{bits}"
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).state_dict()
    out = tmp / "mixed"
    shutil.copytree(exports[4], out)
    tensors, eight = _tensors(exports[4]), _tensors(exports[8])
    for f in out.glob("*.safetensors"):
        f.unlink()
    o0 = "model.layers.0.self_attn.o_proj"
    tensors = {k: v for k, v in tensors.items() if not k.startswith(o0 + ".")}
    tensors[o0 + ".weight"] = original[o0 + ".weight"].to(torch.bfloat16)
    tensors.update({k: v for k, v in eight.items() if ".mlp.down_proj." in k})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {O_PROJ0: {}, DOWN: {"bits": 8}}
    (out / "config.json").write_text(json.dumps(cfg))
    want = {}
    for bits, folder in exports.items():
        _, qweights, _ = read_export(check_export(folder))
        for name, qw in qweights.items():
            if (".mlp.down_proj" in name) == (bits == 8):
                want[name] = qw.dequantize()
    want[o0] = original[o0 + ".weight"].to(torch.bfloat16).float()
    return out, want


def test_the_first_matching_rule_decides_as_in_vllm():
    rules = {O_PROJ0: {}, DOWN: {"bits": 8}, r"model\.layers\.1\.": {"group_size": 64}}
    assert dynamic_override(rules, "model.layers.0.self_attn.o_proj") is False
    assert dynamic_override(rules, "model.layers.1.self_attn.o_proj") == {"group_size": 64}
    assert dynamic_override(rules, "model.layers.1.mlp.down_proj") == {"bits": 8}  # the earlier rule wins
    assert dynamic_override(rules, "model.layers.0.mlp.up_proj") is None
    assert dynamic_override(rules, "lm_head.model.layers.1.x") is None  # anchored at the start, as re.match is
    try:
        from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override
    except ImportError:
        return
    cfg = type("Cfg", (), {"dynamic": rules})()
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        assert get_dynamic_override(cfg, name) == dynamic_override(rules, name), name


def test_a_mixed_checkpoint_reads_each_module_at_its_own_scheme(mixed):
    out, want = mixed
    info = check_export(out)  # every module's tensors checked against the layout of its own scheme
    assert info.packed["model.layers.0.mlp.down_proj"] == (128, 64)
    assert "model.layers.0.self_attn.o_proj" not in info.packed
    _, qweights, rest = read_export(info)
    assert {n: qw.scheme.bits for n, qw in qweights.items() if "down_proj" in n} == {
        "model.layers.0.mlp.down_proj": 8,
        "model.layers.1.mlp.down_proj": 8,
    }
    assert qweights["model.layers.1.self_attn.o_proj"].scheme.bits == 4
    for name, qw in qweights.items():
        torch.testing.assert_close(qw.dequantize(), want[name], rtol=0, atol=0)
    assert "model.layers.0.self_attn.o_proj.weight" in rest


def test_a_mixed_checkpoint_computes_what_its_spliced_weights_compute(mixed, tiny_model):
    from transformers import AutoModelForCausalLM

    from compress_export import AutoCompressedModelForCausalLM

    out, want = mixed
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        for name, w in want.items():
            ref.get_submodule(name).weight.copy_(w)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(out)
    theirs = AutoCompressedModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        expect = ref(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expect, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(input_ids=ids).logits, expect, rtol=1e-4, atol=1e-4)


def test_vllm_runs_a_mixed_checkpoint_with_its_own_method_only_where_it_has_every_width(mixed, monkeypatch):
    """vLLM's CPU GPTQ method takes 4-bit only, its GPU one 4 and 8 bits symmetric: ours claims the checkpoint on
    the CPU, and on a GPU unless vLLM has a kernel for every scheme (then its own method reads the overrides)."""
    from transformers import AutoConfig

    from compress_export.formats.base import FORMATS
    from compress_export.integrations import vllm_route

    out, _ = mixed
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = FORMATS.get("gptq")()
    assert [s.bits for s in fmt.module_schemes(qcfg)] == [4, 8]
    hf = AutoConfig.from_pretrained(str(out))
    on_cpu = vllm_route.mixed_route(fmt, qcfg, "cpu", torch.float32, hf)
    assert on_cpu.claim and "4/8 bits" in on_cpu.reason, on_cpu
    asked = []

    def native(c, act_dtype, hf_config):  # vLLM's GPU method, as its configs accept: 4 and 8 bits
        asked.append(c["bits"])
        return ("gptq_marlin", "ok") if c["bits"] in (4, 8) else (None, f"vLLM refuses {c['bits']} bits")

    monkeypatch.setattr(vllm_route, "vllm_native", native)
    monkeypatch.setattr(vllm_route, "our_kernel", lambda s, *a: "cuda-wna16")
    assert not vllm_route.mixed_route(fmt, qcfg, "cuda", torch.float16, hf).claim
    assert asked == [4, 8] and all("dynamic" not in c for c in fmt.module_configs(qcfg))
    three = {**qcfg, "dynamic": {**qcfg["dynamic"], DOWN: {"bits": 3}}}
    route = vllm_route.mixed_route(fmt, three, "cuda", torch.float16, hf)
    assert route.claim and "vLLM refuses 3 bits" in route.reason, route


def test_our_rules_select_in_vllm_what_we_meant_fused_names_and_layer_1_against_10():
    from compress_export.formats.gptq import dynamic_rules

    base = Scheme(4, 64, True)
    overrides = {f"model.layers.1.self_attn.{x}_proj": Scheme(8, 64, True) for x in "qkv"}
    overrides.update({"model.layers.10.mlp.down_proj": Scheme(3, 64, True)})
    overrides.update({f"model.layers.1.mlp.{x}_proj": Scheme(3, 64, True) for x in ("gate", "up")})
    rules = dynamic_rules(overrides, base)
    want = {
        "model.layers.1.self_attn.qkv_proj": {"bits": 8},
        "model.layers.1.self_attn.k_proj": {"bits": 8},
        "model.layers.1.mlp.gate_up_proj": {"bits": 3},
        "model.layers.10.mlp.down_proj": {"bits": 3},
        "model.layers.1.mlp.down_proj": None,
        "model.layers.10.self_attn.qkv_proj": None,
        "model.layers.10.mlp.gate_up_proj": None,
    }
    assert {n: dynamic_override(rules, n) for n in want} == want
    try:
        from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override
    except ImportError:
        return
    cfg = type("Cfg", (), {"dynamic": rules})()
    assert {n: get_dynamic_override(cfg, n) for n in want} == want


def test_a_mixed_checkpoint_is_refused_where_one_scheme_is_assumed(mixed, tmp_path):
    from compress_export.pipeline.convert import convert

    out, _ = mixed
    with pytest.raises(UserError, match="per-module overrides"):
        convert(out, "compressed-tensors", str(tmp_path / "ct"))
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(
    "rules,match",
    [
        ({DOWN: {"bits": 5}}, "5 bits"),
        ({DOWN: {"adapter": "lora"}}, "'adapter' is not read"),
        ({DOWN: {"bits": "8"}}, "bits must be int"),
        ({"+:(": {"bits": 8}}, "not a regular expression"),
        ({DOWN: 8}, "must be a mapping"),
        ([DOWN], "must map module patterns"),
    ],
)
def test_overrides_that_cannot_be_read_exactly_are_refused_naming_the_rule(rules, match):
    qcfg = GPTQConfig(4, 32, True).to_dict()
    qcfg["dynamic"] = rules
    with pytest.raises(UserError, match=match):
        GPTQConfig.parse(qcfg)


def test_keys_that_only_steered_the_quantizer_are_read_past():
    from compress_export.formats.base import FORMATS

    qcfg = GPTQConfig(4, 32, True).to_dict()
    qcfg["dynamic"] = {DOWN: {"bits": 8, "damp_percent": 0.05}}
    own = FORMATS.get("gptq")().module_config(qcfg, "model.layers.0.mlp.down_proj")
    assert own["bits"] == 8 and own["damp_percent"] == qcfg["damp_percent"] == 0.01 and "dynamic" not in own


def test_overrides_survive_a_parse_and_write_and_a_uniform_config_gains_no_key():
    qcfg = GPTQConfig(4, 32, True).to_dict()
    assert "dynamic" not in qcfg
    qcfg["dynamic"] = {DOWN: {"bits": 8, "group_size": 64}}
    assert GPTQConfig.parse(qcfg).to_dict() == qcfg
