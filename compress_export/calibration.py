"""Calibration data: a .txt, a .jsonl with a `text` field, a local `datasets` directory, or none (data-free).

Files are tokenized whole and cut into the first N non-overlapping chunks of seq_len tokens, no shuffling, so
the same file always gives the same samples. Without a dataset the model writes its own calibration text
(data-free, as in LLM-QAT): each sample starts from a seeded random token and is sampled from the model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

log = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    if path.is_dir():
        try:
            import datasets  # noqa: F401
            from datasets import load_from_disk
        except ImportError:
            raise UserError(f"--dataset {path} is a directory: reading it needs the `datasets` package") from None
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            ds = ds[list(ds.keys())[0]]
        if "text" not in ds.column_names:
            raise UserError(f"--dataset {path}: no `text` column (columns: {', '.join(ds.column_names)})")
        return "\n\n".join(ds["text"])
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--dataset {path}:{i}: each line must be a JSON object with a `text` field") from None
        return "\n\n".join(texts)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--dataset {path} is not UTF-8 text (give .txt, .jsonl or a datasets directory)") from None


def chunk_tokens(ids: torch.Tensor, num_samples: int, seq_len: int, where: str) -> torch.Tensor:
    n = min(num_samples, ids.numel() // seq_len)
    if n == 0:
        raise UserError(f"{where} has {ids.numel()} tokens, fewer than one sample of --seq-len {seq_len}")
    if n < num_samples:
        log.warning("%s yields only %d samples of %d tokens (asked for %d)", where, n, seq_len, num_samples)
    return ids[: n * seq_len].view(n, seq_len).clone()


def check_dataset(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"--dataset {p} does not exist")
    return p


def from_file(tokenizer, path, num_samples: int, seq_len: int) -> torch.Tensor:
    p = check_dataset(path)
    text = read_text(p)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return chunk_tokens(ids, num_samples, seq_len, f"--dataset {p}")


@torch.no_grad()
def data_free(model, tokenizer, num_samples: int, seq_len: int, seed: int = 0, batch_size: int = 16,
              progress=None) -> torch.Tensor:
    """Text the model samples itself, from seeded random first tokens (temperature 1, top-k 50)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    starts = [t for t in torch.randint(0, vocab, (num_samples * 2,), generator=gen).tolist() if t not in special]
    out = []
    torch.manual_seed(seed)
    for b in range(0, num_samples, batch_size):
        first = torch.tensor(starts[b:b + min(batch_size, num_samples - b)])[:, None]
        seq = model.generate(
            input_ids=first, attention_mask=torch.ones_like(first), do_sample=True, top_k=50, temperature=1.0,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id,
        )
        out.append(seq[:, :seq_len])
        if progress:
            progress(min(b + batch_size, num_samples), num_samples)
    return torch.cat(out)


def calibration_ids(model, tokenizer, dataset: Optional[str], num_samples: int, seq_len: int,
                    seed: int = 0, progress=None) -> torch.Tensor:
    if num_samples <= 0 or seq_len <= 1:
        raise UserError("--num-samples must be ≥ 1 and --seq-len ≥ 2")
    if dataset:
        return from_file(tokenizer, dataset, num_samples, seq_len)
    return data_free(model, tokenizer, num_samples, seq_len, seed, progress=progress)
