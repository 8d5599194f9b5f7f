"""Training step time and MFU at real shapes on one GPU (random weights, nothing downloaded).

    python benchmarks/gpu_step.py                                  # large-v3 + Qwen2-VL-2B, LoRA
    python benchmarks/gpu_step.py --llm qwen2-vl-7b --batch 4 --varlen --stack 8
    python benchmarks/gpu_step.py --tiny --steps 2                 # tiny shapes: a CPU smoke run

The model is the package's `AudioLLM` (frozen Whisper encoder -> projector -> Qwen2-VL with LoRA
from the default `lora.target_regex`), assembled from the configs in `model.arch` with random
weights in bf16 (float32 on a CPU) instead of `build_audio_llm`, which loads checkpoint folders.
Every step is forward + backward + AdamW (torch's fused one on CUDA) over a synthetic batch of
`--batch` clips of `--seconds` audio (log-mel given, so the encoder runs) and `--text-tokens`
other positions, all rows the same length, so nothing is padding.

Reported: mean step time over the timed steps (after `--warmup`), LLM tokens (positions) per
second, the analytic training FLOPs of the batch (`planning.flops`, the figure the trainer logs),
achieved TFLOP/s and MFU against `--peak-tflops` (default 989: H100 SXM dense bf16), peak memory,
and the batch's useful FLOPs (`useful_flops_per_step`: each row at its own length, valid encoder
frames only; the seed settings' padded 30 s window is executed, not useful).
The FLOP count takes attention over the full T x T; causal kernels execute about half of it, a few
percent of the total at these lengths.

`--batch-from SHARDS` (with `--encoder` and `--llm` checkpoint folders, e.g. from
`audio-llm tiny --like ...`) times the training path's own pieces instead: the model from
`build_audio_llm` and one batch of `--batch` rows from the package's loader over SHARDS, repeated
every step. `benchmarks/gpu_suite.py` uses it to time the raw step on exactly the batch shapes a
`deepspeed launch/stage2.py` run of the same shards trains on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from audio_llm.config import LoraConfig
from audio_llm.model.arch import resolve_config
from audio_llm.model.audio_llm import AudioLLM
from audio_llm.model.encoder import AudioEncoder
from audio_llm.model.lora import apply_lora
from audio_llm.model.projector import AudioProjector
from audio_llm.model.prompts import IGNORE_INDEX
from audio_llm.planning.flops import ModelShape, batch_flops_from_tensors

H100_BF16_TFLOPS = 989.0
AUDIO_TOKEN_ID = 151654  # <|vision_pad|> in the real tokenizer (config.DEFAULT_AUDIO_TOKEN)


def tiny_configs() -> tuple:
    """Tiny Whisper and Qwen2-VL configs (the shapes of `model.tiny`, no tokenizer needed)."""
    from transformers import Qwen2VLConfig

    from audio_llm.model.tiny import TinySpec, whisper_config

    spec = TinySpec()
    half = spec.llm_hidden // spec.llm_heads // 2
    qwen = Qwen2VLConfig(
        text_config={
            "vocab_size": 512,
            "hidden_size": spec.llm_hidden,
            "intermediate_size": spec.llm_intermediate,
            "num_hidden_layers": spec.llm_layers,
            "num_attention_heads": spec.llm_heads,
            "num_key_value_heads": spec.llm_kv_heads,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                "rope_theta": 1e6,
            },
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": spec.llm_hidden},
        tie_word_embeddings=True,
    )
    return whisper_config(spec), qwen


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> AudioLLM:
    """AudioLLM with random weights from the configs, on `device` in `dtype`."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if args.tiny:
        whisper_cfg, qwen_cfg = tiny_configs()
    else:
        whisper_cfg, qwen_cfg = resolve_config(args.encoder), resolve_config(args.llm)
    for cfg in (whisper_cfg, qwen_cfg):
        cfg._attn_implementation = args.attn
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in place: no float32 copy of the 7B on the GPU
    try:
        with device:
            whisper = WhisperEncoder(whisper_cfg)
            llm = Qwen2VLForConditionalGeneration(qwen_cfg)
            projector = AudioProjector(
                whisper_cfg.d_model,
                qwen_cfg.text_config.hidden_size,
                stack=args.stack,
                kind=args.projector,
            )
    finally:
        torch.set_default_dtype(default)
    llm.requires_grad_(False)
    audio_token = min(AUDIO_TOKEN_ID, qwen_cfg.text_config.vocab_size - 1)
    model = AudioLLM(AudioEncoder(whisper, varlen=args.varlen), projector, llm, audio_token)
    if args.lora_rank:
        apply_lora(model, LoraConfig(rank=args.lora_rank))
    if args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model.to(device)


def synthetic_batch(model: AudioLLM, args: argparse.Namespace, device: torch.device) -> dict:
    """`--batch` rows: template tokens, the audio span, then transcript tokens (the targets)."""
    gen = torch.Generator().manual_seed(0)
    mel = round(args.seconds * 100)
    audio = model.num_audio_tokens(mel)
    vocab = model.llm.get_input_embeddings().num_embeddings
    prefix = 15  # system turn and user-turn opening before the audio span
    transcript = max(1, args.text_tokens - prefix)
    high = min(vocab, model.audio_token_id)  # ordinary tokens: never the placeholder
    text = torch.randint(0, high, (args.batch, prefix + transcript), generator=gen)
    audio_ids = torch.full((args.batch, audio), model.audio_token_id)
    ids = torch.cat([text[:, :prefix], audio_ids, text[:, prefix:]], dim=1)
    labels = ids.clone()
    labels[:, : prefix + audio] = IGNORE_INDEX
    n_mels = model.encoder.num_mel_bins
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "input_features": torch.randn(args.batch, n_mels, mel, generator=gen).to(device),
        "feature_lengths": torch.full((args.batch,), mel).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loaded_model_and_batch(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[AudioLLM, dict, float]:
    """`build_audio_llm` on the checkpoint folders, and the first batch the package's loader
    makes of `--batch-from` (on `device`); also its audio seconds."""
    from audio_llm.config import DataConfig, ModelConfig
    from audio_llm.data import build_loader, layout_of
    from audio_llm.model.build import DTYPES, build_audio_llm

    cfg = ModelConfig(
        encoder=args.encoder,
        llm=args.llm,
        projector=args.projector,
        stack_factor=args.stack,
        varlen_encoder=args.varlen,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype={v: k for k, v in DTYPES.items()}[dtype],
    )
    lora = LoraConfig(rank=args.lora_rank) if args.lora_rank else None
    model = build_audio_llm(cfg, lora, device=device)
    data = DataConfig(train_shards=str(args.batch_from), batch_size=args.batch, num_workers=0)
    batch = next(iter(build_loader(data, layout_of(model), spec=data.train_shards)))
    seconds = float(batch["stats"]["audio_seconds"])
    tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return model, tensors, seconds


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    built = time.perf_counter()
    if args.batch_from:
        model, batch, audio_seconds = loaded_model_and_batch(args, device, dtype)
    else:
        model = build_model(args, device, dtype)
        batch = synthetic_batch(model, args, device)
        audio_seconds = args.batch * args.seconds
    model.train()
    build_s = time.perf_counter() - built
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    shape = ModelShape.from_model(model)
    counted = batch_flops_from_tensors(shape, {k: v.cpu() for k, v in batch.items()})
    flops = counted.executed

    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step}: loss {loss.item()}")
    step_s = sum(times) / len(times)
    tflops = flops.total / step_s / 1e12
    positions = batch["input_ids"].numel()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "model": "tiny" if args.tiny and not args.batch_from else f"{args.encoder} + {args.llm}",
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        },
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "batch_shape": {k: list(v.shape) for k, v in batch.items()},
        "build_s": build_s,
        "timed_steps": len(times),
        "step_times_s": times,
        "step_s": step_s,
        # LLM positions: audio + text (synthetic batches have no padding; loader batches may)
        "tokens_per_s": positions / step_s,
        "real_tokens_per_s": int(batch["attention_mask"].sum()) / step_s,
        "audio_seconds_per_step": audio_seconds,
        "audio_seconds_per_s": audio_seconds / step_s,
        "flops_per_step": {
            "encoder": flops.encoder,
            "projector": flops.projector,
            "llm": flops.llm,
            "total": flops.total,
        },
        "tflops_per_device": tflops,
        # real tokens at each row's own length (valid encoder frames): the MFU PaLM defines
        "useful_flops_per_step": counted.useful.total,
        "useful_tflops_per_device": counted.useful.total / step_s / 1e12,
        "peak_tflops": args.peak_tflops,
        "mfu": tflops / args.peak_tflops,
        "max_memory_allocated_gib": memory,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md."
    )
    add = p.add_argument
    add("--encoder", default="whisper-large-v3", help="built-in name or config folder")
    add("--llm", default="qwen2-vl-2b", help="qwen2-vl-2b (default), qwen2-vl-7b or a folder")
    add("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    add("--batch", type=int, default=8, help="rows per step (default 8)")
    add("--seconds", type=float, default=15.0, help="audio per row (default 15, <= 30)")
    add("--text-tokens", type=int, default=70, help="non-audio positions per row (default 70)")
    add("--stack", type=int, default=1, help="projector stack factor (default 1)")
    add("--projector", default="linear", choices=("linear", "mlp"), help="default linear")
    add("--varlen", action="store_true", help="run Whisper on the valid frames only")
    add("--lora-rank", type=int, default=16, help="LoRA rank; 0 = projector only (default 16)")
    add("--gradient-checkpointing", action="store_true", help="recompute LLM layers")
    add("--attn", default="sdpa", help="attention implementation (default sdpa)")
    add("--steps", type=int, default=10, help="timed steps (default 10)")
    add("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    add("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="default 989 (H100 bf16)")
    add("--device", help="default: cuda if available, else cpu")
    add(
        "--batch-from",
        type=Path,
        metavar="SHARDS",
        help="time build_audio_llm(--encoder, --llm folders) on the loader's first batch of "
        "these packed shards instead of a synthetic batch (--seconds, --text-tokens unused)",
    )
    add("--out", type=Path, default=Path("benchmarks/results/gpu_step.json"), help="JSON results")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.stack) < 1 or args.warmup < 0 or args.lora_rank < 0:
        p.error("--batch, --steps, --stack must be >= 1; --warmup, --lora-rank >= 0")
    if not 0 < args.seconds <= 30:
        p.error("--seconds must be in (0, 30]: Whisper's window")
    if args.batch_from and not all(
        Path(d, "config.json").is_file() for d in (args.encoder, args.llm)
    ):
        p.error("--batch-from needs --encoder and --llm checkpoint folders (audio-llm tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    f = report["flops_per_step"]
    memory = report["max_memory_allocated_gib"]
    print(
        f"{report['model']} on {report['device_name']} ({report['dtype']}), batch "
        f"{report['batch_shape']['input_ids']} positions, "
        f"{report['audio_seconds_per_step']:g} s audio in all\n"
        f"  trainable {report['trainable_params'] / 1e6:.2f}M of "
        f"{report['total_params'] / 1e6:.1f}M parameters; built in {report['build_s']:.1f} s\n"
        f"  step {report['step_s'] * 1e3:.1f} ms (mean of {report['timed_steps']}), "
        f"{report['tokens_per_s']:.0f} tokens/s, "
        f"{report['audio_seconds_per_s']:.1f} audio-s/s\n"
        f"  {f['total'] / 1e12:.3f} TFLOP per step (encoder {f['encoder'] / 1e12:.3f}, "
        f"projector {f['projector'] / 1e12:.4f}, LLM {f['llm'] / 1e12:.3f}): "
        f"{report['tflops_per_device']:.2f} TFLOP/s, MFU {report['mfu']:.1%} of "
        f"{args.peak_tflops:g}"
        + (f"\n  peak memory {memory:.1f} GiB" if memory is not None else "")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
