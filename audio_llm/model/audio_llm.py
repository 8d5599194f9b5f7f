"""AudioLLM: frozen Whisper encoder -> trainable projector -> Qwen2-VL (optionally with LoRA).

Audio enters the LLM as embeddings written over placeholder tokens: the prompt carries one
`model.audio_token` per projected audio frame, so the text side stays ordinary token ids and the
same tokenizer, chat template and checkpoint work with or without audio.

Optional components plug in through two hooks and nothing else: auxiliary heads
(`aux_heads`, e.g. `model.ctc.CTCHead`) add a loss on the projected audio, and decoding hooks
(`generate(decoding=...)`, e.g. `model.ctc.ctc_decoding(w)`) rescore the LLM's candidates.
`model.build.build_audio_llm` assembles the whole from checkpoint folders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import LogitsProcessor
from transformers.utils import ModelOutput

from audio_llm.audio.features import log_mel_batch
from audio_llm.audio.frames import audio_positions, encoder_frames
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import AudioEncoder
from audio_llm.model.projector import AudioProjector
from audio_llm.model.prompts import PromptBuilder
from audio_llm.model.rows import (
    HOST_KEYS,
    ROW_KEYS,
    SAMPLE_KEYS,
    count_targets,
    rows_of_batch,
    target_labels,
)

__all__ = ["AudioLLM", "AudioLLMOutput", "count_targets", "target_labels"]


class AuxHead(Protocol):
    """An auxiliary loss on the projected audio (`model.ctc.CTCHead`), in `AudioLLM.aux_heads`.

    Its parameters live on the AudioLLM itself, so their names and order stay those of the
    model. `weight` 0: attached for decoding only, no loss.
    """

    weight: float

    def loss_sum(
        self, model: AudioLLM, projected: torch.Tensor, rows: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The loss summed over the batch's clips; `rows` holds the batch's `model.rows` indices
        (each clip's `transcripts`, `transcript_lengths` and `clip_positions`)."""
        ...


class DecodingHook(Protocol):
    """Builds a `LogitsProcessor` from the projected audio for `AudioLLM.generate`
    (`model.ctc.ctc_decoding`)."""

    def logits_processor(
        self, model: AudioLLM, projected: torch.Tensor, lengths: torch.Tensor, num_beams: int
    ) -> LogitsProcessor: ...


class AudioLLM(nn.Module):
    """The trainable model. Batches carry token ids plus exactly one audio form:

    - `input_features [B, n_mels, T]` + `feature_lengths [B]` (valid mel frames),
    - `waveforms [B, S]` (int16 PCM or float, 16 kHz, zero-padded) + `waveform_lengths [B]`
      (samples): log-mel is computed here, batched on the model's device (`data.features_on`), or
    - `audio_embeds [B, F, d_encoder]` + `audio_lengths [B]` (precomputed encoder outputs).

    Row b of `input_ids` must hold exactly `num_audio_tokens(...)` placeholders for its clip.
    Collated training batches also carry the host-built indices of `model.rows` (`ROW_KEYS`,
    `HOST_KEYS`), possibly with several samples packed per row; without them `forward` reads
    them from the tensors (a wait for the device: fine for hand-built batches, not for training).
    """

    # The audio forms a batch may carry (`project_audio`), and every tensor `forward` takes.
    AUDIO_KEYS = (
        "input_features",
        "feature_lengths",
        "audio_embeds",
        "audio_lengths",
        "waveforms",
        "waveform_lengths",
    )
    BATCH_KEYS = ("input_ids", "attention_mask", "labels", *AUDIO_KEYS, *ROW_KEYS)
    # Lengths read as Python ints (by CTC, flash-attention, the log-mel check): kept on the host
    # by `batch_inputs`, where reading them makes no device wait.
    HOST_KEYS = ("waveform_lengths", *HOST_KEYS)

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
        # Auxiliary heads by name (`CTCHead.attach`): a plain dict, not a ModuleDict, so the
        # heads' parameters keep the names and order they have on this module.
        self.aux_heads: dict[str, AuxHead] = {}

    def loss_heads(self) -> dict[str, AuxHead]:
        """The auxiliary heads that add a loss term (weight not 0), in the order they add it."""
        return {name: head for name, head in self.aux_heads.items() if head.weight != 0}

    @classmethod
    def batch_inputs(
        cls, batch: Mapping[str, object], device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """The tensors of a loader batch that `forward`/`generate` take, moved to `device`
        without waiting (the loader pins them); `HOST_KEYS` stay on the host, where kernels read
        them as Python ints."""
        host = {k: batch[k] for k in cls.HOST_KEYS if k in batch}
        keys = [k for k in cls.BATCH_KEYS if k in batch and k not in host]
        return {k: batch[k].to(device, non_blocking=True) for k in keys} | host

    # -- audio ------------------------------------------------------------------------------
    def num_audio_tokens(self, mel_frames: int) -> int:
        """LLM positions one clip of `mel_frames` valid log-mel frames occupies."""
        return int(audio_positions(encoder_frames(mel_frames), self.projector.stack))

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
        return log_mel_batch(waveforms, waveform_lengths, self._mel_filters[device])

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
        **inputs: torch.Tensor,
    ) -> AudioLLMOutput:
        """LM loss over transcript tokens only (prompt, audio and padding are never targets).

        The LM head runs on the positions that predict a target only, not on the whole sequence.
        `loss` is this batch's mean (`lm_loss`, plus `weight * aux_losses[name]` per loss head);
        the trainer uses the sums (`lm_loss_sum` over target tokens, `aux_loss_sums` over
        utterances) to weight every token equally across micro-batches and ranks. Without
        labels: `logits` of every position.

        `inputs`: the audio (`AUDIO_KEYS`) and, from the collator, the rows' indices
        (`model.rows`); with them nothing here reads a tensor's values on the host.
        """
        rows = {k: inputs.pop(k) for k in (*ROW_KEYS, *HOST_KEYS, *SAMPLE_KEYS) if k in inputs}
        projected, lengths = self.project_audio(**inputs)
        if labels is None:
            embeds = self.embed_inputs(input_ids, projected, lengths)
            return AudioLLMOutput(logits=self._logits_of_every_position(embeds, attention_mask))
        if "score_slots" not in rows:  # a hand-built batch: read its layout on the host
            rows = rows_of_batch(
                input_ids,
                attention_mask,
                labels,
                lengths,
                audio_token_id=self.audio_token_id,
                eos_id=self.prompts.eos_id if self.prompts else -1,
            )
        hidden = self._hidden(input_ids, projected, rows)
        # Position t predicts token t + 1: only the positions whose next token is a target
        # meet the head (a [tokens, vocab] matrix instead of [rows, length, vocab]).
        scored = hidden.flatten(0, 1).index_select(0, rows["score_slots"])
        logits = self.causal_lm().lm_head(scored).float()
        lm_sum = nn.functional.cross_entropy(logits, rows["score_targets"], reduction="sum")
        lm_mean = lm_sum / max(len(rows["score_targets"]), 1)
        clips = len(rows["clip_positions"])
        loss, means, sums = lm_mean, {}, {}
        for name, head in self.loss_heads().items():  # per utterance, not per token
            sums[name] = head.loss_sum(self, projected, rows)
            means[name] = sums[name] / clips
            loss = loss + head.weight * means[name]
        return AudioLLMOutput(
            loss=loss,
            lm_loss=lm_mean,
            lm_loss_sum=lm_sum,
            aux_losses=means or None,
            aux_loss_sums=sums or None,
        )

    def _hidden(
        self, input_ids: torch.Tensor, projected: torch.Tensor, rows: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The LLM's last hidden states `[rows, length, d]` of rows with their audio written in:
        integer gathers and scatters only, each sample attending within itself."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        source = rows["audio_clips"] * projected.shape[1] + rows["audio_frames"]
        audio = projected.flatten(0, 1).index_select(0, source).to(embeds.dtype)
        flat = embeds.flatten(0, 1).index_copy(0, rows["audio_slots"], audio)
        causal_lm = self.causal_lm()
        return causal_lm.model(
            inputs_embeds=flat.view_as(embeds),
            # Explicit 1-D positions restarting per sample (Qwen2-VL expands them to its 3
            # M-RoPE axes): text-only RoPE, independent of state left by generate().
            position_ids=rows["position_ids"],
            use_cache=False,
            **attention_inputs(causal_lm.config._attn_implementation, rows, embeds.dtype),
        ).last_hidden_state

    def _logits_of_every_position(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        causal_lm = self.causal_lm()
        hidden = causal_lm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        ).last_hidden_state
        return causal_lm.lm_head(hidden)

    def causal_lm(self) -> nn.Module:
        """The Qwen2-VL causal LM under any PEFT wrapper (LoRA layers are injected in place)."""
        return getattr(self.llm, "get_base_model", lambda: self.llm)()

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
        decoding: Sequence[DecodingHook] = (),
        **audio: torch.Tensor,
    ) -> list[list[int]]:
        """Greedy/beam decoding from left-padded prompts; returns the new token ids per row.

        `synced_gpus` keeps every rank stepping until all are done, as ZeRO-3 requires.
        `decoding`: hooks whose logits processors rescore the LLM's candidates, e.g.
        `model.ctc.ctc_decoding(w)` for joint CTC/LLM decoding; none decodes with the LLM alone."""
        projected, lengths = self.project_audio(**audio)
        inputs_embeds = self.embed_inputs(input_ids, projected, lengths)
        eos = self.llm.generation_config.eos_token_id
        pad = self.llm.generation_config.pad_token_id
        extra = {}
        if decoding:
            from transformers import LogitsProcessorList

            processors = [h.logits_processor(self, projected, lengths, num_beams) for h in decoding]
            extra["logits_processor"] = LogitsProcessorList(processors)
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


@dataclass
class AudioLLMOutput(ModelOutput):
    """`AudioLLM.forward`'s result; fields without a value are absent (`out.get(name)` is None).

    `loss` is this batch's objective (mean per target token, plus each loss head's weight times
    its mean per utterance, `aux_losses` by head name); the `*_sum(s)` fields are the
    unnormalised sums the trainer weights globally.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    aux_loss_sums: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None


def attention_inputs(
    implementation: str, rows: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, object]:
    """The LLM's attention arguments that keep each sample of a row to itself (and causal): for
    rows of one right-padded sample (no `segment_ids`) none, causal attention is enough;
    otherwise a 4-D mask built on the device from `segment_ids`, which transformers takes as it
    is (from a 2-D one it reads the mask on the host), or flash-attention's varlen lengths
    (`cu_seq_lens` over the flattened rows; the longest from a host tensor)."""
    if implementation.startswith("flash"):
        longest = int(rows["max_seq_len"])
        return {
            "attention_mask": None,
            "cu_seq_lens_q": rows["cu_seq_lens"],
            "cu_seq_lens_k": rows["cu_seq_lens"],
            "max_length_q": longest,
            "max_length_k": longest,
        }
    if "segment_ids" not in rows:
        return {"attention_mask": None}
    segments = rows["segment_ids"]
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    if implementation == "eager":  # eager adds the mask to the scores: 0 or the dtype's min
        zero = torch.zeros((), dtype=dtype, device=segments.device)
        return {"attention_mask": torch.where(allowed, zero, torch.finfo(dtype).min)}
    return {"attention_mask": allowed}
