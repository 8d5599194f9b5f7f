"""`audio-llm plan`: memory per GPU, FLOPs per sample and time per epoch, before renting the GPUs.

The models are built on the meta device from their configs (built-in names or checkpoint
folders), so parameter counts are exact and nothing is downloaded or allocated.

Memory per GPU, in bytes. P: all parameters, Pt: trainable ones (projector + LoRA), N: GPUs,
w: bytes per weight (2 for bf16/fp16, 4 for float32), L: the largest layer (DeepSpeed's
definition: most parameters owned by one module), Lt: the largest trainable layer. Mixed precision
keeps fp32 master weights and fp32 gradients beside the 16-bit ones; AdamW adds m and v in fp32.

    ZeRO   weights          gradients                 optimizer (fp32 master + m + v)
    1      w P              w Pt + 4 Pt / N           12 Pt / N
    2      w P              (w + 4) Pt / N            12 Pt / N
    3      w P / N + w L    4 Pt / N + w Lt           12 Pt / N

ZeRO-3 partitions every parameter, frozen ones included, and gathers one layer at a time (the
`w L`, `w Lt` working buffers). `--offload` moves the optimizer (and with ZeRO-3 the parameters)
to CPU memory as `ds_configs/zero3_offload.json` does: ZeRO-1/2 then keep w P (+ w Pt for ZeRO-1's
unpartitioned gradients), ZeRO-3 only the w L + w Lt working buffers. With float32 weights there
is no separate master copy or fp32 gradient (the 4 and 12 become 0 and 8). Communication buckets
(`reduce_bucket_size`, about 0.4 GB each) and the CUDA context are not counted, as in DeepSpeed's
estimator.

With every parameter trainable (Pt = P, Lt = L) and w = 2, the ZeRO-2 line is DeepSpeed's
`2 P + 18 P / N` and ZeRO-3's is its `18 P / N + 4 L`: `plan` prints that figure next to the
value of `estimate_zero{2,3}_model_states_mem_needs` (which assumes every parameter trains) as a
cross-check, and the LoRA-aware figure, which is what this recipe uses.

Activations (w bytes per element unless stated, per micro-batch of B rows of T positions) are the
tensors autograd keeps for backward, measured on the tiny model (`tests/planning/test_plan.py`):

- each LLM layer, per position: both RMSNorm inputs in fp32 (8 h bytes: Qwen2's norm upcasts);
  q, k, v and the attention output (2 q_dim + 2 kv_dim); SwiGLU's gate, up and SiLU outputs
  (3 I). Frozen projections keep no input: their backward needs only the weight.
- LoRA with dropout: each adapted module keeps its dropped-out input and mask (2 x its input
  width: 5 h + q_dim + I over the 7 default targets) and its rank-r A output.
- gradient checkpointing: each layer keeps only its input (h), plus one layer's full set while
  it is recomputed.
- logits: w + 8 bytes per vocabulary entry and position (the logits, the loss's fp32 copy and
  the fp32 log-probabilities it keeps), the largest single term at Qwen2's 152k vocabulary.
- the frozen encoder runs without grad: one layer's working set (3 d + ffn per frame) at a time.

Against the GPU (`--gpu-memory`, GiB): the run fits if the total above stays within
(1 - MEMORY_HEADROOM) of it. The headroom (10%) is for what the figures leave out: the CUDA
context, DeepSpeed's communication buckets and the allocator's fragmentation. Only activations
grow with the micro batch, so the largest micro batch that fits is found by evaluating the same
formulas batch by batch, with and without gradient checkpointing.

FLOPs per sample come from `planning.flops` for a sample of the mean length (batch padding not
included: length-bucketed batches keep it under 5%). Time per epoch = epoch hours of audio /
mean clip length x FLOPs per sample / (GPUs x peak x MFU).

A weighted mixture (`--mix NAME=HOURS:WEIGHT`, as `data.train_shards` lists sources) makes the
epoch the loader's round: as many samples as the sources hold together (their hours), a share
weight / sum of weights of them from each source. Each source's line says how many passes over
it an epoch makes and how long one pass takes (clips of the same mean length assumed).

The command line (flags and printing) is `audio_llm.cli.plan`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from audio_llm.errors import AudioLLMError
from audio_llm.planning.flops import (
    ENCODER_FRAMES_PER_SECOND,
    Flops,
    ModelShape,
    audio_positions,
    training_flops,
)

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense, SXM
_WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Kept free of the GPU's memory: CUDA context, communication buckets, allocator fragmentation.
MEMORY_HEADROOM = 0.10


@dataclass(frozen=True)
class PlanSpec:
    """One training setup to plan (the `audio-llm plan` options)."""

    encoder: str = "whisper-large-v3"
    llm: str = "qwen2-vl-7b"
    gpus_per_node: int = 8
    nodes: int = 1
    zero: int = 2
    offload: bool = False
    lora_rank: int = 16
    lora_dropout: float = 0.05
    stack: int = 1
    projector: str = "linear"
    projector_hidden: int = 0
    varlen: bool = False
    precomputed_encoder: bool = False
    batch: int = 8
    audio_seconds: float = 12.7
    text_tokens: int = 70
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    mfu: float = 0.4
    peak_tflops: float = H100_BF16_TFLOPS
    epoch_hours: float = 960.0
    gpu_memory: float = 80.0  # GiB per GPU (H100/A100 80 GB)
    mix: tuple[tuple[str, float, float], ...] = ()  # (name, hours, weight) of mixed corpora

    def __post_init__(self) -> None:
        checks = [
            (self.gpus_per_node >= 1, f"--gpus-per-node must be >= 1 (got {self.gpus_per_node})"),
            (self.nodes >= 1, f"--nodes must be >= 1 (got {self.nodes})"),
            (self.zero in (1, 2, 3), f"--zero must be 1, 2 or 3 (got {self.zero})"),
            (self.lora_rank >= 0, f"--lora-rank must be >= 0 (got {self.lora_rank})"),
            (0 <= self.lora_dropout < 1, "LoRA dropout must be in [0, 1)"),
            (self.stack >= 1, f"--stack must be >= 1 (got {self.stack})"),
            (self.projector in ("linear", "mlp"), "--projector must be linear or mlp"),
            (self.projector_hidden >= 0, "--projector-hidden must be >= 0"),
            (self.batch >= 1, f"--batch must be >= 1 (got {self.batch})"),
            (
                0 < self.audio_seconds <= 30,
                f"--audio-seconds must be in (0, 30]: Whisper's window (got {self.audio_seconds})",
            ),
            (self.text_tokens >= 0, f"--text-tokens must be >= 0 (got {self.text_tokens})"),
            (self.dtype in _WEIGHT_BYTES, f"--dtype must be one of {sorted(_WEIGHT_BYTES)}"),
            (0 < self.mfu <= 1, f"--mfu must be in (0, 1] (got {self.mfu})"),
            (self.peak_tflops > 0, f"--peak-tflops must be > 0 (got {self.peak_tflops})"),
            (self.epoch_hours > 0, f"--epoch-hours must be > 0 (got {self.epoch_hours})"),
            (self.gpu_memory > 0, f"--gpu-memory must be > 0 GiB (got {self.gpu_memory})"),
        ]
        for name, hours, weight in self.mix:
            checks.append((hours > 0, f"--mix {name}: hours must be > 0 (got {hours:g})"))
            checks.append((weight > 0, f"--mix {name}: weight must be > 0 (got {weight:g})"))
        for ok, message in checks:
            if not ok:
                raise AudioLLMError(message)

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the AudioLLM built on the meta device."""

    encoder: int
    projector: int
    lora: int
    llm: int  # the LLM's own weights (tied embeddings once), vision tower excluded
    vision: int
    largest_layer: int  # DeepSpeed's `largest_layer_params`: most parameters of one module
    largest_trainable_layer: int

    @property
    def trainable(self) -> int:
        return self.projector + self.lora

    @property
    def frozen(self) -> int:
        return self.encoder + self.llm + self.vision

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@functools.lru_cache(maxsize=8)
def count_params(
    encoder: str, llm: str, stack: int, projector: str, projector_hidden: int, lora_rank: int
) -> tuple[ParamCounts, ModelShape]:
    """Build the model on the meta device (as training would: frozen encoder and LLM, projector,
    LoRA from the default regex) and count its parameters."""
    import torch

    from audio_llm.config import LoraConfig
    from audio_llm.model.lora import (
        LLM_LAYERS,
        LLM_OTHER,
        PROJECTOR,
        VISION,
        component_of,
        meta_model,
    )
    from audio_llm.model.projector import AudioProjector

    model = meta_model(encoder, llm)
    with torch.device("meta"):
        model.projector = AudioProjector(
            model.encoder.d_model,
            model.llm.config.text_config.hidden_size,
            stack=stack,
            kind=projector,
            hidden=projector_hidden,
        )
    model.llm.requires_grad_(False)
    if lora_rank:
        from audio_llm.model.lora import apply_lora

        with warnings.catch_warnings():  # transformers' deprecation notes from inside PEFT
            warnings.simplefilter("ignore")
            apply_lora(model, LoraConfig(rank=lora_rank))
    by_part = dict.fromkeys(("encoder", "projector", "lora", "llm", "vision"), 0)
    unique = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        unique.setdefault(id(p), (name, p))
    for name, p in unique.values():
        part = component_of(name)
        if ".lora_" in name:
            by_part["lora"] += p.numel()
        elif part == PROJECTOR:
            by_part["projector"] += p.numel()
        elif part == VISION:
            by_part["vision"] += p.numel()
        elif part in (LLM_LAYERS, LLM_OTHER):
            by_part["llm"] += p.numel()
        else:
            by_part["encoder"] += p.numel()
    largest, largest_trainable = 0, 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        largest = max(largest, sum(p.numel() for p in own))
        largest_trainable = max(largest_trainable, sum(p.numel() for p in own if p.requires_grad))
    counts = ParamCounts(
        **by_part, largest_layer=largest, largest_trainable_layer=largest_trainable
    )
    if counts.trainable != sum(p.numel() for _, p in unique.values() if p.requires_grad):
        raise AudioLLMError("plan: trainable parameters are not the projector and LoRA alone")
    return counts, ModelShape.from_model(model)


def model_state_bytes(
    zero: int,
    gpus: int,
    total: int,
    trainable: int,
    largest: int,
    largest_trainable: int,
    weight_bytes: int = 2,
    offload: bool = False,
) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states (table in the module docstring)."""
    w, n = weight_bytes, gpus
    mixed = w < 4
    grad32, master = (4 if mixed else 0), (4 if mixed else 0)
    optimizer = (master + 8) * trainable / n
    if zero == 1:
        weights = w * total
        grads = w * trainable + grad32 * trainable / n
    elif zero == 2:
        weights = w * total
        grads = (w + grad32) * trainable / n
    else:
        weights = w * total / n + w * largest
        grads = 4 * trainable / n + w * largest_trainable
    if offload:
        optimizer = 0.0
        if zero == 1:
            grads = w * trainable
        elif zero == 2:
            grads = 0.0
        else:
            weights, grads = w * largest, w * largest_trainable
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def deepspeed_estimate(spec: PlanSpec, counts: ParamCounts) -> dict | None:
    """DeepSpeed's own `estimate_zero{2,3}_model_states_mem_needs` (every parameter trainable,
    16-bit weights), in bytes per GPU and per CPU; None for ZeRO-1, which it does not cover."""
    if spec.zero == 1:
        return None
    if spec.zero == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            counts.total, spec.gpus_per_node, spec.nodes, cpu_offload=spec.offload
        )
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.total,
            counts.largest_layer,
            spec.gpus_per_node,
            spec.nodes,
            cpu_offload=spec.offload,
            cpu_offload_params=spec.offload,
        )
    return {"gpu": float(gpu), "cpu": float(cpu)}


def activation_bytes(
    shape: ModelShape,
    rows: int,
    positions: int,
    encoder_frames: int,
    weight_bytes: int = 2,
    lora_rank: int = 0,
    lora_dropout: float = 0.05,
    checkpointing: bool = False,
) -> dict[str, float]:
    """Per-GPU activation bytes for one micro-batch (formulas in the module docstring)."""
    w, h, tokens = weight_bytes, shape.d_llm, rows * positions
    layer = 8 * h + w * (2 * shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate)
    if lora_rank:
        inputs = 5 * h + shape.q_dim + shape.intermediate  # the 7 default targets' input widths
        layer += w * ((2 if lora_dropout > 0 else 1) * inputs + 7 * lora_rank)
    if checkpointing:
        layers = tokens * (shape.llm_layers * w * h + layer)
    else:
        layers = tokens * shape.llm_layers * layer
    layers += tokens * 4 * h  # the final norm's fp32 input
    logits = tokens * shape.vocab * (w + 8)
    encoder = 0.0
    if encoder_frames:
        encoder = rows * encoder_frames * (3 * shape.d_encoder + shape.encoder_ffn) * w
    return {"llm_layers": layers, "logits": logits, "encoder": encoder}


def largest_fitting(fits: Callable[[int], bool], limit: int = 1 << 20) -> int:
    """The largest n in [1, limit] with fits(n) (fits must be monotone: true up to some n), or 0."""
    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low); grow high until it does not fit, then bisect
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def make_plan(spec: PlanSpec) -> dict:
    """Everything `audio-llm plan` prints, as one JSON-ready dict (bytes, FLOPs, seconds)."""
    counts, shape = count_params(
        spec.encoder, spec.llm, spec.stack, spec.projector, spec.projector_hidden, spec.lora_rank
    )
    shape = dataclasses.replace(shape, encoder_mode="varlen" if spec.varlen else "padded")
    w = _WEIGHT_BYTES[spec.dtype]
    sample = _sample(spec, shape)
    states = model_state_bytes(
        spec.zero,
        spec.gpus,
        counts.total,
        counts.trainable,
        counts.largest_layer,
        counts.largest_trainable_layer,
        w,
        spec.offload,
    )
    activations_for = _activations_for(spec, shape, sample, w)
    activations = activations_for(spec.batch, spec.gradient_checkpointing)
    memory = {**states, "activations": sum(activations.values())}
    memory["total"] = sum(memory.values())
    # The lm_head runs on the transcript's positions only; the text positions bound them above.
    flops = training_flops(
        shape,
        sample["encoder_frames"],
        sample["positions"],
        1,
        not spec.precomputed_encoder,
        scored=spec.text_tokens,
    )
    return {
        "spec": dataclasses.asdict(spec),
        "params": {
            **dataclasses.asdict(counts),
            "trainable": counts.trainable,
            "frozen": counts.frozen,
            "total": counts.total,
        },
        "sample": sample,
        "memory_per_gpu": memory,
        "activations": activations,
        "fit": _fit(spec, states, memory["total"], activations_for),
        "model_states_cross_check": _cross_check(spec, counts, states),
        "flops_per_sample": {**dataclasses.asdict(flops), "total": flops.total},
        "epoch": (epoch := _epoch(spec, flops)),
        "mixture": _mixture(spec, epoch),
    }


def _sample(spec: PlanSpec, shape: ModelShape) -> dict:
    """A sample of the mean length: its encoder frames (valid, and run), and LLM positions."""
    frames = max(1, round(spec.audio_seconds * ENCODER_FRAMES_PER_SECOND))
    audio = audio_positions(shape, frames)
    encoder_run = 0
    if not spec.precomputed_encoder:
        encoder_run = shape.encoder_max_frames if not spec.varlen else frames
    return {
        "audio_seconds": spec.audio_seconds,
        "encoder_frames": frames,
        "encoder_frames_run": encoder_run,
        "audio_positions": audio,
        "text_tokens": spec.text_tokens,
        "positions": audio + spec.text_tokens,
    }


def _activations_for(
    spec: PlanSpec, shape: ModelShape, sample: dict, weight_bytes: int
) -> Callable[[int, bool], dict[str, float]]:
    """Activation bytes of a micro batch of `rows` samples like `sample`, with or without
    gradient checkpointing."""

    def activations(rows: int, checkpointing: bool) -> dict[str, float]:
        return activation_bytes(
            shape,
            rows,
            sample["positions"],
            sample["encoder_frames_run"],
            weight_bytes,
            spec.lora_rank,
            spec.lora_dropout,
            checkpointing,
        )

    return activations


def _fit(
    spec: PlanSpec,
    states: dict[str, float],
    total: float,
    activations_for: Callable[[int, bool], dict[str, float]],
) -> dict:
    """The plan's `total` bytes against `--gpu-memory` less the headroom, and the largest micro
    batches that fit there, without and with gradient checkpointing."""
    usable = spec.gpu_memory * GIB * (1 - MEMORY_HEADROOM)
    state_total = sum(states.values())

    def fits(rows: int, checkpointing: bool) -> bool:
        return state_total + sum(activations_for(rows, checkpointing).values()) <= usable

    return {
        "gpu_memory": spec.gpu_memory * GIB,
        "headroom": MEMORY_HEADROOM,
        "usable": usable,
        "fits": total <= usable,
        "spare": usable - total,
        "largest_batch": largest_fitting(lambda rows: fits(rows, False)),
        "largest_batch_checkpointing": largest_fitting(lambda rows: fits(rows, True)),
    }


def _cross_check(spec: PlanSpec, counts: ParamCounts, states: dict[str, float]) -> dict:
    """Our model states with every parameter trainable in 16 bits (DeepSpeed's assumption)
    against DeepSpeed's estimator, and the recipe's own (LoRA-aware) figure."""
    as_deepspeed = model_state_bytes(
        spec.zero,
        spec.gpus,
        counts.total,
        counts.total,
        counts.largest_layer,
        counts.largest_layer,
        2,
        spec.offload,
    )
    ours_all = sum(as_deepspeed.values())
    ds = deepspeed_estimate(spec, counts)
    return {
        "ours_all_trainable": ours_all,
        "deepspeed": ds["gpu"] if ds else None,
        "deepspeed_cpu": ds["cpu"] if ds else None,
        "ratio": ours_all / ds["gpu"] if ds else None,
        "ours_lora_aware": sum(states.values()),
    }


def _epoch(spec: PlanSpec, flops: Flops) -> dict:
    """Samples, FLOPs and seconds of one epoch at `spec.mfu` of the GPUs' peak."""
    hours = sum(h for _, h, _ in spec.mix) if spec.mix else spec.epoch_hours
    samples = hours * 3600 / spec.audio_seconds
    epoch_flops = samples * flops.total
    rate = spec.gpus * spec.peak_tflops * 1e12 * spec.mfu
    return {
        "hours_of_audio": hours,
        "samples": samples,
        "flops": epoch_flops,
        "seconds": epoch_flops / rate,
        "samples_per_s_per_gpu": rate / flops.total / spec.gpus,
    }


def _mixture(spec: PlanSpec, epoch: dict) -> list[dict]:
    """Per mixed source: its share of the samples, hours and passes over it per epoch, and the
    time one pass takes."""
    total = sum(w for *_, w in spec.mix)
    out = []
    for name, hours, weight in spec.mix:
        trained = epoch["hours_of_audio"] * weight / total
        out.append(
            {
                "name": name,
                "hours": hours,
                "share": weight / total,
                "hours_per_epoch": trained,
                "passes_per_epoch": trained / hours,
                "seconds_per_pass": epoch["seconds"] * hours / trained,
            }
        )
    return out


# -- text report -----------------------------------------------------------------------------
def _n(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:8.2f} GiB"


def format_plan(plan: dict) -> str:
    """`make_plan`'s dict as the text report `audio-llm plan` prints."""

    spec, p, s, mem = plan["spec"], plan["params"], plan["sample"], plan["memory_per_gpu"]
    act, check, fl, ep = (
        plan["activations"],
        plan["model_states_cross_check"],
        plan["flops_per_sample"],
        plan["epoch"],
    )
    gpus = spec["gpus_per_node"] * spec["nodes"]
    stage = f"LoRA r={spec['lora_rank']}" if spec["lora_rank"] else "projector only (stage 1)"
    if spec["precomputed_encoder"]:
        encoder = "not run: the shards hold its output (--precomputed-encoder)"
    elif spec["varlen"]:
        encoder = f"runs on the {s['encoder_frames_run']} valid frames of each clip (--varlen)"
    else:
        encoder = (
            f"runs on {s['encoder_frames_run']} frames per clip: each clip is padded to Whisper's "
            f"30 s window (--varlen: the {s['encoder_frames']} valid frames only)"
        )
    lines = [
        f"{spec['encoder']} + {spec['llm']}: {gpus} GPUs ({spec['nodes']} x "
        f"{spec['gpus_per_node']}), ZeRO-{spec['zero']}{' + offload' if spec['offload'] else ''}"
        f", {stage}, {spec['projector']} projector stack {spec['stack']}, {spec['dtype']}",
        f"parameters   trainable {_n(p['trainable'])} (projector {_n(p['projector'])}, "
        f"LoRA {_n(p['lora'])}); frozen {_n(p['frozen'])} (encoder {_n(p['encoder'])}, "
        f"LLM {_n(p['llm'])}, vision tower {_n(p['vision'])})",
        f"sample       {s['audio_seconds']} s of audio -> {s['encoder_frames']} encoder frames "
        f"-> {s['audio_positions']} audio + {s['text_tokens']} text = "
        f"{s['positions']} LLM positions; micro batch {spec['batch']}",
        f"encoder      {encoder}",
        "memory per GPU",
        f"  weights      {_gib(mem['weights'])}",
        f"  gradients    {_gib(mem['gradients'])}",
        f"  optimizer    {_gib(mem['optimizer'])}",
        f"  activations  {_gib(mem['activations'])}  (LLM layers {act['llm_layers'] / GIB:.2f}, "
        f"logits {act['logits'] / GIB:.2f}, encoder {act['encoder'] / GIB:.2f}"
        f"{', checkpointed' if spec['gradient_checkpointing'] else ''})",
        f"  total        {_gib(mem['total'])}",
        *_fit_lines(plan),
        "model states (weights + gradients + optimizer) vs DeepSpeed's estimator",
        f"  every parameter trainable (DeepSpeed's assumption): ours "
        f"{_gib(check['ours_all_trainable'])}, DeepSpeed {_gib(check['deepspeed'])}"
        + (f", ratio {check['ratio']:.3f}" if check["ratio"] is not None else " (no ZeRO-1 one)"),
        f"  this recipe (frozen encoder and LLM):              {_gib(check['ours_lora_aware'])}",
        f"compute      {fl['total'] / 1e12:.2f} TFLOP per training sample (encoder "
        f"{fl['encoder'] / 1e12:.2f}, projector {fl['projector'] / 1e12:.3f}, "
        f"LLM {fl['llm'] / 1e12:.2f})",
        f"epoch        {ep['hours_of_audio']:g} h of audio = {_n(ep['samples'])} samples, "
        f"{ep['flops'] / 1e18:.1f} EFLOP: {format_duration(ep['seconds'])} at MFU "
        f"{spec['mfu']:.0%} of {spec['peak_tflops']:g} TFLOP/s x {gpus} GPUs "
        f"({ep['samples_per_s_per_gpu']:.1f} samples/s per GPU)",
        *(
            f"  {m['name']:<10} {m['hours']:g} h, {m['share']:.0%} of the samples: "
            f"{m['passes_per_epoch']:.2f} passes an epoch, one every "
            f"{format_duration(m['seconds_per_pass'])}"
            for m in plan.get("mixture", [])
        ),
    ]
    return "\n".join(lines)


def _fit_lines(plan: dict) -> list[str]:
    """The verdict against `--gpu-memory`, and the largest micro batch that fits."""
    spec, fit, total = plan["spec"], plan["fit"], plan["memory_per_gpu"]["total"]
    verdict = (
        f"yes: {total / GIB:.2f} <= {fit['usable'] / GIB:.2f} GiB usable"
        if fit["fits"]
        else f"NO: {total / GIB:.2f} > {fit['usable'] / GIB:.2f} GiB usable"
    )
    checkpointing = spec["gradient_checkpointing"]

    def largest(n: int, with_checkpointing: bool) -> str:
        setting = "with" if with_checkpointing else "without"
        now = " (this plan)" if with_checkpointing == checkpointing else ""
        return f"{n} {setting} gradient checkpointing{now}"

    if fit["largest_batch_checkpointing"] == 0:
        states = total - plan["memory_per_gpu"]["activations"]
        advice = (
            f"none: weights, gradients and optimizer alone take {states / GIB:.2f} GiB; "
            "try --zero 3, --offload or more GPUs"
        )
    else:
        advice = (
            f"{largest(fit['largest_batch'], False)}, "
            f"{largest(fit['largest_batch_checkpointing'], True)}"
        )
    return [
        f"fits {spec['gpu_memory']:g} GiB? {verdict} ({fit['headroom']:.0%} kept free for the "
        "CUDA context, communication buckets and allocator fragmentation, which the figures "
        "above leave out)",
        f"  largest micro batch that fits: {advice}",
    ]


def format_duration(seconds: float) -> str:
    """`3725` -> `1h02m05s`, `65` -> `1m05s`, `7.2` -> `7s`."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
