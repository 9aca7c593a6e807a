"""Atomic checkpoint writing: everything goes to a hidden sibling folder renamed into place when complete.

An interrupted run leaves only `.NAME.partial-*`, which has no config.json until the very end and never looks
like a valid checkpoint. The input model directory is only ever read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

from .errors import UserError

SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".part")
SKIP_NAMES = {"config.json", "model.safetensors.index.json", ".compress-export-example"}
DEFAULT_SHARD_BYTES = 4 << 30


def check_output_path(out: Path, src: Path, overwrite: bool) -> None:
    out, src = out.resolve(), src.resolve()
    if out == src or src in out.parents:
        raise UserError(f"output {out} is inside the input model directory {src}; choose another -o")
    if out in src.parents:
        raise UserError(f"output {out} contains the input model directory; choose another -o")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} exists; pass --overwrite to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")


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
    """Remove `.NAME.partial-*` / `.NAME.old-*` siblings of `out` left by runs that were killed (their owner
    process is gone on this host, or they carry no owner mark); return what was removed, for one line each."""
    import socket

    removed = []
    for d in Path(out).parent.glob(f".{Path(out).name}.*"):
        if not d.is_dir() or not (".partial-" in d.name or ".old-" in d.name):
            continue
        try:
            pid, host = (d / OWNER).read_text().split()
            stale = host == socket.gethostname() and not pid_alive(int(pid))
        except (OSError, ValueError):  # no owner mark (an older version's run): stale once untouched for 10 min
            import time

            pid, stale = "?", time.time() - d.stat().st_mtime > 600
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"{d.name} (left by process {pid})")
    return removed


class CheckpointWriter:
    def __init__(self, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        import logging
        import socket

        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for what in remove_stale_partials(self.out):
            logging.getLogger("compress_export").warning("removed a stale partial output from a killed run: %s",
                                                         what)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        (self.tmp / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        self.shard_bytes = shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = []  # [(file name, [tensor names])]
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        # A private copy: tensors that share storage (one g_idx for q/k/v) cannot be saved twice.
        t = tensor.detach().cpu().clone().contiguous()
        self._pending[name] = t
        n = t.numel() * t.element_size()
        self._pending_bytes += n
        self.total_bytes += n
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"part-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(self.tmp / fname), metadata={"format": "pt"})
        self._shards.append((fname, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: dict, src_dir: Path, overwrite: bool = False) -> Path:
        self._flush()
        self._name_shards()
        for f in sorted(Path(src_dir).iterdir()):
            if f.is_file() and f.name not in SKIP_NAMES and not f.name.startswith(".") \
                    and not f.name.endswith(SKIP_SUFFIXES):
                shutil.copy2(f, self.tmp / f.name)
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
        old = None
        if self.out.exists():
            if not overwrite:
                raise UserError(f"output {self.out} appeared while compressing; nothing was replaced")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            (self.out / OWNER).write_text((self.tmp / OWNER).read_text())  # if killed now, the next run cleans it
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        (self.out / OWNER).unlink(missing_ok=True)  # after the rename: until then it marks a live partial
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def dir_weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
