"""The training run: config -> model, data, DeepSpeed engine -> steps -> checkpoints and exports.

`launch/stage1.py` and `launch/stage2.py` only parse arguments and call `train()`. The step
(`train_step`) reads top to bottom: batches -> forward -> backward -> optimizer step -> metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.data import ShardSet, build_loader
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.evaluate import evaluate
from audio_llm.evaluation.export import export_weights
from audio_llm.model.audio_llm import build_audio_llm, count_targets
from audio_llm.planning.flops import ModelShape, flops_rates, with_flops
from audio_llm.train.checkpoint import CheckpointManager, load, load_rank_state, resolve_resume
from audio_llm.train.ds_config import build_ds_config, missing_ds_config_message, resolve_ds_config
from audio_llm.train.faults import fault_point
from audio_llm.train.metrics import MetricsLogger, StepTimer, format_progress, step_time_skew
from audio_llm.train.schedule import make_scheduler

log = logging.getLogger("audio_llm.train.trainer")
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


LOSS_PARTS = ("lm_loss", "ctc_loss")


@dataclasses.dataclass
class StepResult:
    """One optimizer step. Its losses stay on the device; `read_steps` makes numbers of a run of
    steps at once, at log steps, so the loop never waits for the device between them."""

    loss_sums: torch.Tensor  # [2] this rank's LM loss summed over target tokens, CTC over clips
    targets: float  # target tokens of the step, all ranks together
    utterances: float  # utterances of the step, all ranks together
    ctc_weight: float
    grad_norm: Any  # as DeepSpeed keeps it: a device tensor, a float, or None (not computed)
    finite: bool  # False: DeepSpeed skipped the step (non-finite loss or gradient on some rank)
    counts: dict[str, float]


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
        if not Path(folder).is_dir():
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
    shard_sets = [("data.train_shards", cfg.data.train_shards, cfg.data.train_index)]
    if cfg.data.eval_shards:
        shard_sets.append(("data.eval_shards", cfg.data.eval_shards, cfg.data.eval_index))
    for key, spec, index in shard_sets:
        try:
            shards = ShardSet.open(spec, index)  # the index exists and lists every shard
        except AudioLLMError as exc:
            problems.append(f"{key}: {exc}")
            continue
        # URL specs are only matched against the index; local ones must exist too.
        local = [s.url for s in shards.shards if not urlparse(s.url).scheme]
        absent = [url for url in local if not Path(url).is_file()]
        if absent:
            problems.append(f"{key}: {len(absent)} shard(s) do not exist, e.g. {absent[0]}")
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


def train_step(engine, batches: Iterator[dict], accum: int, timer: StepTimer) -> StepResult:
    """One optimizer step over `accum` micro-batches.

    Every target token of the step weighs the same, whichever micro-batch and rank it is in: the
    step minimises sum(token LM losses) / (target tokens of all ranks) + ctc_weight *
    sum(clip CTC losses) / (clips of all ranks). The counts come from the host batches (the
    model's own rule, `count_targets`) in one small CPU all-reduce before the first forward;
    nothing else waits for the device.

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
    local.append(sum(len(b["labels"]) for b in micro))
    targets, utterances = dist.sum_on_host(local)
    # DeepSpeed 0.19.8 divides the loss by gradient_accumulation_steps in engine.backward
    # (scale_wrt_gas) and the summed gradients by the data-parallel world size (ZeRO-1/2
    # average_tensor / ZeRO-3 reduce: `/ dp_world_size`, with gradient_predivide_factor f
    # applied as 1/f before and f/world after, so 1/world in all). Scaling each sum by
    # accum * world / count leaves sum(losses) / count in the gradient.
    spread = engine.gradient_accumulation_steps() * engine.dp_world_size
    ctc_weight = float(getattr(module, "ctc_weight", 0.0))
    lm_scale = spread / max(targets, 1.0)
    ctc_scale = spread * ctc_weight / max(utterances, 1.0)
    device = engine.device
    sums = torch.zeros(2, device=device)
    skipped_before = engine.skipped_steps
    for batch in micro:
        out = engine(**{k: batch[k].to(device) for k in TENSOR_KEYS if k in batch})
        objective = out.lm_loss_sum * lm_scale
        step_sums = [out.lm_loss_sum.detach().float(), sums.new_zeros(())]
        if ctc_weight > 0:
            objective = objective + out.ctc_loss_sum * ctc_scale
            step_sums[1] = out.ctc_loss_sum.detach().float()
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
        ctc_weight=ctc_weight,
        grad_norm=engine.get_global_grad_norm(),  # a cached value: no collective, no sync
        finite=engine.skipped_steps == skipped_before,
        counts=dict(counts),
    )


def read_steps(results: list[StepResult]) -> list[dict[str, float]]:
    """Per step: `loss` (the objective, global means), `grad_norm` and, with a CTC term,
    `lm_loss` (per target token) and `ctc_loss` (per clip). Collective, for log steps: one
    all-reduce and one device read for the whole run of steps."""
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
    for result, (lm_sum, ctc_sum), norm in zip(results, sums.tolist(), norms, strict=True):
        lm = lm_sum / max(result.targets, 1.0)
        row = {"loss": lm, "grad_norm": float("nan") if norm is None else float(norm)}
        if result.ctc_weight > 0:
            ctc = ctc_sum / max(result.utterances, 1.0)
            row.update(loss=lm + result.ctc_weight * ctc, lm_loss=lm, ctc_loss=ctc)
        out.append(row)
    return out


def train(cfg: Config, ds_config: str, resume: str = "auto") -> dict[str, Any]:
    """Train `cfg.train.max_steps` optimizer steps; returns a summary (rank 0 has the losses)."""
    ds_config = str(check_start(cfg, ds_config, resume))
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

    # Steps after `start` are logged again: an earlier attempt's rows there are dropped.
    logger = MetricsLogger(run_dir, purge_step=start + 1 if resume_from is not None else 0)
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
    pending: list[StepResult] = []  # steps whose losses are still on the device
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
            # "WER 3.20% over 22 of 24 indexed utterances (...)": what it is over, and why not all
            log.info("step %d: eval %s", step, result.headline())
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
        pending.append(result)
        interval_flops += result.counts.get("flops", 0.0)
        audio_frames.update(
            {
                k: result.counts.get(k, 0)
                for k in ("audio_frames", "audio_frames_padded", "masked_frames")
            }
        )
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            read = read_steps(pending)  # every step since the last log: one collective
            first = step - len(pending) + 1
            losses.update({first + i: row["loss"] for i, row in enumerate(read)})
            pending, last = [], read[-1]
            parts = {k: last[k] for k in LOSS_PARTS if k in last}
            skew = step_time_skew(step_s)  # a collective: same steps on every rank
            # Every rank's data problems (a corrupt shard dealt to rank 7 counts too); collective.
            problems = dist.sum_counts(loader.problems)
            # This rank's FLOPs over the wall time of the same steps (read before rates() resets).
            achieved = flops_rates(interval_flops, timer.counts.step_s, cfg.train.peak_tflops)
            interval_flops = 0.0
            frames, audio_frames = audio_frames, Counter()
            padded = frames["audio_frames_padded"] - frames["audio_frames"]
            metrics = {
                "train/loss": last["loss"],
                **{f"train/{k}": v for k, v in parts.items()},
                "train/lr": engine.get_lr()[0],
                "train/grad_norm": last["grad_norm"],
                "train/bad_steps_in_row": bad_in_row,
                "train/epoch": loader.epoch,
                **{f"perf/{k}": v for k, v in timer.rates().items()},
                **{f"perf/{k}": v for k, v in achieved.items()},
                "perf/audio_padding_ratio": padded / max(frames["audio_frames_padded"], 1),
                # SpecAugment time masks: the share of valid frames the model did not see
                "data/masked_frame_ratio": frames["masked_frames"] / max(frames["audio_frames"], 1),
                **{f"perf/{k}": v for k, v in skew.items()},
                **{f"data/{k}": v for k, v in problems.items()},
                **_memory(),
            }
            logger.scalars(step, metrics)
            if dist.is_main():
                shown = {"loss": last["loss"], **parts}
                shown |= {"lr": metrics["train/lr"], "gnorm": last["grad_norm"]}
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
    problems = dist.sum_counts(loader.problems)  # all ranks' totals, as in metrics.jsonl
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
        "data_problems": problems,
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
        help=(
            "DeepSpeed JSON (default ds_configs/zero2.json); 'auto' fields come from the config. "
            "A relative path missing from the working directory is read from the repository top"
        ),
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
