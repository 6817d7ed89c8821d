"""Training on several processes: ``torchrun`` starts one process per GPU (or several on a
CPU box) and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this module joins
them into one job. NCCL on CUDA, Gloo on CPU. Without those variables (a plain
``pneumo-edge train``) everything here is a no-op for a world of one.

Failure rules: every collective has a timeout (``PNEUMO_EDGE_DIST_TIMEOUT`` seconds, default
1800), so a rank that dies never leaves the others waiting forever; torchrun itself stops the
surviving ranks when one exits non-zero. A broken collective becomes :class:`RankFailed`, one
line that names this rank and says that another one stopped.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch

from pneumo_edge.errors import PneumoError, UsageError

TIMEOUT_ENV = "PNEUMO_EDGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class RankFailed(PneumoError):
    """Another process of the job stopped (or a collective timed out): exit 1."""

    exit_code = 1


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env(env=None) -> Dist:
    """The job as torchrun describes it in the environment (a world of one without it)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Dist()
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers "
                         "(start several processes with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Dist(rank, world, local, "")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r}: must be positive")
    return value


def device_for(d: Dist, name: str) -> torch.device:
    """The device of this rank of a torchrun job (one process picks with
    :func:`pneumo_edge.train.config.pick_device`): ``auto`` is cuda:LOCAL_RANK when torch sees
    GPUs, else cpu; ``cuda`` means this rank's GPU; an explicit index is refused with several
    ranks (each rank would train on the same GPU)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise UsageError(f"--device {name}: with torchrun use auto, cuda or cpu (rank r "
                         "trains on cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch")
    if d.local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {d.local_rank}: torch sees only "
                         f"{torch.cuda.device_count()} GPU(s) (--nproc_per_node too high)")
    torch.cuda.set_device(d.local_rank)
    return torch.device("cuda", d.local_rank)


def init(d: Dist, device: torch.device) -> Dist:
    """Join the process group: NCCL for CUDA, Gloo for CPU. Returns ``d`` with its backend."""
    if not d.enabled:
        return d
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s()),
                                    **kwargs)
        except ValueError as exc:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR/PORT
            raise UsageError(f"cannot join the {backend} process group ({exc}); start several "
                             "processes with torchrun") from None
    return Dist(d.rank, d.world_size, d.local_rank, backend)


def close(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _guard(d: Dist, what: str, fn):
    try:
        return fn()
    except (RuntimeError, OSError) as exc:  # gloo/nccl raise DistError (a RuntimeError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RankFailed(f"rank {d.rank} of {d.world_size}: {what} failed, so another "
                         f"training process stopped or timed out (see its error above; "
                         f"{TIMEOUT_ENV} sets the wait): {first}") from None


def barrier(d: Dist, what: str = "waiting for the other ranks") -> None:
    if d.enabled:
        import torch.distributed as dist

        _guard(d, what, dist.barrier)


def broadcast(d: Dist, obj, what: str = "sharing rank 0's decision"):
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if d.is_main else None]
    _guard(d, what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def gather(d: Dist, obj, what: str = "gathering results") -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    _guard(d, what, lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_state(d: Dist, module: torch.nn.Module, what: str = "sharing the weights"):
    """Rank 0's parameters and buffers (BatchNorm statistics included) on every rank, so
    every rank evaluates exactly the weights rank 0 saves."""
    if not d.enabled:
        return
    import torch.distributed as dist

    def run():
        for t in module.state_dict().values():
            dist.broadcast(t.data if t.device.type != "meta" else t, src=0)

    _guard(d, what, run)


def shard(n_items: int, batch: int, d: Dist) -> range:
    """This rank's contiguous slice of ``n_items``, cut at multiples of ``batch`` so every
    batch it runs is a batch a single process would run (the same images together)."""
    n_batches = -(-n_items // batch)
    per = -(-n_batches // d.world_size)
    lo = min(n_items, d.rank * per * batch)
    return range(lo, min(n_items, lo + per * batch))
