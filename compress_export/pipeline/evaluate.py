"""Perplexity on the shared protocol (../shared/README.md), through our own loader.

Tokenize the text whole (no BOS), take non-overlapping 512-token windows from the start (the first 16 by
default), average the loss over each window's 511 predicted tokens, then over windows; fp32 compute.

Beside token perplexity we report, as lm-evaluation-harness defines them, with NLL the total negative
log-likelihood in nats over the scored tokens and "scored text" the decoded text of those predicted tokens:
  word perplexity = exp(NLL / words)      byte perplexity = exp(NLL / UTF-8 bytes)
  bits per byte   = NLL / (bytes · ln 2)  = log2(byte perplexity)
So bits per byte is not a perplexity: it is the base-2 logarithm of byte perplexity (1.0 bpb ⇔ byte ppl 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

WINDOW = 512
WINDOWS = 16


@dataclass
class PerplexityResult:
    token_perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    windows: int
    tokens_scored: int
    words: int
    bytes: int
    seconds: float

    def as_dict(self):
        return asdict(self)


def eval_windows(tokenizer, text: str, window: int = WINDOW, windows: int = WINDOWS) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return cut_windows(ids, window, windows)


def cut_windows(ids: torch.Tensor, window: int = WINDOW, windows: int = WINDOWS) -> torch.Tensor:
    """The first `windows` non-overlapping `window`-token windows of the whole text's token ids [n]."""
    n = min(windows, ids.numel() // window)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one {window}-token window")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, window: int = WINDOW, windows: int = WINDOWS, batch_size: int = 4
) -> PerplexityResult:
    t0 = time.time()
    ids = eval_windows(tokenizer, text, window, windows)
    losses = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        losses.append(loss.double())
    return summarize(tokenizer, ids, torch.cat(losses), time.time() - t0)


def summarize(tokenizer, ids: torch.Tensor, loss: torch.Tensor, seconds: float = 0.0) -> PerplexityResult:
    """The protocol's numbers from per-token losses (nats) `loss` [windows, window-1] of the windows `ids`
    [windows, window], whichever engine computed them (our loader here, vLLM's prompt logprobs in validate)."""
    loss = loss.double()
    nll = float(loss.sum())
    scored = "".join(tokenizer.decode(row[1:], skip_special_tokens=False) for row in ids)
    words = len(scored.split())
    nbytes = len(scored.encode("utf-8"))
    return PerplexityResult(
        token_perplexity=math.exp(float(loss.mean(dim=1).mean())),
        word_perplexity=math.exp(nll / words),
        byte_perplexity=math.exp(nll / nbytes),
        bits_per_byte=nll / nbytes / math.log(2),
        windows=ids.shape[0],
        tokens_scored=loss.numel(),
        words=words,
        bytes=nbytes,
        seconds=seconds,
    )
