"""Rank, world size, barriers and collectives: the one place that knows about processes.

Everything else asks this module (`rank()`, `is_main()`, `barrier()`, ...) and works unchanged in a
single process, where the collectives return their single-rank answers.

`init_distributed()` reads the launcher's environment, in this order:

1. `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, as set by the `deepspeed`
   launcher (also with `--no_ssh`) and by `torchrun`;
2. SLURM, when a job step runs one task per GPU (`srun --ntasks-per-node=GPUS python ...`):
   `SLURM_PROCID` -> rank, `SLURM_NTASKS` -> world size, `SLURM_LOCALID` -> local rank, and, unless
   set, `MASTER_ADDR` = the first host of `SLURM_JOB_NODELIST` and `MASTER_PORT` = 29500;
3. nothing: a single process (rank 0 of 1 on 127.0.0.1 and a free port), so
   `python launch/stage1.py ...` works without a launcher.

`launch/slurm.sbatch` takes route 1 (srun starts the `deepspeed` launcher once per node).
Entry points end with `shutdown()`, so no rank exits while another still talks to it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_MASTER_PORT = "29500"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: `gpu[003-006,9],cpu1` -> `gpu003`.

    Covers the compressed forms SLURM prints for one prefix per group; anything more exotic can
    set `MASTER_ADDR` itself (or use `scontrol show hostnames`, as `launch/slurm.sbatch` does).
    """
    match = re.match(r"\s*([^,\[]*)(?:\[([^\]]+)\]([^,]*))?", nodelist)
    prefix, ranges, suffix = match.groups() if match else ("", None, None)
    if not ranges:
        return prefix.strip()
    return prefix + ranges.split(",")[0].split("-")[0] + (suffix or "")


def launch_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The five torch.distributed variables a launcher provided, or None without a launcher.

    Variables already set always win; SLURM fills only what is missing.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        resolved = {key: environ[key] for key in DIST_VARS if key in environ}
        resolved.setdefault("LOCAL_RANK", "0")
        resolved.setdefault("MASTER_ADDR", "127.0.0.1")
        resolved.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        return resolved
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR")
            or first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_MASTER_PORT),
        }
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process rendezvous on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_initialized() -> bool:
    """True once a process group exists."""
    return tdist.is_available() and tdist.is_initialized()


def init_distributed(timeout: timedelta | None = None) -> None:
    """Create the process group once (later calls return at once); see the module docstring.

    `timeout` (default: torch's) bounds every collective, the host group's too: a rank that
    does not arrive in time makes the others' collective raise (gloo; NCCL's watchdog aborts).

    The backend comes from DeepSpeed's accelerator: nccl on CUDA, gloo on CPU.
    """
    if is_initialized():
        return
    resolved = launch_env(os.environ)
    if resolved is None:
        resolved = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    os.environ.update(resolved)
    if torch.cuda.is_available():
        # Before the group exists, so NCCL binds each rank to its own GPU, not all to cuda:0.
        torch.cuda.set_device(int(resolved["LOCAL_RANK"]))

    import deepspeed  # slow import: only when a process group is really wanted
    from deepspeed.accelerator import get_accelerator

    global _timeout
    _timeout = timeout
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    if not torch.cuda.is_available():
        _skip_shm_comm_op()
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        auto_mpi_discovery=False,
        verbose=False,
        **kwargs,
    )


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory comm op.

    On CPU, DeepSpeed's torch backend JIT-compiles `deepspeed_shm_comm` (a C++ build: about 25 s on
    2 cores, the first time in a TORCH_EXTENSIONS_DIR) and gives every rank a 64 MiB
    `/dev/shm/deepspeed_allreduce_buffer_*` it never unlinks. Only `inference_all_reduce`
    (tensor-parallel inference) uses the op; ZeRO's collectives go through torch.distributed
    (gloo) either way, so training is unchanged without it, and nothing is left in /dev/shm.
    A DeepSpeed without `build_shm_op` is left as it is.
    """
    import importlib

    # by name: `import deepspeed.comm.torch` binds the `torch` that deepspeed.comm imports
    backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None


def shutdown() -> None:
    """End of an entry point: wait for every rank, then tear the process group down.

    A rank that simply exits while others still talk to it can abort them (gloo) or leave
    NCCL warnings; a no-op without a group.
    """
    if not is_initialized():
        return
    global _host_group
    barrier()
    _host_group = None  # destroyed with the rest; a later init_distributed makes a new one
    tdist.destroy_process_group()


def rank() -> int:
    """Global rank (before `init_distributed`, what the launcher's environment says)."""
    if is_initialized():
        return tdist.get_rank()
    env = launch_env(os.environ)
    return int(env["RANK"]) if env else 0


def world_size() -> int:
    """Number of processes (1 without a launcher)."""
    if is_initialized():
        return tdist.get_world_size()
    env = launch_env(os.environ)
    return int(env["WORLD_SIZE"]) if env else 1


def local_rank() -> int:
    """Rank on this node: the GPU index this process uses."""
    env = launch_env(os.environ)
    return int(env["LOCAL_RANK"]) if env else 0


def is_main() -> bool:
    """Rank 0: the one process that writes logs, markers and exports."""
    return rank() == 0


def device() -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not is_initialized():
        return
    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[local_rank()])
    else:
        tdist.barrier()


_host_group: Any = None
_timeout: timedelta | None = None  # init_distributed's, for groups made later


def _cpu_group() -> Any:
    """A gloo group for collectives on CPU tensors: the default group when that is gloo,
    otherwise one more group made on first use (collective: every rank must reach its first
    call at the same point, as `train_step` does)."""
    global _host_group
    if tdist.get_backend() == "gloo":
        return None
    if _host_group is None:
        _host_group = tdist.new_group(backend="gloo", timeout=_timeout)
    return _host_group


def sum_on_host(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few host numbers (`values` in a single process).

    Collective. A CPU all-reduce over gloo: on a NCCL cluster a CUDA all-reduce and `.item()`
    would make the host wait for every kernel already queued on its GPU. float64: counts stay
    exact up to 2**53.
    """
    if not is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(tensor, group=_cpu_group())
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order (`[obj]` in a single process). Collective."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def sum_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """Every rank's counters added up by name, on every rank (`counts` in a single process).

    Collective; ranks may hold different names (a rank that met no corrupt shard has no
    `corrupt_shard` key), so the dicts are gathered rather than reduced tensor by tensor.
    """
    total: dict[str, float] = {}
    for part in all_gather_object(dict(counts)):
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return dict(sorted(total.items()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (`obj` itself in a single process). Collective."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], enabled: bool = True) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned `params` hold their full values on every rank.

    Collective when `enabled` (every rank enters it with the same parameters); a no-op when not,
    so callers pass `enabled=engine.zero_optimization_stage() == 3`. Changes made inside the
    block are not written back to the partitions.
    """
    if not enabled:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def full_copy(param: torch.nn.Parameter) -> torch.Tensor:
    """`param` itself, or a detached full copy gathered from its ZeRO-3 partitions (which hold
    0 elements on this rank outside the module that owns them). Collective in that case."""
    if param.numel() > 0:
        return param
    with gathered([param]):
        return param.detach().clone()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with the same `seed`.

    Every rank gets the same seed, so model initialisation agrees across ranks; per-rank streams
    (data order, augmentation) derive their own seeds from (seed, epoch, rank, worker).
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
