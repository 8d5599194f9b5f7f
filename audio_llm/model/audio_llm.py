"""AudioLLM: frozen Whisper encoder -> trainable projector -> Qwen2-VL (optionally with LoRA).

Audio enters the LLM as embeddings written over placeholder tokens: the prompt carries one
`model.audio_token` per projected audio frame, so the text side stays ordinary token ids and the
same tokenizer, chat template and checkpoint work with or without audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.utils import ModelOutput

from audio_llm.audio.features import log_mel_batch
from audio_llm.audio.frames import encoder_frames
from audio_llm.config import LoraConfig, ModelConfig
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import AudioEncoder, load_feature_extractor, load_whisper_encoder
from audio_llm.model.projector import AudioProjector
from audio_llm.model.prompts import IGNORE_INDEX, PromptBuilder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CTC head's learned blank, exported beside the projector when train.ctc_weight > 0, so that
# stage 2 continues stage 1's CTC loss instead of restarting it from a zero blank.
CTC_BLANK_FILE = "ctc_blank.safetensors"


class AudioLLM(nn.Module):
    """The trainable model. Batches carry token ids plus exactly one audio form:

    - `input_features [B, n_mels, T]` + `feature_lengths [B]` (valid mel frames),
    - `waveforms [B, S]` (int16 PCM or float, 16 kHz, zero-padded) + `waveform_lengths [B]`
      (samples): log-mel is computed here, batched on the model's device (`data.features_on`), or
    - `audio_embeds [B, F, d_encoder]` + `audio_lengths [B]` (precomputed encoder outputs).

    Row b of `input_ids` must hold exactly `num_audio_tokens(...)` placeholders for its clip.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        projector: AudioProjector,
        llm: nn.Module,
        audio_token_id: int,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.audio_token_id = audio_token_id
        # Set by build_audio_llm; plain attributes, not modules, so DeepSpeed ignores them.
        self.tokenizer = None
        self.feature_extractor = None
        self.prompts: PromptBuilder | None = None
        # float32 mel filters per device: not a buffer, so no checkpoint or bf16 cast touches it
        self._mel_filters: dict[torch.device, torch.Tensor] = {}
        self.ctc_weight = 0.0

    def enable_ctc(self, weight: float, blank_init: str | Path | None = None) -> None:
        """Train with `LM loss + weight * CTC loss` (see `ctc_loss`); adds the blank vector,
        zero or read from `blank_init` (a `CTC_BLANK_FILE` an earlier stage exported)."""
        dim = self.llm.get_input_embeddings().embedding_dim
        dtype, device = self.projector.net[0].weight.dtype, self.projector.net[0].weight.device
        blank = torch.zeros(dim, dtype=dtype, device=device)
        if blank_init is not None:
            from safetensors.torch import load_file

            saved = load_file(str(blank_init)).get("ctc_blank")
            if saved is None or saved.shape != blank.shape:
                got = "no ctc_blank tensor" if saved is None else f"shape {tuple(saved.shape)}"
                raise AudioLLMError(
                    f"{blank_init}: {got}, this model needs ctc_blank of shape ({dim},): "
                    "it was exported by a run with another LLM"
                )
            blank = saved.to(device, dtype)
        self.ctc_blank = nn.Parameter(blank)
        self.ctc_weight = weight

    # -- audio ------------------------------------------------------------------------------
    def num_audio_tokens(self, mel_frames: int) -> int:
        """LLM positions one clip of `mel_frames` valid log-mel frames occupies."""
        return int(self.projector.output_lengths(torch.tensor(encoder_frames(mel_frames))))

    @torch.no_grad()
    def log_mel(
        self, waveforms: torch.Tensor, waveform_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel `[B, n_mels, S // 160]` + valid frames of padded waveforms, on their device,
        equal to what the loader computes (`features.log_mel_batch`, the extractor's filters)."""
        if self.feature_extractor is None:
            raise AudioLLMError("waveform batches need model.feature_extractor (build_audio_llm)")
        device = waveforms.device
        if device not in self._mel_filters:
            filters = torch.as_tensor(self.feature_extractor.mel_filters, dtype=torch.float32)
            self._mel_filters[device] = filters.to(device)
        return log_mel_batch(waveforms, waveform_lengths.to(device), self._mel_filters[device])

    def project_audio(
        self,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        waveforms: torch.Tensor | None = None,
        waveform_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio in any supported form -> (`[B, N, d_llm]` embeddings, valid lengths `[B]`)."""
        forms = [x is not None for x in (input_features, audio_embeds, waveforms)]
        if sum(forms) != 1:
            raise AudioLLMError(
                "a batch needs exactly one of input_features, waveforms or audio_embeds"
            )
        if waveforms is not None:
            if waveform_lengths is None:
                raise AudioLLMError("waveforms need waveform_lengths (valid samples)")
            input_features, feature_lengths = self.log_mel(waveforms, waveform_lengths)
        if input_features is not None:
            if feature_lengths is None:
                raise AudioLLMError("input_features need feature_lengths (valid mel frames)")
            audio_embeds, audio_lengths = self.encoder(input_features, feature_lengths)
        elif audio_lengths is None:
            raise AudioLLMError("audio_embeds need audio_lengths (valid encoder frames)")
        return self.projector(audio_embeds, audio_lengths.to(audio_embeds.device))

    def embed_inputs(
        self, input_ids: torch.Tensor, audio: torch.Tensor, audio_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with each row's placeholders replaced by its projected audio."""
        is_audio = input_ids == self.audio_token_id
        counts = is_audio.sum(dim=1)
        if not torch.equal(counts.cpu(), audio_lengths.cpu()):
            bad = (counts.cpu() != audio_lengths.cpu()).nonzero()[0].item()
            raise AudioLLMError(
                f"batch row {bad}: {int(counts[bad])} audio placeholders for "
                f"{int(audio_lengths[bad])} audio frames; build prompts with num_audio_tokens()"
            )
        embeds = self.llm.get_input_embeddings()(input_ids)
        valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lengths[:, None]
        # Row-major order of the mask matches row-major order of valid frames.
        return embeds.masked_scatter(is_audio[..., None], audio[valid].to(embeds.dtype))

    # -- training ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **audio: torch.Tensor,
    ) -> AudioLLMOutput:
        """LM loss over transcript tokens only (prompt, audio and padding are never targets).

        The LM head runs on the positions that predict a target only, not on the whole sequence.
        `loss` is this batch's mean (`lm_loss`, plus `ctc_weight * ctc_loss`); the trainer uses
        the sums (`lm_loss_sum` over target tokens, `ctc_loss_sum` over utterances) to weight
        every token equally across micro-batches and ranks. Without labels: `logits` of every
        position.
        """
        projected, lengths = self.project_audio(**audio)
        inputs_embeds = self.embed_inputs(input_ids, projected, lengths)
        # Explicit 1-D positions (Qwen2-VL expands them to its 3 M-RoPE axes): text-only RoPE,
        # correct for left or right padding, and independent of state left by generate().
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal_lm = self.causal_lm()
        hidden = causal_lm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        if labels is None:
            return AudioLLMOutput(logits=causal_lm.lm_head(hidden))
        targets = target_labels(input_ids, attention_mask, labels, self.audio_token_id)
        # Position t predicts token t + 1: only the positions whose next token is a target
        # meet the head (a [tokens, vocab] matrix instead of [B, L, vocab]).
        scored = targets[:, 1:] != IGNORE_INDEX
        logits = causal_lm.lm_head(hidden[:, :-1][scored]).float()
        lm_sum = nn.functional.cross_entropy(logits, targets[:, 1:][scored], reduction="sum")
        lm_mean = lm_sum / scored.sum().clamp(min=1)
        if self.ctc_weight == 0:
            return AudioLLMOutput(loss=lm_mean, lm_loss=lm_mean, lm_loss_sum=lm_sum)
        ctc_sum = self.ctc_loss(projected, lengths, targets, reduction="sum")
        ctc_mean = ctc_sum / targets.shape[0]
        return AudioLLMOutput(
            loss=lm_mean + self.ctc_weight * ctc_mean,
            lm_loss=lm_mean,
            lm_loss_sum=lm_sum,
            ctc_loss=ctc_mean,
            ctc_loss_sum=ctc_sum,
        )

    def causal_lm(self) -> nn.Module:
        """The Qwen2-VL causal LM under any PEFT wrapper (LoRA layers are injected in place)."""
        return getattr(self.llm, "get_base_model", lambda: self.llm)()

    def ctc_loss(
        self,
        projected: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """CTC of the transcript tokens over the projected audio positions.

        Each position's logits are its dot products with the LLM's input embedding rows plus a
        learned blank vector, so the projector learns to write, in order, embeddings the LLM
        already reads as those tokens. Targets are the label tokens without end-of-turn; a clip
        with more targets than positions contributes nothing (`zero_infinity`). Each clip's
        loss is divided by its target length; `reduction` "mean" averages the clips, "sum" adds
        them (the trainer divides by the utterances of the whole step).
        """
        log_probs = self.ctc_log_probs(projected)
        keep = (labels != IGNORE_INDEX) & (labels != self.prompts.eos_id)
        targets = labels[keep]
        target_lengths = keep.sum(1)
        per_clip = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            lengths,
            target_lengths,
            blank=log_probs.shape[-1] - 1,
            reduction="none",
            zero_infinity=True,
        )
        # torch's "mean": each clip over its target length (at least 1), then the batch mean
        per_clip = per_clip / target_lengths.clamp(min=1).to(per_clip.dtype)
        return per_clip.sum() if reduction == "sum" else per_clip.mean()

    def ctc_log_probs(self, projected: torch.Tensor) -> torch.Tensor:
        """float32 `[B, T, V + 1]`: per projected position, log-softmax over the LLM's input
        embedding rows (dot products) and the learned blank, which is last."""
        # ZeRO-3 partitions the table (and, outside forward(), the blank): private full copies
        weight = _full(self.llm.get_input_embeddings().weight)
        blank = _full(self.ctc_blank)
        projected = projected.to(weight.dtype)
        table = weight.detach()
        # Two products rather than one against [table; blank]: no gradient for the frozen table.
        tokens = projected @ table.T
        blank = projected @ blank.to(weight.dtype)[:, None]
        return torch.cat([tokens, blank], -1).float().log_softmax(-1)

    def train(self, mode: bool = True) -> AudioLLM:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the wrapper's mode
        return self

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        synced_gpus: bool = False,
        ctc_weight: float = 0.0,
        **audio: torch.Tensor,
    ) -> list[list[int]]:
        """Greedy/beam decoding from left-padded prompts; returns the new token ids per row.

        `synced_gpus` keeps every rank stepping until all are done, as ZeRO-3 requires.
        `ctc_weight > 0`: joint decoding with the CTC head (`ctc_decode`), for models trained
        with `train.ctc_weight`; 0 decodes with the LLM alone."""
        projected, lengths = self.project_audio(**audio)
        inputs_embeds = self.embed_inputs(input_ids, projected, lengths)
        eos = self.llm.generation_config.eos_token_id
        pad = self.llm.generation_config.pad_token_id
        if not 0 <= ctc_weight <= 1:
            raise AudioLLMError(f"the CTC decoding weight must be in [0, 1], got {ctc_weight}")
        extra = {}
        if ctc_weight > 0:
            if not hasattr(self, "ctc_blank"):
                raise AudioLLMError(
                    "joint CTC decoding needs the CTC head of a run trained with "
                    "train.ctc_weight > 0 (its export has ctc_blank.safetensors); "
                    "decode with ctc_weight 0"
                )
            from transformers import LogitsProcessorList

            from audio_llm.model.ctc import CTCPrefixScorer

            stops = eos if isinstance(eos, list) else [eos]
            scorer = CTCPrefixScorer(
                self.ctc_log_probs(projected), lengths, ctc_weight, stops, num_beams
            )
            extra["logits_processor"] = LogitsProcessorList([scorer])
        out = self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            synced_gpus=synced_gpus,
            **extra,
        )
        self.causal_lm().model.rope_deltas = None  # generate() caches M-RoPE state on the model
        stops = set(eos if isinstance(eos, list) else [eos]) | {pad}
        result = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def _full(param: nn.Parameter) -> torch.Tensor:
    """`param` itself, or a detached full copy gathered from its ZeRO-3 partitions."""
    if param.numel() > 0:
        return param
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


@dataclass
class AudioLLMOutput(ModelOutput):
    """`AudioLLM.forward`'s result; fields without a value are absent (`out.get(name)` is None).

    `loss` is this batch's objective (mean per target token, plus `ctc_weight` times the mean
    per utterance); the `*_sum` fields are the unnormalised sums the trainer weights globally.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None
    ctc_loss_sum: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def target_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    audio_token_id: int,
) -> torch.Tensor:
    """`labels` with everything that is not a target set to IGNORE_INDEX: audio placeholders
    and padding (whatever the caller's labels say there) and column 0, which no position
    predicts. Target tokens are the entries left != IGNORE_INDEX.

    The one rule for what the loss scores: the model's LM and CTC losses and the trainer's
    count of target tokens (`count_targets`, which normalises the loss across micro-batches and
    ranks) all read it.
    """
    never = (input_ids == audio_token_id) | (attention_mask == 0)
    never[:, 0] = True
    return labels.masked_fill(never, IGNORE_INDEX)


def count_targets(batch: dict[str, torch.Tensor], audio_token_id: int) -> int:
    """Target tokens of a (host) training batch: what its LM loss sum adds up."""
    targets = target_labels(
        batch["input_ids"], batch["attention_mask"], batch["labels"], audio_token_id
    )
    return int((targets != IGNORE_INDEX).sum())


def build_audio_llm(
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    device: str | torch.device = "cpu",
    ctc_weight: float = 0.0,
) -> AudioLLM:
    """Load encoder, feature extractor, tokenizer and LLM; validate them; add projector + LoRA.

    `ctc_weight > 0` adds the auxiliary CTC loss (`train.ctc_weight`) and its blank vector.

    Every mismatch (mel bins, missing audio token, projector shapes, LoRA targets) is raised here,
    before any training work.
    """
    dtype = DTYPES[cfg.dtype]
    feature_extractor = load_feature_extractor(cfg.encoder)
    whisper = load_whisper_encoder(cfg.encoder, dtype)
    if feature_extractor.feature_size != whisper.config.num_mel_bins:
        raise AudioLLMError(
            f"{cfg.encoder}: feature extractor makes {feature_extractor.feature_size} mel bins, "
            f"the encoder takes {whisper.config.num_mel_bins}"
        )
    if not Path(cfg.llm, "config.json").is_file():
        raise AudioLLMError(f"model.llm {cfg.llm!r} is not a checkpoint folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    llm = Qwen2VLForConditionalGeneration.from_pretrained(cfg.llm, dtype=dtype)
    llm.requires_grad_(False)
    prompts = PromptBuilder(tokenizer, cfg.audio_token, cfg.prompt, cfg.chat_template)
    vocab_rows = llm.get_input_embeddings().num_embeddings
    if prompts.audio_token_id >= vocab_rows:
        raise AudioLLMError(
            f"audio token {cfg.audio_token!r} has id {prompts.audio_token_id}, outside the LLM's "
            f"{vocab_rows} embedding rows"
        )

    projector = AudioProjector(
        whisper.config.d_model,
        llm.config.text_config.hidden_size,
        stack=cfg.stack_factor,
        kind=cfg.projector,
        hidden=cfg.projector_hidden,
        context=cfg.projector_context,
        dropout=cfg.projector_dropout,
        context_width=cfg.projector_context_width,
    ).to(dtype)
    if cfg.projector_init:
        projector.load(cfg.projector_init)

    model = AudioLLM(
        AudioEncoder(whisper, cfg.varlen_encoder), projector, llm, prompts.audio_token_id
    )
    model.tokenizer, model.feature_extractor, model.prompts = tokenizer, feature_extractor, prompts
    if ctc_weight > 0:
        blank = Path(cfg.projector_init).with_name(CTC_BLANK_FILE) if cfg.projector_init else None
        model.enable_ctc(ctc_weight, blank if blank is not None and blank.is_file() else None)
    if lora is not None:
        from audio_llm.model.lora import apply_lora

        apply_lora(model, lora)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model.to(device)
