"""Logit conformance between engines: our loader's predictions against another engine's on the same tokens.

vLLM reports log-probabilities (log-softmax of its logits), not raw logits, so the gap is measured on those:
for the token vLLM ranks first at each position, |our log p − vLLM's log p|. Log-softmax differs from the
logits only by a per-position constant, so this is the logit gap with that constant removed.
"""

from __future__ import annotations

from pathlib import Path

import torch


def first_window_ids(model_dir, text_path, window: int = 512) -> list:
    """Token ids of the first evaluation window of a text, as the shared protocol cuts it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    ids = tok(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return ids[:window]


@torch.no_grad()
def compare_top1(export_dir, ids: list, other: dict, mode: str = "dequant") -> dict:
    """Agreement of our loader's top-1 next token with `other` ({"top1": [...], "top1_logprob": [...]},
    one entry per position 1..n-1) and the largest log-probability gap on the other engine's top-1 tokens."""
    from compress_export.io.loading import load_model

    model, _ = load_model(export_dir, mode=mode)
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    theirs = torch.tensor(other["top1"])
    agree = (logp.argmax(dim=-1) == theirs).float().mean().item()
    gap = (logp.gather(1, theirs[:, None])[:, 0] - torch.tensor(other["top1_logprob"])).abs().max().item()
    return {"positions": len(theirs), "top1_agreement": round(agree, 4), "max_abs_dlogprob": float(f"{gap:.3g}")}


@torch.no_grad()
def compare_reference(export_dir, text_path, window: int = 512) -> dict:
    """Our loader against transformers' own loading of the export (for compressed-tensors: its quantizer
    decompresses the packed tensors with the compressed-tensors library): top-1 agreement and max |Δlogit|."""
    from transformers import AutoModelForCausalLM

    from compress_export.io.loading import load_model

    ids = torch.tensor([first_window_ids(export_dir, text_path, window)])
    ours, _ = load_model(export_dir)
    ref = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32, trust_remote_code=False).eval()
    a, b = ours(input_ids=ids).logits[0].float(), ref(input_ids=ids).logits[0].float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {
        "positions": ids.shape[1],
        "top1_agreement": round(agree, 4),
        "max_abs_dlogit": float(f"{(a - b).abs().max().item():.3g}"),
    }
