"""One optimizer step (`train_step`: batches -> forward -> backward -> step) and reading the
results of a run of steps at a log step (`read_steps`), with the engine check the step relies on
(`check_engine`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from audio_llm import dist
from audio_llm.errors import AudioLLMError
from audio_llm.model.rows import count_clips, count_targets
from audio_llm.train.metrics import StepTimer

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
