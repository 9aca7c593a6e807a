"""Calibration data. `--dataset` takes a path or one of two reserved names:

- `builtin` (the default when --dataset is not given): compress_export/data/calibration.txt, ~40k tokens of
  varied English written for this project (narrative, expository, dialogue, verse drama, instructions, lists,
  letters, code, tables and numbers). It is cut into every whole window of seq_len tokens and num_samples of them
  are picked evenly spaced across the text, so a small set still sees every register. Reading it takes well
  under a second and needs no model. Only when more windows are asked for than it holds (77 × 512 with SmolLM2's
  tokenizer, so the default 64 × 512 fits) does the model continue seeded passages of it to fill the rest:
  KV-cached, batched sampling, slow on CPU, so large sets are better given as --dataset.
- `self`: the model writes its own calibration text (data-free, as in LLM-QAT): each sample starts from a seeded
  random token and is sampled from the model. Slow (most of a CPU run) and worse than real text; kept for models
  whose tokenizer makes the built-in text meaningless, and to reproduce older exports.
- a path: a .txt, a .jsonl with a `text` field, or a local `datasets` directory, tokenized whole and cut into the
  first N non-overlapping chunks of seq_len tokens, no shuffling. A file literally named `builtin` or `self` is
  given as ./builtin.

Every source is deterministic: the same text (and seed, where the model writes) gives the same samples.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from compress_export.core.errors import UserError
from compress_export.io import safety

log = logging.getLogger(__name__)

BUILTIN, SELF = "builtin", "self"  # the reserved --dataset names (see the module docstring)
PROMPT_TOKENS = 32  # real tokens that start each model-continued sample; the model writes the rest


def read_text(path: Path) -> str:
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise UserError(f"--dataset {path} is a directory: reading it needs the `datasets` package") from None
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            ds = ds[list(ds.keys())[0]]
        if "text" not in ds.column_names:
            raise UserError(f"--dataset {path}: no `text` column (columns: {', '.join(ds.column_names)})")
        return "\n\n".join(ds["text"])
    try:
        raw = safety.regular_file(path, "--dataset").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--dataset {path} is not UTF-8 text (give .txt, .jsonl or a datasets directory)") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError, RecursionError):
            text = None
        if not isinstance(text, str):
            raise UserError(
                f"--dataset {path}:{i}: each line must be a JSON object with a `text` field holding a string"
            )
        texts.append(text)
    return "\n\n".join(texts)


def chunk_tokens(ids: torch.Tensor, num_samples: int, seq_len: int, where: str) -> torch.Tensor:
    n = min(num_samples, ids.numel() // seq_len)
    if n == 0:
        raise UserError(f"{where} has {ids.numel()} tokens, fewer than one sample of --seq-len {seq_len}")
    if n < num_samples:
        log.warning("%s yields only %d samples of %d tokens (asked for %d)", where, n, seq_len, num_samples)
    return ids[: n * seq_len].view(n, seq_len).clone()


def check_dataset(path) -> str:
    """The reserved name as given, else the path after checking it (run in preflight, before any load): a regular
    file (a FIFO would block the run forever) or a `datasets` folder holding only regular files inside it."""
    if path in (BUILTIN, SELF):
        return path
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"--dataset {p} does not exist (give a .txt, .jsonl or datasets directory, or `{BUILTIN}` "
            f"for the built-in text, or `{SELF}` for text the model writes itself)"
        )
    if p.is_dir():
        if not any((p / n).is_file() for n in DATASETS_MARKS):
            raise UserError(
                f"--dataset {p} is a folder but not one `datasets` saved (no {' or '.join(DATASETS_MARKS)})"
                "; give a .txt or .jsonl file, or a folder written by Dataset.save_to_disk"
            )
        safety.scan_folder(p, "--dataset")
        return p
    safety.regular_file(p, "--dataset")
    return p


DATASETS_MARKS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def check_calibration_size(num_samples: int, seq_len: int, batch_size, model_config, device) -> None:
    """Refuse, before any weight is read, a calibration set the model cannot take (longer than its context) or
    whose activations cannot fit in memory: such a run would otherwise crawl for hours, then be killed."""
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and 0 < max_pos < seq_len:
        raise UserError(
            f"--seq-len {seq_len} is longer than the model's context (max_position_embeddings "
            f"{max_pos} in config.json); choose --seq-len {min(512, max_pos)} or at most {max_pos}"
        )
    if device is None or getattr(device, "type", "cpu") != "cpu":
        return  # the activations live on the GPU then; a shortage there is reported as out of memory (cli.main)
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    heads = int(getattr(model_config, "num_attention_heads", 0) or 0)
    width = max(int(getattr(model_config, "intermediate_size", 0) or 0), hidden, 1)
    batch = min(batch_size or auto_batch(num_samples, seq_len, width), num_samples)  # as the run will batch
    # a lower bound: the layer inputs and outputs of the whole set in fp32, and one batch's attention scores
    need = 2 * num_samples * seq_len * hidden * 4 + batch * heads * seq_len * seq_len * 4
    free = available_memory()
    if free and need > free:
        raise UserError(
            f"calibration with --num-samples {num_samples} × --seq-len {seq_len} needs at least "
            f"{need / 1e9:.1f} GB of memory for activations, but {free / 1e9:.1f} GB is available; "
            "lower --num-samples, --seq-len or --batch-size"
        )


SINGLE_PASS_BUDGET = 6 << 30  # bytes of activations we allow for one whole-calibration-set forward


def auto_batch(num_samples: int, seq_len: int, width: int) -> int:
    """Samples per calibration forward: the whole set (one forward per layer) when its activations fit the
    budget, else chunks. width: the model's widest activation (intermediate or hidden size)."""
    per_sample = seq_len * width * 4 * 8  # fp32, ~8 live tensors of the widest size
    if per_sample * num_samples <= SINGLE_PASS_BUDGET:
        return num_samples
    return max(1, SINGLE_PASS_BUDGET // per_sample)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), 0 when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def from_file(tokenizer, path, num_samples: int, seq_len: int) -> torch.Tensor:
    p = check_dataset(path)
    text = read_text(p)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return chunk_tokens(ids, num_samples, seq_len, f"--dataset {p}")


@torch.no_grad()
def data_free(
    model, tokenizer, num_samples: int, seq_len: int, seed: int = 0, batch_size: int = 16, progress=None
) -> torch.Tensor:
    """Text the model samples itself, from seeded random first tokens (temperature 1, top-k 50)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    starts = [t for t in torch.randint(0, vocab, (num_samples * 2,), generator=gen).tolist() if t not in special]
    out = []
    torch.manual_seed(seed)
    for b in range(0, num_samples, batch_size):
        first = torch.tensor(starts[b : b + min(batch_size, num_samples - b)])[:, None]
        seq = model.generate(
            input_ids=first,
            attention_mask=torch.ones_like(first),
            do_sample=True,
            top_k=50,
            temperature=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(seq[:, :seq_len])
        if progress:
            progress(min(b + batch_size, num_samples), num_samples)
    return torch.cat(out)


def builtin_text() -> str:
    from importlib.resources import files

    return (files("compress_export") / "data" / "calibration.txt").read_text(encoding="utf-8")


def spread_windows(ids: torch.Tensor, num_samples: int, seq_len: int) -> torch.Tensor:
    """min(num_samples, all) whole windows of seq_len tokens, evenly spaced over ids, the first one at token 0."""
    count = ids.numel() // seq_len
    take = min(num_samples, count)
    windows = ids[: count * seq_len].view(count, seq_len)
    return windows[[i * count // take for i in range(take)]].clone()


def _the_model(model):
    """`model`, or what it returns when it is a loader: a streamed source has no weights in memory, so the caller
    passes a callable and the whole model is loaded only if text must be generated."""
    return model if isinstance(model, torch.nn.Module) or not callable(model) else model()


@torch.no_grad()
def continue_passages(
    model,
    prompts: torch.Tensor,
    seq_len: int,
    seed: int,
    banned=(),
    batch_size: int = 32,
    top_k: int = 50,
    progress=None,
) -> torch.Tensor:
    """Each row of prompts [n, p] continued by the model to seq_len tokens: temperature-1 top-k sampling with a
    KV cache (one token per step after the prompt's forward), batch_size rows at a time, from a generator seeded
    here (the global RNG is left alone). `banned` ids (special tokens) are never sampled, so the text runs on
    instead of ending in an end-of-turn marker and whatever follows it."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device  # the model runs where it is; sampling stays on the CPU generator
    out = []
    for b in range(0, prompts.shape[0], batch_size):
        seq = prompts[b : b + batch_size]
        step = model(input_ids=seq.to(dev), use_cache=True)
        while seq.shape[1] < seq_len:
            logits = step.logits[:, -1].float().cpu()
            logits[:, list(banned)] = float("-inf")
            top, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            nxt = idx.gather(-1, torch.multinomial(top.softmax(-1), 1, generator=gen))
            seq = torch.cat([seq, nxt], 1)
            if seq.shape[1] < seq_len:
                step = model(input_ids=nxt.to(dev), past_key_values=step.past_key_values, use_cache=True)
        out.append(seq)
        if progress:
            progress(b + seq.shape[0], prompts.shape[0])
    return torch.cat(out)


def from_builtin(model, tokenizer, num_samples: int, seq_len: int, seed: int = 0, progress=None):
    """(ids, how many samples the model continued): evenly spread windows of the built-in text, then, only if
    it runs out, passages of it at seeded random offsets continued by the model."""
    ids = tokenizer(builtin_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    real = spread_windows(ids, num_samples, seq_len) if ids.numel() >= seq_len else ids[:0].view(0, seq_len)
    missing = num_samples - real.shape[0]
    if missing == 0:
        return real, 0
    log.warning(
        "the built-in calibration text holds %d samples of %d tokens; the model writes the other %d "
        "(slow on CPU: give --dataset for large sets)",
        real.shape[0],
        seq_len,
        missing,
    )
    p = max(1, min(PROMPT_TOKENS, seq_len // 2, ids.numel()))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - p + 1, (missing,), generator=gen).tolist()
    prompts = torch.stack([ids[s : s + p] for s in starts])
    written = continue_passages(
        _the_model(model), prompts, seq_len, seed, banned=tokenizer.all_special_ids, progress=progress
    )
    return torch.cat([real, written]), missing


def calibration_set(
    model, tokenizer, dataset: Optional[str], num_samples: int, seq_len: int, seed: int = 0, progress=None
):
    """(ids [num_samples, seq_len], a description naming the source) for --dataset `dataset` (None: builtin).
    `model` may be a loader (see _the_model); it is called only when the model has to write text.
    progress(done, total) is called while the model writes."""
    if num_samples <= 0 or seq_len <= 1:
        raise UserError("--num-samples must be ≥ 1 and --seq-len ≥ 2")
    dataset = dataset or BUILTIN
    if dataset == SELF:
        ids = data_free(_the_model(model), tokenizer, num_samples, seq_len, seed, progress=progress)
        return ids, f"{ids.shape[0]}×{seq_len} tokens from the model itself (--dataset {SELF}, data-free, seed {seed})"
    if dataset == BUILTIN:
        ids, written = from_builtin(model, tokenizer, num_samples, seq_len, seed, progress)
        note = f"; {written} samples continued by the model from its passages, seed {seed}" if written else ""
        return ids, f"{ids.shape[0]}×{seq_len} tokens from the built-in calibration text (--dataset {BUILTIN}{note})"
    ids = from_file(tokenizer, dataset, num_samples, seq_len)
    return ids, f"{ids.shape[0]}×{seq_len} tokens from {dataset}"


def calibration_ids(
    model, tokenizer, dataset: Optional[str], num_samples: int, seq_len: int, seed: int = 0, progress=None
) -> torch.Tensor:
    """The ids of calibration_set, without the description."""
    return calibration_set(model, tokenizer, dataset, num_samples, seq_len, seed, progress)[0]
