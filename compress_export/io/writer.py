"""Atomic checkpoint writing: everything goes to a hidden sibling folder renamed into place when complete.

An interrupted run leaves only `.NAME.partial-*`, which has no config.json until the very end and never looks
like a valid checkpoint. The input model directory is only ever read.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Tuple

import torch

from compress_export.core.errors import UserError
from compress_export.io import safety
from compress_export.io.model_card import write_card

SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".part")
SKIP_NAMES = {"config.json", "model.safetensors.index.json", ".compress-export-example"}
DEFAULT_SHARD_BYTES = 4 << 30


def free_space(path) -> Tuple[Path, int]:
    """The nearest existing folder at or above `path` (an output not made yet) and the bytes free on its file
    system."""
    where = Path(path).resolve()
    while not where.exists():
        where = where.parent
    return where, shutil.disk_usage(where).free


OWNER = ".compress-export-owner"  # in a partial folder: "PID HOST" of the run writing it


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(out: Path) -> list:
    """Remove `.NAME.partial-*` / `.NAME.old-*` siblings of `out` left by runs that were killed: only folders that
    carry our owner mark naming a process of this host that is gone. A folder without the mark is the user's,
    whatever its name, and is never touched. Returns what was removed, for one line each."""
    import socket

    removed = []
    for d in Path(out).parent.glob(f".{Path(out).name}.*"):
        if d.is_symlink() or not d.is_dir() or not (".partial-" in d.name or ".old-" in d.name):
            continue
        try:
            pid, host = safety.read_mark(d / OWNER).split()
            stale = host == socket.gethostname() and not pid_alive(int(pid))
        except (OSError, ValueError, UserError):  # no readable mark: not provably ours
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"{d.name} (left by process {pid})")
    return removed


class _Shard:
    """One output safetensors file, written as tensors arrive so no tensor waits in memory.

    Bytes go to one spill file per element size (8, 4, 2, 1); closing writes the header and then the spill files
    largest element first, so every tensor starts at a multiple of its element size (as safetensors' own writer
    arranges by sorting) and the data region has no holes.
    """

    def __init__(self, folder: Path, index: int):
        self.path = folder / f"part-{index:05d}.safetensors"
        self._spill = {}  # element size -> (file, [(name, dtype tag, shape, nbytes)])
        self.bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.element_size()
        if size not in self._spill:
            self._spill[size] = (open(self.path.with_suffix(f".spill{size}"), "wb"), [])
        fh, entries = self._spill[size]
        raw = t.reshape(-1).view(torch.uint8).numpy()  # little-endian on every machine we run on
        fh.write(memoryview(raw))
        entries.append((name, _ST_DTYPES[t.dtype], list(t.shape), raw.nbytes))
        self.bytes += raw.nbytes

    def names(self) -> list:
        return [e[0] for _, entries in self._spill.values() for e in entries]

    def close(self) -> None:
        header, offset = {}, 0
        order = sorted(self._spill, reverse=True)
        for size in order:
            fh, entries = self._spill[size]
            fh.close()
            for name, dtype, shape, n in entries:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-aligned, so mmapped tensors are aligned too
        with open(self.path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for size in order:
                spill = self.path.with_suffix(f".spill{size}")
                with open(spill, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 << 20)
                spill.unlink()
            out.flush()
            os.fsync(out.fileno())


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointWriter:
    """Tensors go to disk as they are added (memory stays flat however large the model); shards of about
    `shard_bytes` are named and indexed at the end, and the folder is renamed into place only when complete."""

    def __init__(self, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = Path(out)
        self.tmp = new_partial(self.out)
        self.shard_bytes = shard_bytes
        self._shard = None
        self._shards = []  # [(file name, [tensor names])]
        self._names = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        if self._shard is None:
            self._shard = _Shard(self.tmp, len(self._shards) + 1)
        self._shard.add(name, t)
        self._names.add(name)
        self.total_bytes += t.numel() * t.element_size()
        if self._shard.bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._shard is None:
            return
        self._shard.close()
        self._shards.append((self._shard.path.name, self._shard.names()))
        self._shard = None

    def finish(self, config: dict, src_dir: Path, overwrite: bool = False, code: bool = True) -> Path:
        """code: copy the source's Python files too (a model run with --trust-remote-code needs them)."""
        self._flush()
        self._name_shards()
        copy_side_files(Path(src_dir), self.tmp, code)
        write_card(self.tmp, config, self.out.name)  # after the copy: the source's card is kept below ours
        # config.json last: a folder without it is never mistaken for a checkpoint.
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return self._commit(overwrite)

    def _name_shards(self) -> None:
        n = len(self._shards)
        if n == 1:
            os.rename(self.tmp / self._shards[0][0], self.tmp / "model.safetensors")
            return
        weight_map = {}
        for i, (fname, names) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(self.tmp / fname, self.tmp / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def _commit(self, overwrite: bool) -> Path:
        return commit(self.tmp, self.out, overwrite)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_partial(out: Path) -> Path:
    """A private folder beside `out` to assemble an output in, with our owner mark (a killed run's leftover is
    removed by the next run into the same place; stale ones are removed now)."""
    import logging
    import socket

    out.parent.mkdir(parents=True, exist_ok=True)
    for what in remove_stale_partials(out):
        logging.getLogger("compress_export").warning("removed a stale partial output from a killed run: %s", what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    safety.write_mark(tmp / OWNER, f"{os.getpid()} {socket.gethostname()}\n")
    return tmp


def commit(tmp: Path, out: Path, overwrite: bool) -> Path:
    """Rename the complete folder `tmp` into place as `out`. What is at `out` now is replaced only with
    `overwrite` and only when it is still one of our outputs (checked again here: it may have changed while the
    output was assembled); the old one is renamed aside under our mark first, then removed."""
    old = None
    if os.path.lexists(out):
        if not overwrite:
            raise UserError(f"output {out} appeared while compressing; nothing was replaced")
        if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not safety.is_our_output(out)):
            raise UserError(f"output {out} is no longer a compress-export output; nothing was replaced")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        # the old output gets our mark: if killed now, the next run cleans it (never through a planted link)
        safety.write_mark(out / OWNER, safety.read_mark(tmp / OWNER))
        os.rename(out, old)
    os.rename(tmp, out)
    (out / OWNER).unlink(missing_ok=True)  # after the rename: until then it marks a live partial
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def copy_side_files(src: Path, dst: Path, code: bool = True) -> None:
    """The files beside the weights (tokenizer, generation config, chat template, README…), copied by content
    from the source folder's top level: regular files inside it only (safety.check_entry), never weights, pickles,
    hidden files or our own bookkeeping; Python files only when `code`."""
    roots = safety.allowed_roots(src)
    for f in sorted(src.iterdir()):
        if (
            f.name in SKIP_NAMES
            or f.name.startswith(".")
            or f.name.endswith(SKIP_SUFFIXES)
            or (not code and f.suffix == ".py")
        ):
            continue
        if not stat.S_ISREG(safety.check_entry(f, roots, src).st_mode):
            continue
        if not code and f.name == "tokenizer_config.json":  # its auto_map would name .py files not copied
            tok = safety.read_json(f)
            if isinstance(tok, dict) and tok.pop("auto_map", None) is not None:
                (dst / f.name).write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                continue
        safety.copy_file(f, dst / f.name)


def dir_weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
