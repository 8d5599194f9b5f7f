"""The training run: config -> model, data, DeepSpeed engine -> steps -> checkpoints and exports.

`launch/stage1.py` and `launch/stage2.py` only parse arguments and call `train()`, which builds
the run (`train`) and hands it to a `Trainer`, whose `run()` is the step loop: a step
(`train_step`: batches -> forward -> backward -> optimizer step), then a log line, a checkpoint
and an eval when their turn comes. What a checkpoint holds besides DeepSpeed's own state (step
counters, data position, RNG) is one `RunState`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.data import ShardSet, build_train_loader, layout_of
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.evaluate import evaluate
from audio_llm.evaluation.export import export_weights
from audio_llm.model.build import build_audio_llm
from audio_llm.model.rows import count_clips, count_targets
from audio_llm.planning.flops import ModelShape, flops_rates, resolve_peak_tflops, with_flops
from audio_llm.train.checkpoint import (
    CheckpointManager,
    load,
    load_rank_state,
    resolve_resume,
    tag_for,
)
from audio_llm.train.cluster import LastBatches, RunGuard
from audio_llm.train.ds_config import build_ds_config, missing_ds_config_message, resolve_ds_config
from audio_llm.train.faults import fault_point
from audio_llm.train.metrics import MetricsLogger, StepTimer, format_progress, step_time_skew
from audio_llm.train.schedule import make_scheduler

log = logging.getLogger("audio_llm.train.trainer")
# The entries of a `read_steps` row that are not loss parts (`lm_loss`, `<head>_loss`, ...).
ROW_TOTALS = ("loss", "grad_norm")


@dataclasses.dataclass
class StepResult:
    """One optimizer step. Its losses stay on the device; `read_steps` makes numbers of a run of
    steps at once, at log steps, so the loop never waits for the device between them."""

    loss_sums: torch.Tensor  # [1 + heads] this rank's LM loss over target tokens, heads' over clips
    targets: float  # target tokens of the step, all ranks together
    utterances: float  # utterances of the step, all ranks together
    aux_weights: dict[str, float]  # the model's loss heads (e.g. "ctc"): their weights
    grad_norm: Any  # as DeepSpeed keeps it: a device tensor, a float, or None (not computed)
    finite: bool  # False: DeepSpeed skipped the step (non-finite loss or gradient on some rank)
    counts: dict[str, float]
    stop: bool = False  # some rank got a stop signal: every rank stops after this step


def check_start(cfg: Config, ds_config: str | Path, resume: str = "auto") -> Path:
    """Problems any rank can see before building anything: fail all ranks at once, early.

    Every path the run reads (the DeepSpeed config, model folders, the projector to start from,
    shards and their indexes, a resume folder) is checked here, before minutes of model loading,
    and all problems are named in one error. Returns the DeepSpeed config's path
    (`ds_config.resolve_ds_config`: a relative one may live under the repository top).
    """
    problems = []
    ds_path = resolve_ds_config(ds_config)
    if ds_path is None:
        problems.append(missing_ds_config_message(ds_config))
    # Local checkpoint folders only (this package never downloads): the files from_pretrained
    # needs first, so that a wrong path fails here and not after the other model has loaded.
    for key, folder, files in (
        ("model.encoder", cfg.model.encoder, ("config.json", "preprocessor_config.json")),
        ("model.llm", cfg.model.llm, ("config.json",)),
    ):
        if not folder:
            problems.append(f"{key} is not set: name a local checkpoint folder (or a hub id)")
        elif not Path(folder).is_dir():
            if _hub_id(folder):  # from_pretrained finds it in the local Hugging Face cache
                continue
            problems.append(f"{key} {folder!r}: no such folder (a local checkpoint folder)")
        elif missing := [f for f in files if not Path(folder, f).is_file()]:
            problems.append(f"{key} {folder!r}: no {' or '.join(missing)} in it")
    if cfg.train.stage == 2 and not cfg.model.projector_init:
        problems.append(
            "stage 2 starts from a stage-1 projector: set model.projector_init to "
            "STAGE1_RUN/export/projector.safetensors"
        )
    elif cfg.model.projector_init and not Path(cfg.model.projector_init).is_file():
        problems.append(f"model.projector_init {cfg.model.projector_init!r}: no such file")
    shard_sets = [
        (
            f"data.train_shards[{i}] ({s.name})" if cfg.data.mixed else "data.train_shards",
            s.shards,
            s.index,
        )
        for i, s in enumerate(cfg.data.sources())
    ]
    if cfg.data.eval_shards:
        shard_sets.append(("data.eval_shards", cfg.data.eval_shards, cfg.data.eval_index))
    train_modes = {}  # a mixture's sources must hold one kind of payload
    for key, spec, index in shard_sets:
        try:
            shards = ShardSet.open(spec, index)  # the index exists and lists every shard
        except AudioLLMError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if key.startswith("data.train_shards"):
            train_modes[key] = shards.mode
        # URL specs are only matched against the index; local ones must exist too.
        local = [s.url for s in shards.shards if not urlparse(s.url).scheme]
        absent = [url for url in local if not Path(url).is_file()]
        if absent:
            problems.append(f"{key}: {len(absent)} shard(s) do not exist, e.g. {absent[0]}")
    if len(set(train_modes.values())) > 1:
        problems.append(
            f"data.train_shards mixes packing modes {train_modes}: repack to one --mode"
        )
    try:
        resolve_resume(resume, cfg.train.out_dir)
    except AudioLLMError as exc:
        problems.append(f"--resume: {exc}")
    if problems:
        raise AudioLLMError(
            f"{len(problems)} problem(s) with the paths this run reads (nothing was loaded):\n  - "
            + "\n  - ".join(problems)
            + f"\nRelative paths are read from the working directory ({Path.cwd()}): fix them "
            "in --config FILE or as section.key=value overrides, or run from the folder they are "
            "relative to."
        )
    if ds_path != Path(ds_config):
        log.info("DeepSpeed config %s: reading %s", ds_config, ds_path)
    return ds_path


def _hub_id(name: str) -> bool:
    """`org/name`, as a Hugging Face hub id is written (not a relative path that is missing)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_engine(engine) -> None:
    """Refuse an engine that would apply a step with non-finite gradients: `train_step` relies on
    DeepSpeed's own check before the optimizer step to skip such steps on every rank."""
    opt = engine.optimizer
    skips = hasattr(opt, "overflow")  # what DeepSpeed's engine reads to skip a step
    if engine.zero_optimization_stage() in (1, 2):  # the check is optional there
        skips = skips and getattr(opt, "compute_grad_norm", True)
        skips = skips and (opt.dtype != torch.bfloat16 or getattr(opt, "check_grad_overflow", True))
    if not skips:
        raise AudioLLMError(
            "this DeepSpeed config would apply steps with non-finite gradients (ZeRO stage 0 in "
            "float32, bf16.check_grad_overflow=false or zero_optimization.compute_grad_norm=false):"
            " use ZeRO stage 1-3 (ds_configs/zero2.json) and leave those two at their defaults"
        )


def train_step(
    engine,
    batches: Iterator[dict],
    accum: int,
    timer: StepTimer,
    agree: Callable[[list[float]], tuple[list[float], bool]] | None = None,
) -> StepResult:
    """One optimizer step over `accum` micro-batches.

    Every target token of the step weighs the same, whichever micro-batch and rank it is in: the
    step minimises sum(token LM losses) / (target tokens of all ranks) plus, per loss head of the
    model (the CTC head: `train.ctc_weight`), weight * sum(clip losses) / (clips of all ranks).
    The counts come from the host batches (the model's own rule, `count_targets`) in one small
    CPU all-reduce before the first forward; nothing else waits for the device. `agree` (the
    trainer's `RunGuard.agree`) does that all-reduce with a stop flag added, so the ranks learn
    in it whether any of them got a stop signal (`StepResult.stop`).

    A non-finite loss on any rank skips the step on every rank: its micro-batch's gradient is
    made NaN, the gradient all-reduce carries it to every rank, and DeepSpeed's non-finite check
    before the optimizer step (see `check_engine`) skips the step: weights and optimizer state
    stay, the lr schedule waits, and the step is counted (`finite` is False).
    """
    module = engine.module
    micro = [next(batches) for _ in range(accum)]  # host tensors: counted before any forward
    timer.data_ready()
    counts: Counter = Counter()
    for batch in micro:
        counts.update(batch["stats"])
    local = [sum(count_targets(b, module.audio_token_id) for b in micro)]
    local.append(sum(count_clips(b) for b in micro))
    (targets, utterances), stop = agree(local) if agree else (dist.sum_on_host(local), False)
    # DeepSpeed 0.19.8 divides the loss by gradient_accumulation_steps in engine.backward
    # (scale_wrt_gas) and the summed gradients by the data-parallel world size (ZeRO-1/2
    # average_tensor / ZeRO-3 reduce: `/ dp_world_size`, with gradient_predivide_factor f
    # applied as 1/f before and f/world after, so 1/world in all). Scaling each sum by
    # accum * world / count leaves sum(losses) / count in the gradient.
    spread = engine.gradient_accumulation_steps() * engine.dp_world_size
    weights = {name: float(head.weight) for name, head in module.loss_heads().items()}
    lm_scale = spread / max(targets, 1.0)
    aux_scales = {name: spread * w / max(utterances, 1.0) for name, w in weights.items()}
    device = engine.device
    sums = torch.zeros(1 + len(weights), device=device)
    skipped_before = engine.skipped_steps
    for batch in micro:
        out = engine(**module.batch_inputs(batch, device))
        objective = out.lm_loss_sum * lm_scale
        step_sums = [out.lm_loss_sum.detach().float()]
        for name, scale in aux_scales.items():
            objective = objective + out.aux_loss_sums[name] * scale
            step_sums.append(out.aux_loss_sums[name].detach().float())
        # NaN, not 1, times a non-finite loss: every gradient of this micro-batch becomes NaN,
        # whatever the loss's own backward gives, so DeepSpeed's check cannot miss it.
        finite = torch.isfinite(objective.detach())
        objective = objective * torch.where(finite, 1.0, float("nan")).to(objective.dtype)
        engine.backward(objective)
        engine.step()
        sums += torch.stack(step_sums)
    return StepResult(
        loss_sums=sums,
        targets=targets,
        utterances=utterances,
        aux_weights=weights,
        grad_norm=engine.get_global_grad_norm(),  # a cached value: no collective, no sync
        finite=engine.skipped_steps == skipped_before,
        counts=dict(counts),
        stop=stop,
    )


def read_steps(results: list[StepResult]) -> list[dict[str, float]]:
    """Per step: `loss` (the objective, global means), `grad_norm` and, with loss heads,
    `lm_loss` (per target token) and `<head>_loss` (per clip, e.g. `ctc_loss`). Collective, for
    log steps: one all-reduce and one device read for the whole run of steps."""
    if not results:
        return []
    sums = torch.stack([r.loss_sums for r in results])
    if dist.is_initialized():
        torch.distributed.all_reduce(sums)
    norms = [r.grad_norm for r in results]
    on_device = [i for i, n in enumerate(norms) if isinstance(n, torch.Tensor)]
    if on_device:
        values = torch.stack([norms[i].detach().float().reshape(()) for i in on_device]).tolist()
        for i, value in zip(on_device, values, strict=True):
            norms[i] = value
    out = []
    for result, (lm_sum, *aux_sums), norm in zip(results, sums.tolist(), norms, strict=True):
        lm = lm_sum / max(result.targets, 1.0)
        row = {"loss": lm, "grad_norm": float("nan") if norm is None else float(norm)}
        if result.aux_weights:
            loss, parts = lm, {"lm_loss": lm}
            for (name, weight), total in zip(result.aux_weights.items(), aux_sums, strict=True):
                parts[f"{name}_loss"] = total / max(result.utterances, 1.0)
                loss = loss + weight * parts[f"{name}_loss"]
            row.update(loss=loss, **parts)
        out.append(row)
    return out


class RunState:
    """What a checkpoint holds besides DeepSpeed's engine state, saved and restored as one.

    The counters (`step`, `bad_in_row`: non-finite steps in a row) and the config are the same
    on every rank: they go in the checkpoint's client state. The data position and the RNG
    streams are this rank's own: a file per rank. The keys are those every earlier run saved,
    so old run folders resume.
    """

    def __init__(self, cfg: Config, loader) -> None:
        self.cfg, self.loader = cfg, loader
        self.step, self.bad_in_row = 0, 0

    def count(self, step: int, finite: bool) -> None:
        """Step `step` is done; a skipped (non-finite) one lengthens the run of bad steps."""
        self.step = step
        self.bad_in_row = 0 if finite else self.bad_in_row + 1

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "config": self.cfg.to_dict()}

    def rank_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "rng": _rng_state()}

    def save(self, checkpoints: CheckpointManager, engine) -> None:
        """A checkpoint of the engine and this state after step `self.step`. Collective."""
        checkpoints.save(engine, self.step, self.client_state(), self.rank_state())

    def resume(self, engine, path: Path) -> None:
        """Restore the engine, the counters, this rank's data position and its RNG from the
        checkpoint folder `path`. Collective."""
        client = load(engine, path)
        self.step, self.bad_in_row = int(client["step"]), int(client.get("bad_in_row", 0))
        own = load_rank_state(path)
        if own is None:
            raise AudioLLMError(f"{path}: no data position for rank {dist.rank()}")
        self.loader.load_state_dict(own["loader"])
        _set_rng_state(own["rng"])


def train(cfg: Config, ds_config: str, resume: str = "auto") -> dict[str, Any]:
    """Train `cfg.train.max_steps` optimizer steps; returns a summary (rank 0 has the losses)."""
    ds_config = str(check_start(cfg, ds_config, resume))
    dist.init_distributed(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    if not torch.cuda.is_available() and cfg.model.dtype != "float32":
        log.warning("no CUDA: model.dtype %s -> float32 (CPU training)", cfg.model.dtype)
        cfg.model.dtype = "float32"
    run_dir = Path(cfg.train.out_dir)
    rank, world = dist.rank(), dist.world_size()
    dist.seed_everything(cfg.train.seed)  # identical projector/LoRA init on every rank

    model = build_audio_llm(
        cfg.model,
        cfg.lora if cfg.use_lora else None,
        device=dist.device(),
        ctc_weight=cfg.train.ctc_weight,
    )
    # from_pretrained leaves the LLM in eval mode, where transformers never checkpoints a layer
    # (and dropout is off): train in training mode from step 1, fresh or resumed, not only after
    # the first eval restores it. AudioLLM.train keeps the frozen encoder in eval.
    model.train()
    loader = build_train_loader(cfg.data, layout_of(model), rank=rank, world_size=world)
    ds = build_ds_config(ds_config, cfg, world)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_shape = ModelShape.from_model(model)  # before ZeRO-3 partitions the weights away
    from audio_llm.train.ds_ops import normalize_cuda_arch_list

    normalize_cuda_arch_list()  # before deepspeed.initialize JIT-builds FusedAdam ('9.0a')
    import deepspeed  # after the cheap checks: importing it costs seconds

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, cfg.train),
    )
    check_engine(engine)
    checkpoints = CheckpointManager(run_dir, cfg.train.keep_last)
    state = RunState(cfg, loader)
    resume_from = resolve_resume(resume, run_dir)
    if resume_from is not None:
        state.resume(engine, resume_from)
        log.info("rank %d resumed from %s at step %d", rank, resume_from, state.step)

    # Steps after the checkpoint are logged again: an earlier attempt's rows there are dropped.
    logger = MetricsLogger(run_dir, purge_step=state.step + 1 if resume_from is not None else 0)
    if dist.is_main():
        log.info(
            "stage %d: %d trainable parameters, %d ranks, %d batches per rank per epoch",
            cfg.train.stage,
            trainable,
            world,
            loader.batches_per_epoch,
        )
        (run_dir / "config.yaml").write_text(_yaml(cfg))
    # stop signals and the heartbeat from here on
    guard = RunGuard(cfg, run_dir, zero_stage=engine.zero_optimization_stage())
    trainer = Trainer(
        cfg, engine, loader, state, checkpoints, logger, flops_shape, trainable, guard=guard
    )
    try:
        return trainer.run()
    finally:
        guard.close()


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

    `train()` builds the model, data, engine and `RunState` (resumed or fresh) and calls `run()`.
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


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
