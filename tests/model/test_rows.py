"""model.rows: the host-built LLM rows of a batch, padded or packed (`data.pack_tokens`), and the
packed batch trains exactly as the padded one (loss and every trainable gradient)."""

from __future__ import annotations

import pytest
import torch

from audio_llm.config import DataConfig, LoraConfig
from audio_llm.data.collate import Collator
from audio_llm.data.layout import layout_of
from audio_llm.errors import AudioLLMError
from audio_llm.model.audio_llm import attention_inputs
from audio_llm.model.build import build_audio_llm
from audio_llm.model.rows import ROW_KEYS, pack_rows, rows_of_batch
from tests.model.test_host_reads import samples

TEXTS = ["the red fox runs", "hello world", "a third and longer transcript", "one more"]
MEL = [300, 170, 240, 120]


@pytest.fixture(scope="module")
def ctc_model(model_config):
    torch.manual_seed(0)
    model = build_audio_llm(model_config, LoraConfig(dropout=0.0), ctc_weight=0.5)
    with torch.no_grad():  # lora_B starts at zero: give LoRA a say in the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def collate(model, pack_tokens: int) -> dict:
    collator = Collator(layout_of(model, identity=False), "mel", pack_tokens=pack_tokens)
    return collator(samples(collator.layout, MEL, TEXTS))


def test_first_fit_decreasing_keeps_batch_order_within_a_row():
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(AudioLLMError, match="does not fit data.pack_tokens=8"):
        pack_rows([9], 8)


def test_packed_rows_restart_positions_and_fence_attention(ctc_model):
    padded = collate(ctc_model, 0)
    lengths = padded["attention_mask"].sum(1).tolist()
    # A budget that takes the whole batch in one row: first-fit decreasing makes rows only as
    # even as the samples allow, so a smaller one can cost more positions than padding here.
    packed = collate(ctc_model, sum(lengths))
    assert len(packed["input_ids"]) < len(padded["input_ids"])  # several samples share a row
    assert packed["attention_mask"].sum() == sum(lengths)
    for row in range(len(packed["input_ids"])):
        valid = packed["attention_mask"][row].bool()
        starts = (packed["position_ids"][row][valid] == 0).nonzero().flatten().tolist()
        ends = [*starts[1:], int(valid.sum())]
        got = sorted(e - s for s, e in zip(starts, ends, strict=True))
        assert len(starts) >= 1 and all(n in lengths for n in got)
        for s, e in zip(starts, ends, strict=True):  # 0, 1, ... within each sample
            assert packed["position_ids"][row, s:e].tolist() == list(range(e - s))
            assert packed["segment_ids"][row, s:e].unique().numel() == 1
    mask = attention_inputs("sdpa", packed, torch.float32)["attention_mask"]
    seg = packed["segment_ids"]
    assert not (mask[:, 0] & (seg[:, :, None] != seg[:, None, :])).any()  # no cross-sample look
    assert mask[:, 0].tril().equal(mask[:, 0])  # causal
    additive = attention_inputs("eager", packed, torch.float32)["attention_mask"]
    assert additive.shape == mask.shape and torch.equal(additive == 0, mask)
    # the trainer's panels: positions are rows x row length
    assert packed["stats"]["positions"] == packed["input_ids"].numel()
    assert packed["stats"]["tokens"] == padded["stats"]["tokens"]
    assert packed["stats"]["positions"] < padded["stats"]["positions"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_loss_and_gradients_equal_the_padded_batch(ctc_model, attention):
    ctc_model.causal_lm().set_attn_implementation(attention)
    assert ctc_model.causal_lm().config._attn_implementation == attention
    trained = {n: p for n, p in ctc_model.named_parameters() if p.requires_grad}

    def run(batch):
        ctc_model.zero_grad()
        out = ctc_model(**ctc_model.batch_inputs(batch, "cpu"))
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in trained.items()}

    ref, ref_grads = run(collate(ctc_model, 0))
    new, new_grads = run(collate(ctc_model, 512))
    ctc_model.causal_lm().set_attn_implementation("sdpa")
    torch.testing.assert_close(new.lm_loss_sum, ref.lm_loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.aux_loss_sums["ctc"], ref.aux_loss_sums["ctc"])
    torch.testing.assert_close(new.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert any(".lora_" in n for n in ref_grads) and "ctc_blank" in ref_grads
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hand_built_rows_equal_the_collators(ctc_model):
    """A batch without indices (generate, evaluation, tests) gets the collator's own."""
    batch = collate(ctc_model, 0)
    derived = rows_of_batch(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["clip_positions"],
        audio_token_id=ctc_model.audio_token_id,
        eos_id=ctc_model.prompts.eos_id,
    )
    assert "segment_ids" not in batch  # right-padded rows: causal attention alone
    for key in (k for k in ROW_KEYS if k in batch):
        valid = key not in ("position_ids", "segment_ids")  # padding may differ there
        want = batch[key] if valid else batch[key] * batch["attention_mask"]
        got = derived[key] if valid else derived[key] * batch["attention_mask"]
        assert torch.equal(got, want), key


def test_flash_attention_gets_varlen_lengths_over_the_flattened_rows(ctc_model):
    packed = collate(ctc_model, 512)
    kwargs = attention_inputs("flash_attention_2", packed, torch.bfloat16)
    cu = kwargs["cu_seq_lens_q"]
    assert kwargs["attention_mask"] is None and cu is kwargs["cu_seq_lens_k"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == packed["input_ids"].numel()
    assert kwargs["max_length_q"] == int(cu.diff().max()) and isinstance(
        kwargs["max_length_k"], int
    )
    # each sample is one segment (row tails are segments of their own)
    assert set(packed["sample_lengths"].tolist()) <= set(cu.diff().tolist())


def test_generation_batches_are_never_packed(ctc_model):
    layout = layout_of(ctc_model, identity=False)
    batch = samples(layout, MEL, TEXTS)
    padded = Collator(layout, "mel").prompt_batch(batch)
    packed = Collator(layout, "mel", pack_tokens=512).prompt_batch(batch)
    for key in ("input_ids", "attention_mask", "input_features", "feature_lengths"):
        assert torch.equal(packed[key], padded[key]), key
    ctc_model.eval()
    inputs = {k: v for k, v in packed.items() if isinstance(v, torch.Tensor)}
    assert ctc_model.generate(**inputs, max_new_tokens=3) == ctc_model.generate(
        **{k: v for k, v in padded.items() if isinstance(v, torch.Tensor)}, max_new_tokens=3
    )
    ctc_model.train()


def test_collator_names_the_sample_whose_placeholders_do_not_match(ctc_model):
    layout = layout_of(ctc_model, identity=False)
    batch = samples(layout, MEL[:2], TEXTS[:2])
    example = batch[1].example
    at = example.input_ids.index(layout.prompts.audio_token_id)
    del example.input_ids[at], example.labels[at]
    with pytest.raises(AudioLLMError, match="sample 'clip1': .* audio placeholders"):
        Collator(layout, "mel")(batch)


def test_pack_tokens_below_max_length_fails_at_start():
    with pytest.raises(AudioLLMError, match="pack_tokens=100 must be 0 .* >= data.max_length"):
        DataConfig(max_length=256, pack_tokens=100)
    assert DataConfig(max_length=256, pack_tokens=256).pack_tokens == 256
