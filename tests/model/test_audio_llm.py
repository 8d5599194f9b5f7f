import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn

from audio_llm.config import LoraConfig
from audio_llm.errors import AudioLLMError
from audio_llm.model.audio_llm import count_targets, target_labels
from audio_llm.model.build import build_audio_llm
from audio_llm.model.projector import AudioProjector
from audio_llm.model.prompts import IGNORE_INDEX
from tests.helpers import generation_batch, training_batch

TEXTS = ["the red fox runs", "hello world\r\n"]


def trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def stage2(model_config):
    torch.manual_seed(0)
    return build_audio_llm(model_config, LoraConfig())


def test_forward_backward_grads_only_on_trainable(stage2):
    stage2.train()
    stage2.zero_grad()
    batch = training_batch(stage2, [300, 170], TEXTS)
    loss = stage2(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    trained = trainable(stage2)
    ours = all(n.startswith("projector.") or ".lora_" in n for n in trained)
    assert trained and ours, sorted(trained)[:5]
    for name, p in stage2.named_parameters():
        if name in trained:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in stage2.encoder.parameters())
    # lora_B starts at zero, so the first step moves B (A's gradient flows through B)
    assert all(p.grad.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)


def test_exactly_the_transcript_positions_contribute(stage2):
    """The loss is the mean CE over transcript + end-of-turn tokens and nothing else, even when
    the caller's labels also mark placeholder and padding positions."""
    stage2.eval()
    batch = training_batch(stage2, [300, 170], TEXTS)
    # Careless labels: everything is a target. The model must still mask audio and padding.
    careless = batch["input_ids"].clone()
    out = stage2(**{**batch, "labels": careless})
    expected = stage2(**batch)

    without_labels = {k: v for k, v in batch.items() if k != "labels"}
    logits = stage2(**without_labels).logits[:, :-1].float()  # every position, as generate sees
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    manual = nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(expected.loss, manual)

    # careless labels differ from `labels` only by prompt-text targets; drop those and compare
    prompt_text = (batch["labels"] == IGNORE_INDEX) & (batch["input_ids"] != stage2.audio_token_id)
    prompt_text &= batch["attention_mask"].bool()
    fixed = careless.masked_fill(prompt_text, IGNORE_INDEX)
    torch.testing.assert_close(stage2(**{**batch, "labels": fixed}).loss, expected.loss)
    assert not torch.allclose(out.loss, expected.loss)  # prompt text does count if labelled

    # the learned positions are exactly the transcript tokens + <|im_end|> of each row
    for row, text in enumerate(["the red fox runs", "hello world"]):
        ids = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert stage2.tokenizer.decode(ids) == text + "<|im_end|>"


def test_precomputed_encoder_outputs_give_the_same_loss(stage2):
    stage2.eval()
    batch = training_batch(stage2, [300, 170], TEXTS)
    live = stage2(**batch).loss
    hidden, lengths = stage2.encoder(batch["input_features"], batch["feature_lengths"])
    pre = {k: v for k, v in batch.items() if k not in ("input_features", "feature_lengths")}
    precomputed = stage2(**pre, audio_embeds=hidden, audio_lengths=lengths).loss
    torch.testing.assert_close(live, precomputed)


def test_placeholder_count_mismatch_names_the_row(stage2):
    batch = training_batch(stage2, [300, 170], TEXTS)
    batch["feature_lengths"] = torch.tensor([300, 200])
    with pytest.raises(AudioLLMError, match="batch row 1: .* audio placeholders for"):
        stage2(**batch)


def test_generate_is_batch_invariant(stage2):
    stage2.eval()
    features = torch.randn(2, 80, 300, generator=torch.Generator().manual_seed(1))
    both = stage2.generate(**generation_batch(stage2, [300, 120], features), max_new_tokens=6)
    alone = stage2.generate(
        **generation_batch(stage2, [120], features[1:, :, :120]), max_new_tokens=6
    )
    assert len(both) == 2 and all(isinstance(t, int) for t in both[0])
    assert both[1] == alone[0]
    # a training forward after generate() is unaffected by generate's cached M-RoPE state
    batch = training_batch(stage2, [300, 170], TEXTS)
    assert torch.isfinite(stage2(**batch).loss)


def test_stage1_trains_the_projector_only(model_config):
    model = build_audio_llm(model_config)
    assert set(trainable(model)) == {"projector.net.0.weight", "projector.net.0.bias"}


def test_stacking_shrinks_the_audio_span(model_config):
    model = build_audio_llm(dataclasses.replace(model_config, stack_factor=4, projector="mlp"))
    assert model.num_audio_tokens(300) == 38  # 150 encoder frames / 4, rounded up
    batch = training_batch(model, [300, 170], TEXTS)
    assert torch.isfinite(model(**batch).loss)


def test_missing_placeholder_token_fails_before_training(model_config):
    with pytest.raises(AudioLLMError, match="not a token of the tokenizer"):
        build_audio_llm(dataclasses.replace(model_config, audio_token="<|audio_pad|>"))


def test_projector_dims_mismatch_fails_at_start(model_config, tmp_path):
    AudioProjector(64, 32).save(tmp_path / "other.safetensors")
    cfg = dataclasses.replace(model_config, projector_init=str(tmp_path / "other.safetensors"))
    with pytest.raises(AudioLLMError, match="projector tensor .* has shape"):
        build_audio_llm(cfg)


def test_feature_extractor_encoder_mismatch_fails_at_start(model_config, tmp_path):
    folder = tmp_path / "whisper"
    shutil.copytree(model_config.encoder, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["feature_size"] = 128
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(AudioLLMError, match="128 mel bins, the encoder takes 80"):
        build_audio_llm(dataclasses.replace(model_config, encoder=str(folder)))


def test_regex_matching_nothing_fails_at_start(model_config):
    with pytest.raises(AudioLLMError, match="match no LLM projection"):
        build_audio_llm(model_config, LoraConfig(target_regex=r"model\.layers\.\d+\.mlp\.up_proj"))


def test_missing_llm_folder(model_config, tmp_path):
    with pytest.raises(AudioLLMError, match="not a checkpoint folder"):
        build_audio_llm(dataclasses.replace(model_config, llm=str(tmp_path)))


def test_ctc_loss_is_added_and_trains_projector_and_blank(model_config):
    torch.manual_seed(0)
    model = build_audio_llm(model_config, ctc_weight=0.5)
    model.train()
    batch = training_batch(model, [3000, 1700], TEXTS)
    out = model(**batch)
    ctc = out.aux_losses["ctc"]
    assert torch.isfinite(ctc) and ctc > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * ctc)
    out.loss.backward()
    assert model.ctc_blank.grad is not None and model.ctc_blank.grad.abs().sum() > 0
    # the blank is the model's own first parameter: its name and place are the checkpoints'
    assert next(iter(model.named_parameters()))[0] == "ctc_blank"
    assert all(p.grad is None for p in model.llm.parameters())  # the embedding table stays frozen
    # The CTC term alone can teach the projector to spell the transcript in embedding space.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        opt.zero_grad()
        ctc = model(**batch).aux_losses["ctc"]
        first = first if first is not None else ctc.item()
        ctc.backward()
        opt.step()
    assert ctc.item() < 0.5 * first


def test_ctc_targets_are_the_transcript_without_end_of_turn(model_config):
    model = build_audio_llm(model_config, ctc_weight=1.0)
    batch = training_batch(model, [3000], ["the red fox"])
    captured = {}
    original = nn.functional.ctc_loss

    def spy(log_probs, targets, input_lengths, target_lengths, **kw):
        captured.update(targets=targets, target_lengths=target_lengths, blank=kw["blank"])
        return original(log_probs, targets, input_lengths, target_lengths, **kw)

    nn.functional.ctc_loss = spy
    try:
        model(**batch)
    finally:
        nn.functional.ctc_loss = original
    want = model.tokenizer("the red fox", add_special_tokens=False)["input_ids"]
    assert captured["targets"].tolist() == want
    assert captured["target_lengths"].tolist() == [len(want)]
    assert captured["blank"] == model.llm.get_input_embeddings().num_embeddings


def test_without_ctc_the_model_has_no_blank(model_config):
    model = build_audio_llm(model_config)
    out = model(**training_batch(model, [3000], ["the red fox"]))
    assert not hasattr(model, "ctc_blank") and not model.aux_heads
    assert out.get("aux_losses") is None and out.get("aux_loss_sums") is None


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The reference: the LM head over every position and the stock causal-LM loss (the path the
    label-only head replaced)."""
    projected, lengths = model.project_audio(
        input_features=batch["input_features"], feature_lengths=batch["feature_lengths"]
    )
    embeds = model.embed_inputs(batch["input_ids"], projected, lengths)
    mask = batch["attention_mask"]
    labels = batch["labels"].masked_fill(
        (batch["input_ids"] == model.audio_token_id) | (mask == 0), IGNORE_INDEX
    )
    out = model.llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
        labels=labels,
        use_cache=False,
    )
    return out.loss


def test_label_only_head_equals_the_full_logits_loss_and_gradients(model_config):
    """LoRA-wrapped (stage 2) LLM with a tied head: the same loss and the same gradients of every
    trainable parameter as the head over all positions; the tied table stays without gradient."""
    torch.manual_seed(0)
    model = build_audio_llm(model_config, LoraConfig(dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: give LoRA a say in the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    batch = training_batch(model, [300, 170, 240], [*TEXTS, "a longer third transcript here"])
    head = model.causal_lm().lm_head.weight
    assert head is model.llm.get_input_embeddings().weight  # tied, as in the tiny model
    trained = trainable(model)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained.items()}

    ref_loss, ref_grads = loss_and_grads(lambda: full_logits_loss(model, batch))
    new_loss, new_grads = loss_and_grads(lambda: model(**batch).loss)
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any(".lora_" in n for n in new_grads) and any("projector" in n for n in new_grads)
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert head.grad is None and not head.requires_grad  # frozen, tied or not

    out = model(**batch)  # the sum the trainer normalises is the mean times the target count
    torch.testing.assert_close(
        out.lm_loss_sum, out.lm_loss * count_targets(batch, model.audio_token_id)
    )


def test_target_count_is_the_positions_the_loss_scores(model_config):
    model = build_audio_llm(model_config)
    batch = training_batch(model, [300, 170], TEXTS)
    careless = {**batch, "labels": batch["input_ids"].clone()}  # placeholders/padding labelled too
    targets = target_labels(
        careless["input_ids"], careless["attention_mask"], careless["labels"], model.audio_token_id
    )
    assert not (targets[:, 0] != IGNORE_INDEX).any()  # nothing predicts the first token
    scored = (targets != IGNORE_INDEX).sum(1)
    words = batch["attention_mask"].sum(1) - (batch["input_ids"] == model.audio_token_id).sum(1)
    assert scored.tolist() == (words - 1).tolist()  # every real text token but the first
    out = model(**careless)
    torch.testing.assert_close(
        out.lm_loss_sum / count_targets(careless, model.audio_token_id), out.lm_loss
    )


def test_ctc_sum_is_the_batch_mean_times_the_clips(model_config):
    torch.manual_seed(0)
    model = build_audio_llm(model_config, ctc_weight=0.5)
    out = model(**training_batch(model, [3000, 1700], TEXTS))
    torch.testing.assert_close(out.aux_loss_sums["ctc"], 2 * out.aux_losses["ctc"])
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_losses["ctc"])
