"""The step loop of a built run (`Trainer`): a step (`step.train_step`), then a log line, a
checkpoint + export and an eval when their turn comes; at the end, a check that every rank holds
the same weights and the run's summary. `run.train` builds what it loops over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.evaluate import evaluate
from audio_llm.evaluation.export import export_weights
from audio_llm.planning.flops import ModelShape, flops_rates, resolve_peak_tflops, with_flops
from audio_llm.train.checkpoint import CheckpointManager, tag_for
from audio_llm.train.cluster import LastBatches, RunGuard
from audio_llm.train.faults import fault_point
from audio_llm.train.metrics import MetricsLogger, StepTimer, format_progress, step_time_skew
from audio_llm.train.state import RunState
from audio_llm.train.step import ROW_TOTALS, StepResult, read_steps, train_step

log = logging.getLogger(__name__)


class Interval:
    """What the steps since the last log line add up: losses still on the device, FLOPs (model
    and executed), audio frames and LLM positions."""

    FRAME_KEYS = ("audio_frames", "audio_frames_padded", "masked_frames")
    # real LLM positions, and those of them that are audio or targets (the rest is prompt)
    POSITION_KEYS = ("tokens", "audio_positions", "target_tokens")

    def __init__(self) -> None:
        self.pending: list[StepResult] = []
        self.flops = 0.0  # model FLOPs: real tokens only
        self.flops_executed = 0.0  # padding and recompute included
        self.frames: Counter = Counter()  # valid and padded audio frames
        self.positions: Counter = Counter()

    def add(self, result: StepResult) -> None:
        self.pending.append(result)
        self.flops += result.counts.get("flops", 0.0)
        self.flops_executed += result.counts.get("flops_executed", 0.0)
        self.frames.update({k: result.counts.get(k, 0) for k in self.FRAME_KEYS})
        self.positions.update({k: result.counts.get(k, 0) for k in self.POSITION_KEYS})

    def prompt_position_ratio(self) -> float:
        """Share of the real LLM positions that are neither audio nor target: the chat
        template, system prompt and instruction, which every sample pays for."""
        tokens, counts = self.positions["tokens"], self.positions
        prompt = tokens - counts["audio_positions"] - counts["target_tokens"]
        return prompt / tokens if tokens else 0.0


class Trainer:
    """The step loop of one built run: steps, log lines, checkpoints + exports, periodic evals.

    `run.train()` builds the model, data, engine and `RunState` (resumed or fresh) and calls
    `run()`.
    """

    def __init__(
        self,
        cfg: Config,
        engine,
        loader,
        state: RunState,
        checkpoints: CheckpointManager,
        logger: MetricsLogger,
        flops_shape: ModelShape,
        trainable: int,
        guard: RunGuard | None = None,
    ) -> None:
        self.cfg, self.engine, self.loader, self.state = cfg, engine, loader, state
        self.checkpoints, self.logger, self.trainable = checkpoints, logger, trainable
        self.run_dir = Path(cfg.train.out_dir)
        self.start = state.step
        self.timer, self.began = StepTimer(), time.time()
        self.losses: dict[int, float] = {}
        self.eval_history: dict[int, float | None] = {}
        self.interval = Interval()
        # analytic FLOPs of each batch, model and executed (padding, recompute); the step's
        # batches are kept to name them after an OOM
        checkpointing = cfg.model.gradient_checkpointing
        self.batches = LastBatches(with_flops(iter(loader), flops_shape, checkpointing))
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        self.peak_tflops = resolve_peak_tflops(cfg.train.peak_tflops, device)
        if dist.is_main() and device is not None:
            log.info(
                "MFU against %s TFLOP/s (%s)",
                f"{self.peak_tflops:g}" if self.peak_tflops else "no peak: not logged",
                "train.peak_tflops" if cfg.train.peak_tflops else f"{device}, dense bf16",
            )
        self.guard = guard
        if guard is not None:
            guard.batches = self.batches
            guard.done(self.start)  # a resumed run's heartbeat starts at its checkpoint
        self.step_s = 0.0  # this rank's time for the last step

    def run(self) -> dict[str, Any]:
        """Steps `start + 1 .. train.max_steps`; returns the summary (`summary.json`)."""
        cfg, last = self.cfg, self.cfg.train.max_steps
        if cfg.eval.every and cfg.eval.at_start and self.start == 0:
            self.evaluate(0)
        watch = self.guard.watch() if self.guard else contextlib.nullcontext()
        with watch:
            for step in range(self.start + 1, last + 1):
                stop = self.step(step) and step < last  # the ranks agreed: this step is the last
                if step % cfg.train.log_every == 0 or step == last or stop:
                    self.log(step)
                if step % cfg.train.save_every == 0 or step == last or stop:
                    self.save()
                    self.timer.restart()
                if stop:
                    self.logger.close()
                    raise self.guard.stopped(step, self.checkpoints.save_dir / tag_for(step))
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == last):
                    self.evaluate(step)
                fault_point("after_step", step)
            return self.finish()

    def step(self, step: int) -> bool:
        """Optimizer step `step` and its counters; too many non-finite steps in a row stop.
        Returns True when the ranks agreed in this step to stop after it (a stop signal)."""
        guard = self.guard
        if guard is not None:
            guard.begin(step)
        fault_point("before_step", step)
        agree = guard.agree if guard is not None else None
        result = train_step(self.engine, self.batches, self.cfg.train.grad_accum, self.timer, agree)
        self.step_s = self.timer.step_done(
            samples=int(result.counts.get("samples", 0)),
            audio_seconds=result.counts.get("audio_seconds", 0.0),
            tokens=int(result.counts.get("tokens", 0)),
            positions=int(result.counts.get("positions", 0)),
        )
        self.state.count(step, result.finite)
        bad = self.state.bad_in_row
        if bad >= self.cfg.train.max_bad_steps:
            raise AudioLLMError(
                f"{bad} non-finite steps in a row (last at step {step}): lower train.lr, "
                "check the data (loader problem counts are in the log), or use bf16/fp32"
            )
        self.interval.add(result)
        if guard is not None:
            guard.done(step)
        return result.stop

    def log(self, step: int) -> None:
        """Metrics of the steps since the last log line, and the progress line. Collective."""
        interval, self.interval = self.interval, Interval()
        read = read_steps(interval.pending)  # every step since the last log: one collective
        first = step - len(read) + 1
        self.losses.update({first + i: row["loss"] for i, row in enumerate(read)})
        last = read[-1]
        parts = {k: v for k, v in last.items() if k not in ROW_TOTALS}
        skew = step_time_skew(self.step_s)  # a collective: same steps on every rank
        # Every rank's data problems (a corrupt shard dealt to rank 7 counts too); collective.
        problems = dist.sum_counts(self.loader.problems)
        # This rank's FLOPs over the wall time of the same steps (read before rates() resets).
        timer = self.timer
        achieved = flops_rates(
            interval.flops, timer.counts.step_s, self.peak_tflops, interval.flops_executed
        )
        frames = interval.frames
        padded = frames["audio_frames_padded"] - frames["audio_frames"]
        metrics = {
            "train/loss": last["loss"],
            **{f"train/{k}": v for k, v in parts.items()},
            "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": last["grad_norm"],
            "train/bad_steps_in_row": self.state.bad_in_row,
            "train/epoch": self.loader.epoch,
            **{f"perf/{k}": v for k, v in timer.rates().items()},
            **{f"perf/{k}": v for k, v in achieved.items()},
            "perf/audio_padding_ratio": padded / max(frames["audio_frames_padded"], 1),
            "perf/prompt_position_ratio": interval.prompt_position_ratio(),
            # SpecAugment time masks: the share of valid frames the model did not see
            "data/masked_frame_ratio": frames["masked_frames"] / max(frames["audio_frames"], 1),
            **{f"perf/{k}": v for k, v in skew.items()},
            **{f"data/{k}": v for k, v in problems.items()},
            **self.loader.source_metrics(),  # a mixture's seconds and epochs per source; collective
            **_memory(),
        }
        self.logger.scalars(step, metrics)
        if dist.is_main():
            shown = {"loss": last["loss"], **parts}
            shown |= {"lr": metrics["train/lr"], "gnorm": last["grad_norm"]}
            elapsed = time.time() - self.began
            log.info(format_progress(step, self.cfg.train.max_steps, elapsed, shown, self.start))

    def save(self) -> None:
        """Checkpoint the step just done, then export the trained weights. Collective."""
        self.state.save(self.checkpoints, self.engine)
        extra = {"step": self.state.step, "stage": self.cfg.train.stage}
        export(self.engine, self.run_dir / "export", extra)

    def evaluate(self, step: int) -> None:
        """WER on `data.eval_shards` (if set), logged at `step`. Collective."""
        cfg = self.cfg
        if not cfg.data.eval_shards:
            return
        result = evaluate(
            self.engine.module,
            cfg.data.eval_shards,
            cfg.data.eval_index,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_beams=cfg.eval.num_beams,
            ctc_weight=cfg.eval.ctc_weight,
            normalizer=cfg.eval.normalizer,
            long_audio=cfg.data.long_audio,
            limit=cfg.eval.limit or None,
            synced=self.engine.zero_optimization_stage() == 3,
            bootstrap=0,
        )
        if dist.is_main():
            report = result.report
            self.logger.scalars(
                step,
                {
                    "eval/wer": _or_nan(report.wer),
                    "eval/cer": _or_nan(report.cer.get("cer")),
                    "eval/utterances": report.utterances,
                    "eval/flagged": sum(1 for r in result.rows if r["flags"]),
                    "eval/seconds": result.seconds,
                },
            )
            examples = "\n\n".join(f"REF: {r['ref']}  \nHYP: {r['hyp']}" for r in result.rows[:4])
            self.logger.text(step, "eval/examples", examples)
            # "WER 3.20% over 22 of 24 indexed utterances (...)": what it is over, and why not all
            log.info("step %d: eval %s", step, result.headline())
            self.eval_history[step] = report.wer
        self.timer.restart()

    def finish(self) -> dict[str, Any]:
        """Check that every rank holds the same weights; write and return the summary."""
        digests = dist.all_gather_object(_trainable_digest(self.engine))
        problems = dist.sum_counts(self.loader.problems)  # all ranks' totals, as in metrics.jsonl
        sources = self.loader.source_summary()  # a mixture's totals per source; collective
        if len(set(digests)) != 1:
            raise AudioLLMError(f"trainable parameters differ across ranks: {digests}")
        self.logger.close()
        summary = {
            "stage": self.cfg.train.stage,
            "start_step": self.start,
            "steps": self.cfg.train.max_steps,
            "losses": self.losses,
            "world_size": dist.world_size(),
            "trainable_parameters": self.trainable,
            "parameter_digests": digests,
            "data_problems": problems,
            **({"data_sources": sources} if sources else {}),
            "eval_wer": self.eval_history,
            "wall_seconds": time.time() - self.began,
            "run_dir": str(self.run_dir),
        }
        if dist.is_main():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _trainable_digest(engine) -> str:
    """sha256 of the trainable weights as this rank sees them (gathered under ZeRO-3)."""
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    digest = hashlib.sha256()
    zero3 = engine.zero_optimization_stage() == 3
    with dist.gathered([p for _, p in params], enabled=zero3):
        for name, p in params:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def export(engine, out_dir: Path, extra: dict) -> None:
    """Projector + adapter, gathered from all ranks under ZeRO-3; written by rank 0."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with dist.gathered(params, enabled=engine.zero_optimization_stage() == 3):
        if dist.is_main():
            export_weights(engine.module, out_dir, extra)
    dist.barrier()


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"mem/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
