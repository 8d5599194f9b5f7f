"""planning.flops: analytic training FLOPs against torch's counter, padding accounting and MFU (the
launched run that logs them and the benchmark scripts are in tests/integration/test_flops.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from audio_llm.config import LoraConfig
from audio_llm.model.arch import resolve_config
from audio_llm.model.build import build_audio_llm
from audio_llm.planning.flops import (
    ModelShape,
    batch_flops,
    batch_flops_from_tensors,
    encoder_forward,
    flops_rates,
    llm_forward,
    lora_params,
    peak_tflops,
    resolve_peak_tflops,
    training_flops,
    with_flops,
)
from tests.helpers import training_batch

TEXTS = ["the red fox runs", "a", "hello world hello world"]


def _measured_training_flops(model, batch: dict) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops(), counter.get_flop_counts()


DEMO = {"varlen_encoder": True, "stack_factor": 4, "projector": "mlp"}


@pytest.mark.parametrize(
    "overrides, lora, ctc",
    [
        ({}, None, 0.0),  # the seed: padded 30 s encoder, stack 1 linear, projector only
        (DEMO, LoraConfig(rank=8), 0.0),
        ({**DEMO, "projector_context": "conv"}, LoraConfig(rank=8), 1.0),  # the demo's recipe
        ({**DEMO, "projector_context": "conv", "projector_context_width": 16}, None, 1.0),
    ],
    ids=["seed-stage1", "varlen-stack4-mlp-lora", "conv-context-ctc", "narrow-context"],
)
def test_analytic_training_flops_equal_torch_flop_counter(model_config, overrides, lora, ctc):
    """The formulas and FlopCounterMode count the same ops (matmuls, convs; 2 per MAC), so they
    agree to rounding. The 1e-3 tolerance leaves room only for ops neither should count at real
    shapes (e.g. M-RoPE's tiny position matmul), not for a wrong multiplier: dropping the input
    gradient of frozen weights, or counting the encoder's backward, moves the total by > 10%."""
    torch.manual_seed(0)
    model = build_audio_llm(replace(model_config, **overrides), lora, ctc_weight=ctc)
    # Eager attention: on CPU, SDPA's fused kernel is invisible to FlopCounterMode.
    model.llm.set_attn_implementation("eager")
    model.encoder.whisper.config._attn_implementation = "eager"
    model.train()
    batch = training_batch(model, [601, 410, 1200], TEXTS)
    shape = ModelShape.from_model(model)
    assert shape.encoder_mode == ("varlen" if overrides else "padded")
    expected = batch_flops_from_tensors(shape, batch).executed

    measured, by_module = _measured_training_flops(model, batch)
    assert measured == pytest.approx(expected.total, rel=1e-3)
    assert sum(by_module["AudioLLM.encoder"].values()) == pytest.approx(expected.encoder, rel=1e-3)
    ctc_head = 0.0  # the CTC logits are computed by AudioLLM itself, not inside the projector
    if ctc:  # 3 rows x 150 padded positions (1200 mel -> 600 frames, stack 4), fwd + input grad
        ctc_head = 3 * 2 * 2.0 * 150 * shape.d_llm * (shape.vocab + 1)
    assert sum(by_module["AudioLLM.projector"].values()) == pytest.approx(
        expected.projector - ctc_head, rel=1e-3
    )


def test_precomputed_encoder_batches_count_no_encoder(model_config):
    model = build_audio_llm(model_config)
    batch = training_batch(model, [600, 410, 1200], TEXTS)
    hidden, lengths = model.encoder(batch["input_features"], batch["feature_lengths"])
    pre = {k: v for k, v in batch.items() if k not in ("input_features", "feature_lengths")}
    pre |= {"audio_embeds": hidden, "audio_lengths": lengths}
    shape = ModelShape.from_model(model)
    live, cached = batch_flops_from_tensors(shape, batch), batch_flops_from_tensors(shape, pre)
    assert live.executed.encoder > 0 and cached.executed.encoder == 0
    assert cached.executed.llm == live.executed.llm
    assert cached.executed.projector == live.executed.projector
    # the seed encoder runs the full window whatever the clip: 3 rows x 1,500 frames
    assert live.encoder_frames_executed == 3 * 1500
    # with_flops tags each batch for the training loop: model FLOPs and executed FLOPs
    tagged = next(with_flops(iter([dict(pre)]), shape))
    assert tagged["stats"]["flops"] == cached.useful.total
    assert tagged["stats"]["flops_executed"] == cached.executed.total


@pytest.fixture(scope="module")
def large_v3_7b() -> tuple:
    return resolve_config("whisper-large-v3"), resolve_config("qwen2-vl-7b")


def test_real_shapes_match_parameter_counts_of_the_meta_model(large_v3_7b):
    """Per position, the LLM's frozen forward is 2 FLOPs per weight of its layers' projections
    and lm_head; per frame, the encoder's layers are 2 per weight plus attention."""
    from audio_llm.model.lora import meta_model

    whisper, qwen = large_v3_7b
    model = meta_model("whisper-large-v3", "qwen2-vl-7b")
    linear = torch.nn.Linear
    llm_weights = sum(
        m.weight.numel()
        for n, m in model.llm.named_modules()
        if isinstance(m, linear) and ("language_model.layers." in n or n == "lm_head")
    )
    shape = ModelShape.from_configs(whisper, qwen)
    assert llm_forward(shape, 1).frozen == 2 * llm_weights
    enc_weights = sum(
        m.weight.numel() for m in model.encoder.whisper.layers.modules() if isinstance(m, linear)
    )
    frames = 1500
    attention = 4 * frames * frames * 1280 * 32
    convs = 2 * 3000 * 128 * 1280 * 3 + 2 * frames * 1280 * 1280 * 3
    assert encoder_forward(shape, frames) == 2 * enc_weights * frames + attention + convs
    # The LoRA weights PEFT builds are the ones the formula counts.
    from audio_llm.model.lora import apply_lora

    apply_lora(model, LoraConfig(rank=16))
    built = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora_params(qwen, 16) == built


def test_padding_accounting_by_hand(large_v3_7b):
    shape = ModelShape.from_configs(*large_v3_7b, stack=8, encoder_mode="varlen")
    # two clips of 100 and 300 frames, 20 and 30 text positions: 13 + 20 and 38 + 30 positions
    result = batch_flops(shape, [100, 300], [20, 30])
    assert result.encoder_frames_executed == 600 and result.encoder_frames_valid == 400
    assert result.positions_executed == 2 * 68 and result.positions_valid == 33 + 68
    assert result.encoder_padded_fraction == pytest.approx(1 / 3)
    alone = training_flops(shape, 100, 33) + training_flops(shape, 300, 68)
    assert result.useful.total == pytest.approx(alone.total)
    # padded to 68 positions, but the lm_head meets only the rows' own 33 + 68
    executed = training_flops(shape, 300, 68, rows=2, scored=(33 + 68) / 2)
    assert result.executed.total == pytest.approx(executed.total)
    assert executed.total < training_flops(shape, 300, 68, rows=2).total
    # the seed runs 1,500 frames per clip: 3,000 executed for 400 valid
    seed = batch_flops(replace(shape, encoder_mode="padded", stack=1), [100, 300], [20, 30])
    assert seed.encoder_frames_executed == 3000
    assert seed.executed.encoder == pytest.approx(2 * encoder_forward(shape, 1500))


def test_mfu_is_achieved_over_peak_and_absent_without_a_peak():
    rates = flops_rates(flops=4e15, seconds=10.0, peak_tflops=800.0)
    assert rates == pytest.approx({"tflops_per_device": 400.0, "mfu": 0.5})
    assert flops_rates(4e15, 10.0) == {"tflops_per_device": 400.0}
    assert flops_rates(4e15, 0.0, 800.0)["tflops_per_device"] == 0.0


def test_mfu_counts_model_flops_and_hfu_the_executed_ones():
    rates = flops_rates(flops=4e15, seconds=10.0, peak_tflops=800.0, executed=6e15)
    assert rates == pytest.approx(
        {"tflops_per_device": 400.0, "mfu": 0.5, "executed_tflops_per_device": 600.0, "hfu": 0.75}
    )
    assert "hfu" not in flops_rates(4e15, 10.0, executed=6e15)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA B200", 2250.0),
        ("Tesla V100-SXM2-16GB", 0.0),  # no bf16 tensor cores: not in the table
        ("NVIDIA GeForce RTX 3090", 0.0),
    ],
)
def test_peak_of_known_devices_by_name(name, peak):
    assert peak_tflops(name) == peak


def test_a_configured_peak_overrides_the_table_and_zero_is_auto():
    assert resolve_peak_tflops(500.0, "NVIDIA H100 80GB HBM3") == 500.0
    assert resolve_peak_tflops(0.0, "NVIDIA H100 80GB HBM3") == 989.0
    assert resolve_peak_tflops(0.0, None) == 0.0  # no GPU: no MFU
    assert resolve_peak_tflops(0.0, "Some Future Accelerator") == 0.0


def test_model_flops_leave_out_padding_and_recompute(large_v3_7b):
    shape = ModelShape.from_configs(*large_v3_7b, stack=8, encoder_mode="varlen")
    result = batch_flops(shape, [100, 300], [20, 30])
    # the padded row's positions and frames are executed, not useful
    assert result.useful.total < result.executed.total
    # checkpointing adds one forward of every decoder layer over the executed positions
    layers = 2 * llm_forward(shape, 68, scored=0).total
    assert result.recompute == pytest.approx(layers)
    assert result.executed_total(checkpointing=True) == pytest.approx(
        result.executed.total + layers
    )
    assert result.executed_total(checkpointing=False) == result.executed.total


def test_recompute_is_what_checkpointing_adds_to_the_measured_flops(model_config):
    """FlopCounterMode sees the forward that non-reentrant checkpointing reruns in backward: the
    measured difference with and without it is `BatchFlops.recompute`."""
    measured = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = replace(model_config, gradient_checkpointing=checkpointing, **DEMO)
        model = build_audio_llm(cfg, LoraConfig(rank=8))
        model.llm.set_attn_implementation("eager")
        model.encoder.whisper.config._attn_implementation = "eager"
        model.train()
        batch = training_batch(model, [601, 410, 1200], TEXTS)
        measured.append(_measured_training_flops(model, batch)[0])
    recompute = batch_flops_from_tensors(ModelShape.from_model(model), batch).recompute
    assert measured[1] - measured[0] == pytest.approx(recompute, rel=1e-2)
