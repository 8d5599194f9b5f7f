"""Training metrics: one logger interface, throughput counters and a readable progress line.

The training loop talks to `MetricsLogger` only. Rank 0 writes TensorBoard event files under
`RUN_DIR/tensorboard` (`tensorboard --logdir RUN_DIR`) and one JSON object per call to
`RUN_DIR/metrics.jsonl`; on other ranks every method is a no-op, so the loop needs no rank checks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from audio_llm import dist
from audio_llm.planning.plan import format_duration

log = logging.getLogger("audio_llm.train.metrics")
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> float:
    """Python float from a float, int, 0-d tensor or NumPy scalar."""
    return float(value.item() if hasattr(value, "item") else value)


def _json_safe(value: float) -> float | str:
    # Strict JSON has no NaN/inf; keep them visible as strings rather than dropping the row.
    return value if math.isfinite(value) else str(value)


class MetricsLogger:
    """Scalars and text to TensorBoard + `metrics.jsonl` on rank 0; no-op elsewhere."""

    def __init__(
        self, run_dir: str | Path, enabled: bool | None = None, purge_step: int | None = None
    ) -> None:
        """`enabled` defaults to `dist.is_main()`.

        `purge_step`: this run writes steps from `purge_step` on again (a resumed run: its
        checkpoint step + 1; a run restarted from scratch: 0), so rows an earlier attempt logged
        at those steps are dropped from `metrics.jsonl` and TensorBoard hides its events there:
        both show one curve. None keeps everything (plain appending).
        """
        self.run_dir = Path(run_dir)
        self.enabled = dist.is_main() if enabled is None else enabled
        self._writer = None
        self._jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            jsonl = self.run_dir / METRICS_FILE
            earlier = jsonl.is_file()  # an earlier attempt logged here
            dropped = drop_rows_from(jsonl, purge_step) if purge_step is not None and earlier else 0
            if dropped:
                log.info(
                    "%s: dropped %d row(s) logged at steps >= %d before", jsonl, dropped, purge_step
                )
            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / TENSORBOARD_DIR),
                # TensorBoard drops the earlier files' events at steps >= purge_step on reading
                purge_step=purge_step if earlier else None,
            )
            # Appending keeps the history of a resumed run in one file; rows carry their step.
            self._jsonl = open(jsonl, "a", encoding="utf-8")  # noqa: SIM115

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """One TensorBoard scalar per key (e.g. `train/loss`) and one JSON line for the step."""
        if not self.enabled:
            return
        numbers = {key: _number(value) for key, value in values.items()}
        for key, value in numbers.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._write_row({"step": step, **{k: _json_safe(v) for k, v in numbers.items()}})

    def text(self, step: int, tag: str, text: str) -> None:
        """A text entry (e.g. sample transcripts) in TensorBoard's Text tab and the JSON log."""
        if not self.enabled:
            return
        self._writer.add_text(tag, text, global_step=step)
        self._write_row({"step": step, "tag": tag, "text": text})

    def flush(self) -> None:
        """Push buffered events to disk (also done by `close`)."""
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files; safe to call twice."""
        if self.enabled and self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = self._jsonl = None
            self.enabled = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_row(self, row: dict[str, Any]) -> None:
        row["time"] = round(time.time(), 3)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()  # a crash loses at most the row being written


def drop_rows_from(path: Path, step: int) -> int:
    """Rewrite a `metrics.jsonl` without its rows at steps >= `step` (and without a torn last
    line from a killed writer); returns how many lines went. Written to a temp name and
    renamed, so a crash here leaves the old file whole."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None  # torn or foreign: not part of any curve
        if row_step is None or row_step >= step:
            dropped += 1
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        from audio_llm.files import atomic_write_bytes

        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped


# -- throughput ------------------------------------------------------------------------------
@dataclass
class StepCounts:
    """What one or more steps processed, summed; `throughput` turns it into rates."""

    steps: int = 0
    samples: int = 0
    audio_seconds: float = 0.0
    tokens: int = 0
    """Real (non-padding) token positions."""
    positions: int = 0
    """Token positions in the padded batches (rows x width): padding included."""
    data_wait_s: float = 0.0
    """Time the loop waited for the next batch."""
    step_s: float = 0.0
    """Wall time of the whole step, data wait included."""

    def add(self, other: StepCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def throughput(counts: StepCounts) -> dict[str, float]:
    """Rates over the counted steps: samples/s, audio-s/s, tokens/s, padding ratio, wait fraction.

    Rates are per rank; multiply by the world size for the job's total.
    """
    seconds = counts.step_s
    per_s = (lambda n: n / seconds) if seconds > 0 else (lambda n: 0.0)
    return {
        "samples_per_s": per_s(counts.samples),
        "audio_s_per_s": per_s(counts.audio_seconds),
        "tokens_per_s": per_s(counts.tokens),
        "padding_ratio": 1.0 - counts.tokens / counts.positions if counts.positions else 0.0,
        "data_wait_frac": counts.data_wait_s / seconds if seconds > 0 else 0.0,
        "step_s": seconds / counts.steps if counts.steps else 0.0,
    }


class StepTimer:
    """Times each step and its data wait; sums counts until `rates()` reads and resets them.

    ```
    timer = StepTimer()
    for step in range(start, max_steps):
        batch = next(batches)
        timer.data_ready()
        ...forward, backward, step...
        timer.step_done(samples=b, audio_seconds=a, tokens=t, positions=p)
        if step % log_every == 0:
            logger.scalars(step, {f"perf/{k}": v for k, v in timer.rates().items()})
    ```
    """

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._ready: float | None = None
        self.counts = StepCounts()
        self.last_step_s = 0.0

    def restart(self) -> None:
        """Start the current step's clock now (e.g. after an evaluation or a checkpoint)."""
        self._start = self._clock()
        self._ready = None

    def data_ready(self) -> None:
        """Call when the batch has arrived: the time since the step began was data wait."""
        self._ready = self._clock()

    def step_done(
        self, samples: int, audio_seconds: float = 0.0, tokens: int = 0, positions: int = 0
    ) -> float:
        """Close the step (the next one starts now); returns its wall time in seconds."""
        now = self._clock()
        wait = (self._ready - self._start) if self._ready is not None else 0.0
        self.last_step_s = now - self._start
        self.counts.add(
            StepCounts(1, samples, audio_seconds, tokens, positions, wait, self.last_step_s)
        )
        self._start, self._ready = now, None
        return self.last_step_s

    def rates(self, reset: bool = True) -> dict[str, float]:
        """`throughput` of the steps since the last reset."""
        out = throughput(self.counts)
        if reset:
            self.counts = StepCounts()
        return out


def step_time_skew(local_seconds: float) -> dict[str, float]:
    """Slowest and fastest rank's step time and their ratio (1.0 = balanced).

    A collective (all ranks must call it); in a single process the ratio is 1.0. A ratio well
    above 1 means ranks wait on a straggler: uneven batches, a slow loader or a bad node.
    """
    times = [float(t) for t in dist.all_gather_object(float(local_seconds))]
    slow, fast = max(times), min(times)
    return {
        "step_s_max": slow,
        "step_s_min": fast,
        "step_s_skew": slow / fast if fast > 0 else 1.0,
    }


# -- progress line ---------------------------------------------------------------------------
def _format_value(key: str, value: Any) -> str:
    value = _number(value)
    if key.endswith("lr") or (value != 0 and abs(value) < 1e-3):
        return f"{value:.2e}"
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def format_progress(
    step: int,
    max_steps: int,
    elapsed_s: float,
    metrics: dict[str, Any] | None = None,
    start_step: int = 0,
) -> str:
    """`step 120/1000 (12.0%) | loss 2.346 | lr 5.00e-04 | elapsed 1m02s | eta 7m35s`.

    `elapsed_s` is the time since `start_step` (the step this process resumed from), so the ETA
    extrapolates from this run's own pace.
    """
    parts = [f"step {step}/{max_steps} ({100.0 * step / max_steps:.1f}%)"]
    parts += [f"{key} {_format_value(key, value)}" for key, value in (metrics or {}).items()]
    done = step - start_step
    eta = elapsed_s / done * (max_steps - step) if done > 0 else float("nan")
    parts += [f"elapsed {format_duration(elapsed_s)}", f"eta {format_duration(eta)}"]
    return " | ".join(parts)
