"""Every model family structure.py lists, end to end on a tiny random model: export (RTN W8 and GPTQ W4), load
with our loader, logits close to the original's. A family that cannot pass this is not listed."""

import json

import pytest
import torch
from conftest import _tiny_tokenizer
from test_streaming import assert_same_export, tensors

from compress_export.core.moe import EXPERT_NAMES
from compress_export.core.scheme import Scheme
from compress_export.core.structure import FAMILIES
from compress_export.io.loading import load_model
from compress_export.pipeline.compress import compress

SMALL = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=True,
)
# per family: the config fields it names differently or needs besides SMALL
EXTRA = {
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=16,
    ),
    "gpt_neox": dict(rotary_pct=1.0),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True),
}
TYPES = sorted(t for fam in FAMILIES for t in fam.model_types)


def tiny(path, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **EXTRA.get(model_type, {})})
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    _tiny_tokenizer().save_pretrained(str(path))
    return path


@pytest.mark.parametrize("model_type", TYPES)
def test_family_end_to_end(model_type, tmp_path, tiny_text):
    base = tiny(tmp_path / "base", model_type)
    ref, _ = load_model(base)
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    for name, kw, tol in (
        ("w8", dict(method="rtn", scheme=Scheme(8, -1, True)), 0.05),
        ("w4", dict(method="gptq", scheme=Scheme(4, 32, True), dataset=str(tiny_text), num_samples=8, seq_len=32), 0.3),
    ):
        s = compress(base, tmp_path / name, progress=False, **kw)
        assert s.linears > 0 and not s.kept_dense, s
        fused = sorted(n for n, p in ref.named_parameters() if p.dim() == 3)  # transformers 5's fused experts
        assert sorted(s.fused_dense) == fused, s  # reported as unquantized, never silently
        assert ("fused MoE" in "\n".join(s.lines())) == bool(fused)
        qc = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert {n.rpartition(".")[0] for n in fused} <= set(qc["modules_not_quantized"])  # and listed as dense
        if model_type in EXPERT_NAMES:  # unfused (core/moe.py): every expert's linears packed, none fused
            block = "block_sparse_moe" if model_type == "mixtral" else "mlp"  # as its checkpoints and vLLM name it
            down = f"model.layers.1.{block}.experts.3.{EXPERT_NAMES[model_type][2]}.qweight"
            assert not fused and down in tensors(tmp_path / name)
        model, _ = load_model(tmp_path / name)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tol, (name, rel)
        # read a layer at a time from the shards wherever the names map one to one (fused experts need
        # transformers' own loader): the very export the whole model in memory gives
        assert s.streamed == (not fused), s
        if s.streamed:
            compress(base, tmp_path / (name + "-memory"), progress=False, stream=False, **kw)
            assert_same_export(tmp_path / name, tmp_path / (name + "-memory"))
