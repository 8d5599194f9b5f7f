"""Life on a shared cluster: a stop signal, an out-of-memory step or a stalled rank ends the run
with a message that says what happened and an exit code of its own.

- **Stop signals** (`train.stop_signals`, default SIGTERM and SIGUSR1: SLURM's time limit,
  preemption and `--signal` notice). The handler only records the signal. The ranks agree on
  the step to stop at through the host all-reduce every step already does (`train_step`): the
  flag rides along as one more number, so no collective is added. Every rank finishes the step
  whose all-reduce saw the flag, the trainer logs and checkpoints it, and the process exits
  with `EXIT_PREEMPTED`. Later signals (the launcher's own SIGTERM, a second scancel) are
  recorded and ignored: the save goes on, and a SIGKILL during it leaves a folder without its
  `COMPLETE` marker, which `--resume auto` skips.
- **Heartbeats**: every rank keeps `RUN_DIR/heartbeat/rank_NNNNN.json` up to date (its last
  completed step, the step whose all-reduce it waits in, and how it ended), rewritten in place
  through an open file, so a step costs no file-system metadata operation.
- **Out of memory** on one rank: that rank writes the explanation into its heartbeat and
  leaves; its peers' next collective fails (gloo: the connection closes; NCCL: the launcher
  stops them, or `train.collective_timeout_s`), they read the heartbeats and stop with the
  same message. Exit `EXIT_OOM`.
- **A stalled rank**: when a collective times out (`train.collective_timeout_s`) or fails,
  the message names the ranks that did not arrive and the last step each completed. Exit
  `EXIT_STALLED`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from audio_llm import dist
from audio_llm.config import signal_number
from audio_llm.train.faults import fault_point

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "try again later": what a requeue script tests for. Not 143
# (128 + SIGTERM), which a rank killed mid-step by the same signal also returns.
EXIT_PREEMPTED = 75
EXIT_OOM = 3  # a config change is needed before a retry can succeed (2: bad config, at start)
EXIT_STALLED = 4  # a rank stalled or died: retry once the node is fixed (resume auto)
HEARTBEAT_DIR = "heartbeat"


class RunStopped(Exception):
    """The run ended early on purpose; `exit_code` is what the process should return."""

    exit_code = 1


class Preempted(RunStopped):
    """A stop signal arrived; the step the ranks agreed on is checkpointed."""

    exit_code = EXIT_PREEMPTED


class OutOfMemory(RunStopped):
    """A rank ran out of device memory in a step."""

    exit_code = EXIT_OOM


class RanksStalled(RunStopped):
    """A collective timed out or failed: some rank did not arrive."""

    exit_code = EXIT_STALLED


class StopSignals:
    """Records the first of `names` (e.g. ["SIGTERM", "SIGUSR1"]) that this process receives.

    Installed in the main thread; the handler only sets attributes (no logging: the main thread
    may hold the logging lock when the signal lands), and `restore()` puts the old ones back.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.signals = [signal_number(name) for name in names]
        self.received: str | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(number).name
        # One line on stderr, written without locks; later signals say they are ignored.
        what = "stopping after the current step" if self.count == 1 else "already stopping"
        os.write(2, f"[rank {dist.rank()}] {signal.Signals(number).name}: {what}\n".encode())

    @property
    def requested(self) -> bool:
        return self.received is not None


class Heartbeat:
    """This rank's `RUN_DIR/heartbeat/rank_NNNNN.json`, and reading every rank's."""

    def __init__(self, run_dir: str | Path, rank: int, world: int) -> None:
        self.folder = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world = rank, world
        self.state: dict[str, Any] = {
            "rank": rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "done": 0,
            "waiting": None,
            "status": "running",
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path(rank), os.O_RDWR | os.O_CREAT, 0o644)

    def path(self, rank: int) -> Path:
        return self.folder / f"rank_{rank:05d}.json"

    def beat(self, **fields: Any) -> None:
        """Update fields and rewrite the file in place (one write, then cut the old tail)."""
        self.state.update(fields, time=time.time())
        data = (json.dumps(self.state) + "\n").encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def read_all(self) -> dict[int, dict[str, Any]]:
        """Every rank's last heartbeat; a rank without a readable file maps to {}."""
        out: dict[int, dict[str, Any]] = {}
        for rank in range(self.world):
            try:
                out[rank] = json.loads(self.path(rank).read_text())
            except (OSError, ValueError):
                out[rank] = {}
        return out


def describe_stall(
    beats: dict[int, dict[str, Any]], me: int, step: int, timeout_s: float, error: BaseException
) -> str:
    """Why a collective during `step` failed on rank `me`, from every rank's heartbeat: who did
    not arrive (not waiting in step `step`'s all-reduce) and the last step each completed."""
    now = time.time()
    late = [r for r, b in beats.items() if b.get("waiting") != step or b.get("status") != "running"]
    # Every peer, when the heartbeats cannot tell (a collective after the step's all-reduce).
    absent = [r for r in late if r != me] or [r for r in beats if r != me]

    def who(rank: int) -> str:
        beat = beats[rank]
        if not beat:
            return f"rank {rank} (no heartbeat file)"
        age = now - float(beat.get("time", now))
        where = f"{beat.get('host')} pid {beat.get('pid')}"
        ended = "" if beat.get("status") == "running" else f", {beat.get('status')}"
        done = beat.get("done")
        return f"rank {rank} (last completed step {done}{ended}, {age:.0f} s ago, {where})"

    return (
        f"a collective in step {step} failed on rank {me} "
        f"(train.collective_timeout_s={timeout_s:g}): rank(s) {absent} did not arrive: "
        + "; ".join(who(r) for r in absent)
        + f". Error: {str(error).splitlines()[0] if str(error) else type(error).__name__}. "
        "(heartbeats: RUN_DIR/heartbeat/)"
    )


class LastBatches:
    """Passes batches on and remembers those of the current step, to name them after an OOM."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self.batches, self.current = batches, []

    def new_step(self) -> None:
        self.current = []

    def __iter__(self) -> LastBatches:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.current.append(batch)
        return batch


def describe_oom(
    step: int,
    batches: Sequence[dict],
    cfg: Any,
    error: BaseException | None = None,
    zero_stage: int = 2,
) -> str:
    """The out-of-memory message: the batch, the memory in use and the settings to change."""
    stats = [b.get("stats", {}) for b in batches]
    clips = sum(int(s.get("samples", 0)) for s in stats)
    seconds = sum(float(s.get("audio_seconds", 0.0)) for s in stats)
    tokens = sum(int(s.get("positions", 0)) for s in stats)
    longest_s = max((float(s.get("longest_seconds", 0.0)) for s in stats), default=0.0)
    parts = [
        f"rank {dist.rank()} ran out of memory in step {step}: batch of {clips} clips "
        f"({len(batches)} micro-batch(es)), {seconds:.1f} s of audio, {tokens} LLM positions, "
        f"longest clip {longest_s:.1f} s"
    ]
    parts.append(_device_memory())
    parts.append(planned_memory(cfg, stats, zero_stage))
    parts.append(
        "to fit: lower data.max_batch_seconds "
        f"(now {cfg.data.max_batch_seconds:g}) or data.batch_size (now {cfg.data.batch_size}), "
        + (
            "raise train.grad_accum to keep the global batch"
            if cfg.model.gradient_checkpointing
            else "or set model.gradient_checkpointing=true"
        )
        + "; `audio-llm plan --batch N --audio-seconds S --text-tokens T --gpu-memory GiB` gives "
        "the memory a batch is expected to need and the largest batch that fits"
    )
    if error is not None and str(error):
        parts.append(f"error: {str(error).splitlines()[0]}")
    return ". ".join(parts)


def planned_memory(cfg: Any, stats: Sequence[dict], zero_stage: int) -> str:
    """What `audio-llm plan` expects per GPU for this config and the largest micro-batch of the
    step, and the largest batch it says fits; or why that is not known. A meta-device model
    is built from the configs: seconds, on the rank that has already failed."""
    import torch

    from audio_llm.planning.plan import GIB, PlanSpec, make_plan

    biggest = max(stats, key=lambda s: s.get("positions", 0), default={})
    clips = int(biggest.get("samples", 0))
    if not clips:
        return "`audio-llm plan`: no batch to plan for"
    seconds = min(max(float(biggest.get("audio_seconds", 0.0)) / clips, 0.1), 30.0)
    text = max(int(biggest.get("positions", 0) - biggest.get("audio_positions", 0)) // clips, 0)
    world = dist.world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    gpu = PlanSpec.gpu_memory  # the plan's default when there is no GPU to ask
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    try:
        spec = PlanSpec(
            encoder=cfg.model.encoder,
            llm=cfg.model.llm,
            gpus_per_node=local,
            nodes=max(1, world // max(local, 1)),
            zero=zero_stage,
            lora_rank=cfg.lora.rank if cfg.use_lora else 0,
            stack=cfg.model.stack_factor,
            projector=cfg.model.projector,
            projector_hidden=cfg.model.projector_hidden,
            varlen=cfg.model.varlen_encoder,
            batch=clips,
            audio_seconds=seconds,
            text_tokens=text,
            dtype=cfg.model.dtype,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            gpu_memory=gpu,
        )
        plan = make_plan(spec)
    except Exception as exc:  # a diagnosis must not hide the OOM it explains
        return f"`audio-llm plan` estimate unavailable ({type(exc).__name__}: {exc})"
    fit = plan["fit"]
    return (
        f"`audio-llm plan` expects {plan['memory_per_gpu']['total'] / GIB:.1f} GiB per GPU for "
        f"{clips} clips of {seconds:.1f} s and {text} text tokens each, and says at most "
        f"{fit['largest_batch']} such clips fit in {gpu:.0f} GiB "
        f"({fit['largest_batch_checkpointing']} with gradient checkpointing)"
    )


def _device_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return "device: CPU (no device memory figures)"
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated() / 2**30
    return (
        f"GPU {torch.cuda.current_device()}: peak allocated {peak:.1f} GiB of "
        f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free now)"
    )


# What a failed collective's error says: torch raises gloo's as a plain RuntimeError.
_COLLECTIVE_ERRORS = ("gloo", "nccl", "processgroup", "connection closed by peer", "timed out")


def is_collective_failure(error: BaseException) -> bool:
    """True for the error a collective raises when a peer died or did not arrive in time."""
    import torch

    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(key in text for key in _COLLECTIVE_ERRORS)


class RunGuard:
    """What the trainer asks of the cluster side at each step: stop signals, the heartbeat, the
    step's host all-reduce with the stop flag in it, and OOMs or failed collectives turned into
    `RunStopped` with their message (`watch`)."""

    def __init__(self, cfg: Any, run_dir: str | Path, zero_stage: int = 2) -> None:
        self.cfg, self.zero_stage = cfg, zero_stage
        self.timeout_s = cfg.train.collective_timeout_s
        self.signals = StopSignals(cfg.train.stop_signals)
        self.heartbeat = Heartbeat(run_dir, dist.rank(), dist.world_size())
        self.step = 0  # the step in progress
        self.batches: LastBatches | None = None
        self.signals.install()

    def begin(self, step: int) -> None:
        """Step `step` starts (its batches are the ones an OOM message names)."""
        self.step = step
        if self.batches is not None:
            self.batches.new_step()

    def agree(self, values: list[float]) -> tuple[list[float], bool]:
        """The step's host all-reduce of `values`, with this rank's stop flag as one more
        number: returns the sums and whether any rank has been asked to stop. Collective."""
        self.heartbeat.beat(waiting=self.step)
        *sums, stops = dist.sum_on_host([*values, float(self.signals.requested)])
        fault_point("in_step", self.step)  # test hook: batches fetched, forward next
        return sums, stops > 0

    def done(self, step: int) -> None:
        self.heartbeat.beat(done=step)

    def stopped(self, step: int, path: Path) -> Preempted:
        """The error that ends a run stopped by a signal after checkpointing `step` at `path`."""
        self.heartbeat.beat(status="preempted")
        got = self.signals.received
        why = f"{got} on this rank" if got else "a stop signal on another rank"
        return Preempted(
            f"{why}: stopped after step {step}, checkpoint {path} "
            f"(exit {EXIT_PREEMPTED}: resume with --resume auto)"
        )

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Inside: an out-of-memory error or a failed collective ends the run with its message
        in this rank's heartbeat (where the other ranks read it) and a `RunStopped`."""
        import torch

        try:
            yield
        except torch.OutOfMemoryError as exc:
            current = self.batches.current if self.batches is not None else []
            message = describe_oom(self.step, current, self.cfg, exc, self.zero_stage)
            self.heartbeat.beat(status="out_of_memory", message=message)
            raise OutOfMemory(message) from exc
        except RuntimeError as exc:
            if not is_collective_failure(exc):
                raise
            beats = self.heartbeat.read_all()
            oom = [b["message"] for b in beats.values() if b.get("status") == "out_of_memory"]
            if oom:  # a peer left after an OOM: stop with its message
                self.heartbeat.beat(status="peer_out_of_memory")
                raise OutOfMemory(oom[0]) from exc
            message = describe_stall(beats, self.heartbeat.rank, self.step, self.timeout_s, exc)
            self.heartbeat.beat(status="stalled")
            raise RanksStalled(message) from exc

    def close(self) -> None:
        self.signals.restore()
        self.heartbeat.close()
