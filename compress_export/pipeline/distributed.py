"""Distributed calibration on torch.distributed: the ranks share one export's work, layer by layer.

`torchrun --nproc-per-node N -m compress_export <CLI arguments>` (or a process group the caller has already
initialised) runs the same pipeline in every process:

- every rank holds the same calibration ids (rank 0 makes them and broadcasts) and runs its own contiguous slice
  of the samples through each decoder layer;
- each linear group's statistics (Hessian, mean |x|, column norms) are merged across ranks before use, weighted by
  each rank's token count, so they describe the whole calibration set; MoE experts only some ranks' tokens reach
  are merged from the ranks that saw them (Dist.all_groups: every rank works through the same groups);
- the sweeps are partitioned: group k of the run belongs to rank k mod N, which compresses it and broadcasts the
  result; every rank then puts the same compressed weights into its copy of the layer;
- only rank 0 writes; the others finish when it has.

gloo carries the collectives on the CPU, NCCL when the layers run on CUDA (each rank on cuda:LOCAL_RANK).
Multi-node runs use torchrun's own rendezvous (`--nnodes`, `--rdzv-endpoint`); there is no scheduler here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index


@dataclass
class Dist:
    """This process's place in the run; the default is a run of one (every collective is a no-op)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives move tensors (NCCL: this rank's GPU)
    owns_group: bool = False  # True when the pipeline initialised the process group (and so tears it down)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owner(self, k: int) -> int:
        """The rank that runs the sweep of the run's k-th linear group."""
        return k % self.world

    def samples(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the calibration samples (sizes differ by at most one)."""
        if not self.active:
            return ids
        if ids.shape[0] < self.world:
            raise UserError(
                f"{ids.shape[0]} calibration samples cannot be split over {self.world} ranks: give "
                f"--num-samples {self.world} or more, or run fewer processes"
            )
        return torch.tensor_split(ids, self.world)[self.rank]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor every rank holds with the same shape."""
        if self.active:
            moved = t.to(self.device)
            torch.distributed.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place element-wise maximum over ranks (SmoothQuant's activation ranges)."""
        if self.active:
            moved = t.to(self.device)
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.MAX)
            if moved is not t:
                t.copy_(moved)
        return t

    def merge_stats(self, stats) -> None:
        """One linear group's statistics, merged so that every rank holds those of the whole calibration set."""
        if self.active and stats is not None:
            stats.all_reduce_(self.sum_, self.device)

    def broadcast_object(self, obj, src: int = 0):
        """A small picklable object (calibration ids, names, result metadata) from rank `src` to every rank.
        Only ever between this run's own processes; nothing read from a model directory is unpickled."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def broadcast_results(self, results: Optional[list], src: int) -> list:
        """A group's compressed linears (QuantizedWeight / SparseWeight list) from the rank that computed them.

        The metadata (field shapes, dtypes, scheme, sparsity) travels as one small object; each tensor then goes
        by a plain broadcast, so a 70B layer's codes are not pickled."""
        if not self.active:
            return results
        meta = None
        if self.rank == src:
            meta = [(type(r), {f.name: _describe(getattr(r, f.name)) for f in fields(r)}) for r in results]
        meta = self.broadcast_object(meta, src)
        out = []
        for i, (cls, desc) in enumerate(meta):
            values = {}
            for name, d in desc.items():
                if not (isinstance(d, tuple) and d and d[0] == _TENSOR):
                    values[name] = d
                    continue
                _, shape, dtype = d
                wire = _WIRE.get(dtype, dtype)
                if self.rank == src:
                    buf = getattr(results[i], name).to(self.device, wire).contiguous()
                else:
                    buf = torch.empty(shape, dtype=wire, device=self.device)
                torch.distributed.broadcast(buf, src=src)
                values[name] = buf.to(dtype)
            out.append(cls(**values))
        return results if self.rank == src else out

    def all_groups(self, members: list, stats: list, linears: dict, make_stats, where: str) -> tuple:
        """(members, stats) of a layer's linear groups as every rank together saw them, in the layer's order of
        `linears` ({local name: nn.Linear}), the same groups on every rank. MoE: a rank whose samples route no token
        to an expert never calls its linears, while another rank does; such a group gets empty statistics here,
        which merge as zero rows. The groups of every other linear must agree between ranks."""
        if not self.active:
            return members, stats
        seen: list = [None] * self.world
        torch.distributed.all_gather_object(seen, [list(g) for g in members])
        union = {tuple(g) for ranks in seen for g in ranks}
        dense = [sorted(tuple(g) for g in ranks if expert_index(g[0]) < 0) for ranks in seen]
        names = [n for g in union for n in g]
        odd = next((r for r, d in enumerate(dense) if d != dense[0]), None)
        twice = next((n for n in names if names.count(n) > 1), None)
        if odd is not None or twice is not None:
            what = (
                f"rank {odd} groups {sorted(set(dense[odd]) ^ set(dense[0]))[:2]} otherwise than rank 0"
                if odd is not None
                else f"{twice} sits in two different groups"
            )
            raise UserError(f"{where}: the linear groups differ between ranks ({what}); run in one process")
        order = {n: k for k, n in enumerate(linears)}
        everyone = [list(g) for g in sorted(union, key=lambda g: order[g[0]])]
        mine = {tuple(g): st for g, st in zip(members, stats)}
        fresh = [make_stats(linears[g[0]].in_features) if tuple(g) not in mine else None for g in everyone]
        return everyone, [mine.get(tuple(g), f) for g, f in zip(everyone, fresh)]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_TENSOR = "<tensor>"
_WIRE = {torch.bool: torch.uint8}  # gloo has no bool collectives


def _describe(value):
    if torch.is_tensor(value):
        return (_TENSOR, tuple(value.shape), value.dtype)
    return value


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def join(device: torch.device, timeout_minutes: float = 60.0):
    """(Dist, device) for this process: the caller's process group if one is initialised, else the one torchrun
    describes in the environment (gloo for CPU layers, NCCL for CUDA), else a run of one. Under torchrun a CUDA
    run puts each rank on cuda:LOCAL_RANK."""
    import torch.distributed as td

    owns = False
    if not td.is_available():
        return Dist(), device
    if not td.is_initialized():
        if launched_world_size() <= 1:
            return Dist(), device
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
    comm = device if td.get_backend() == "nccl" else torch.device("cpu")
    return Dist(td.get_rank(), td.get_world_size(), comm, owns), device
