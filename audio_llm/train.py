"""The training run: config -> model, data, DeepSpeed engine -> steps -> checkpoints and exports.

`launch/stage1.py` and `launch/stage2.py` only parse arguments and call `train()`. The step
(`train_step`) reads top to bottom: batches -> forward -> backward -> optimizer step -> metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audio_llm import dist
from audio_llm.checkpoint import CheckpointManager, load, load_rank_state, resolve_resume
from audio_llm.config import Config
from audio_llm.data import ShardSet, build_loader
from audio_llm.ds_config import build_ds_config
from audio_llm.errors import AudioLLMError
from audio_llm.evaluate import evaluate
from audio_llm.export import export_weights
from audio_llm.faults import fault_point
from audio_llm.flops import ModelShape, flops_rates, with_flops
from audio_llm.metrics import MetricsLogger, StepTimer, format_progress, step_time_skew
from audio_llm.model import build_audio_llm
from audio_llm.schedule import make_scheduler

log = logging.getLogger("audio_llm.train")
TENSOR_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "input_features",
    "feature_lengths",
    "audio_embeds",
    "audio_lengths",
    "waveforms",
    "waveform_lengths",
)


@dataclasses.dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    counts: dict[str, float]
    parts: dict[str, float] = dataclasses.field(default_factory=dict)  # lm_loss, ctc_loss


LOSS_PARTS = ("lm_loss", "ctc_loss")


def check_start(cfg: Config) -> None:
    """Problems any rank can see before building anything: fail all ranks at once, early."""
    ShardSet.open(cfg.data.train_shards, cfg.data.train_index)  # exists, has an index
    if cfg.train.stage == 2:
        if not cfg.model.projector_init:
            raise AudioLLMError(
                "stage 2 starts from a stage-1 projector: set model.projector_init to "
                "STAGE1_RUN/export/projector.safetensors"
            )
        if not Path(cfg.model.projector_init).is_file():
            raise AudioLLMError(f"model.projector_init {cfg.model.projector_init!r} does not exist")


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (all ranks must call)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def train_step(engine, batches: Iterator[dict], accum: int, timer: StepTimer) -> StepResult:
    """One optimizer step over `accum` micro-batches.

    A non-finite loss on any rank zeroes that micro-batch's gradient on every rank (all ranks
    still run the same collectives), and if the step had one, it is applied at lr 0 so the
    weights do not move: the step is skipped and counted, not trained on.
    """
    device = engine.device
    losses, finite = [], True
    parts: dict[str, list[torch.Tensor]] = {}
    counts: Counter = Counter()
    for _ in range(accum):
        batch = next(batches)
        timer.data_ready()
        counts.update(batch["stats"])
        inputs = {k: batch[k].to(device) for k in TENSOR_KEYS if k in batch}
        out = engine(**inputs)
        loss = out.loss
        bad = _any_rank(not torch.isfinite(loss).item(), device)
        if bad:
            finite = False
            # A graph through every trainable parameter with zero value: zero gradients.
            loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
        else:
            losses.append(loss.detach())
            for name in LOSS_PARTS:
                if out.get(name) is not None:
                    parts.setdefault(name, []).append(out[name].detach().float())
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and not finite:
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0  # the scheduler sets the next step's lr right after
        engine.step()
    means = [torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=device)]
    # The same names on every rank (the model decides, not the batch), so the reduce matches.
    names = list(LOSS_PARTS) if getattr(engine.module, "ctc_weight", 0) > 0 else []
    nan = torch.tensor(float("nan"), device=device)
    means += [torch.stack(parts[n]).mean() if n in parts else nan for n in names]
    mean = torch.stack([m.float() for m in means])
    if dist.is_initialized():  # gloo has no AVG
        torch.distributed.all_reduce(mean)
        mean /= dist.world_size()
    norm = engine.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None else float("nan")
    if finite and not math.isfinite(grad_norm):
        finite = False
    loss, *part_values = mean.tolist()
    parts_mean = dict(zip(names, part_values, strict=True))
    return StepResult(loss, grad_norm, finite, dict(counts), parts_mean)


def train(cfg: Config, ds_config: str, resume: str = "auto") -> dict[str, Any]:
    """Train `cfg.train.max_steps` optimizer steps; returns a summary (rank 0 has the losses)."""
    check_start(cfg)
    dist.init_distributed()
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
    loader = build_loader(
        cfg.data,
        model,
        spec=cfg.data.train_shards,
        index=cfg.data.train_index,
        rank=rank,
        world_size=world,
    )
    ds = build_ds_config(ds_config, cfg, world)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_shape = ModelShape.from_model(model)  # before ZeRO-3 partitions the weights away
    import deepspeed  # after the cheap checks: importing it costs seconds

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, cfg.train),
    )
    checkpoints = CheckpointManager(run_dir, cfg.train.keep_last)
    start, bad_in_row = 0, 0
    resume_from = resolve_resume(resume, run_dir)
    if resume_from is not None:
        client = load(engine, resume_from)
        start, bad_in_row = int(client["step"]), int(client.get("bad_in_row", 0))
        own = load_rank_state(resume_from)
        if own is None:
            raise AudioLLMError(f"{resume_from}: no data position for rank {rank}")
        loader.load_state_dict(own["loader"])
        _set_rng_state(own["rng"])
        log.info("rank %d resumed from %s at step %d", rank, resume_from, start)

    logger = MetricsLogger(run_dir)
    if dist.is_main():
        log.info(
            "stage %d: %d trainable parameters, %d ranks, %d batches per rank per epoch",
            cfg.train.stage,
            trainable,
            world,
            loader.batches_per_epoch,
        )
        (run_dir / "config.yaml").write_text(_yaml(cfg))
    timer, began, losses = StepTimer(), time.time(), {}
    batches = with_flops(iter(loader), flops_shape)  # analytic FLOPs of each padded batch
    interval_flops = 0.0
    audio_frames: Counter = Counter()  # valid and padded audio frames since the last log

    def save(step: int) -> None:
        client = {"step": step, "bad_in_row": bad_in_row, "config": cfg.to_dict()}
        own = {"loader": loader.state_dict(), "rng": _rng_state()}
        checkpoints.save(engine, step, client, own)
        export(engine, run_dir / "export", {"step": step, "stage": cfg.train.stage})

    def run_eval(step: int) -> None:
        if not cfg.data.eval_shards:
            return
        result = evaluate(
            engine.module,
            cfg.data.eval_shards,
            cfg.data.eval_index,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_beams=cfg.eval.num_beams,
            ctc_weight=cfg.eval.ctc_weight,
            normalizer=cfg.eval.normalizer,
            long_audio=cfg.data.long_audio,
            limit=cfg.eval.limit or None,
            synced=engine.zero_optimization_stage() == 3,
            bootstrap=0,
        )
        if dist.is_main():
            report = result.report
            logger.scalars(
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
            logger.text(step, "eval/examples", examples)
            log.info(
                "step %d: eval WER %s over %d utterances", step, _pct(report.wer), report.utterances
            )
            eval_history[step] = report.wer
        timer.restart()

    eval_history: dict[int, float | None] = {}
    if cfg.eval.every and cfg.eval.at_start and start == 0:
        run_eval(0)
    for step in range(start + 1, cfg.train.max_steps + 1):
        result = train_step(engine, batches, cfg.train.grad_accum, timer)
        step_s = timer.step_done(
            samples=int(result.counts.get("samples", 0)),
            audio_seconds=result.counts.get("audio_seconds", 0.0),
            tokens=int(result.counts.get("tokens", 0)),
            positions=int(result.counts.get("positions", 0)),
        )
        bad_in_row = 0 if result.finite else bad_in_row + 1
        if bad_in_row >= cfg.train.max_bad_steps:
            raise AudioLLMError(
                f"{bad_in_row} non-finite steps in a row (last at step {step}): lower train.lr, "
                "check the data (loader problem counts are in the log), or use bf16/fp32"
            )
        losses[step] = result.loss
        interval_flops += result.counts.get("flops", 0.0)
        audio_frames.update(
            {
                k: result.counts.get(k, 0)
                for k in ("audio_frames", "audio_frames_padded", "masked_frames")
            }
        )
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            skew = step_time_skew(step_s)  # a collective: same steps on every rank
            # This rank's FLOPs over the wall time of the same steps (read before rates() resets).
            achieved = flops_rates(interval_flops, timer.counts.step_s, cfg.train.peak_tflops)
            interval_flops = 0.0
            frames, audio_frames = audio_frames, Counter()
            padded = frames["audio_frames_padded"] - frames["audio_frames"]
            metrics = {
                "train/loss": result.loss,
                **{f"train/{k}": v for k, v in result.parts.items()},
                "train/lr": engine.get_lr()[0],
                "train/grad_norm": result.grad_norm,
                "train/bad_steps_in_row": bad_in_row,
                "train/epoch": loader.epoch,
                **{f"perf/{k}": v for k, v in timer.rates().items()},
                **{f"perf/{k}": v for k, v in achieved.items()},
                "perf/audio_padding_ratio": padded / max(frames["audio_frames_padded"], 1),
                # SpecAugment time masks: the share of valid frames the model did not see
                "data/masked_frame_ratio": frames["masked_frames"] / max(frames["audio_frames"], 1),
                **{f"perf/{k}": v for k, v in skew.items()},
                **{f"data/{k}": v for k, v in loader.problems.items()},
                **_memory(),
            }
            logger.scalars(step, metrics)
            if dist.is_main():
                shown = {"loss": result.loss, **result.parts}
                shown |= {"lr": metrics["train/lr"], "gnorm": result.grad_norm}
                log.info(
                    format_progress(step, cfg.train.max_steps, time.time() - began, shown, start)
                )
        if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
            save(step)
            timer.restart()
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
            run_eval(step)
        fault_point("after_step", step)
    digests = dist.all_gather_object(_trainable_digest(engine))
    if len(set(digests)) != 1:
        raise AudioLLMError(f"trainable parameters differ across ranks: {digests}")
    logger.close()
    summary = {
        "stage": cfg.train.stage,
        "start_step": start,
        "steps": cfg.train.max_steps,
        "losses": losses,
        "world_size": world,
        "trainable_parameters": trainable,
        "parameter_digests": digests,
        "data_problems": dict(loader.problems),
        "eval_wer": eval_history,
        "wall_seconds": time.time() - began,
        "run_dir": str(run_dir),
    }
    if dist.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _trainable_digest(engine) -> str:
    """sha256 of the trainable weights as this rank sees them (gathered under ZeRO-3)."""
    import deepspeed

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    digest = hashlib.sha256()
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero3):
        for name, p in params:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def export(engine, out_dir: Path, extra: dict) -> None:
    """Projector + adapter, gathered from all ranks under ZeRO-3; written by rank 0."""
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if dist.is_main():
            export_weights(engine.module, out_dir, extra)
    dist.barrier()


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"mem/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def stage_main(stage: int, argv: list[str] | None = None) -> int:
    """Command line of `launch/stage{1,2}.py` (under `deepspeed`, `torchrun` or plain python)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog=f"launch/stage{stage}.py",
        description=(
            "Stage 1: train the projector (encoder and LLM frozen)."
            if stage == 1
            else "Stage 2: projector (from stage 1) + LoRA on the LLM's projections."
        )
        + " Config: --config FILE, then section.key=value overrides (audio-llm config --explain).",
    )
    parser.add_argument("--config", help="YAML/JSON run config")
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default="ds_configs/zero2.json",
        help="DeepSpeed JSON (default ds_configs/zero2.json); 'auto' fields come from the config",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in train.out_dir, if any), none, or a folder",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from audio_llm.config import load_config

    try:
        cfg = load_config(args.config, [*args.overrides, f"train.stage={stage}"])
        summary = train(cfg, args.deepspeed_config, args.resume)
    except AudioLLMError as exc:
        print(f"stage {stage}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()  # no rank leaves while another is still in a collective
    if dist.is_main():
        steps = summary["losses"]
        if steps:
            first, last = min(steps), max(steps)
            log.info(
                "loss %.4f (step %d) -> %.4f (step %d)", steps[first], first, steps[last], last
            )
        log.info("run folder: %s (tensorboard --logdir %s)", summary["run_dir"], summary["run_dir"])
    return 0
