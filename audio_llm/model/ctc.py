"""The CTC component: an auxiliary CTC loss on the projected audio, and joint CTC/LLM decoding.

`CTCHead` is what `train.ctc_weight > 0` adds to an `AudioLLM` (`CTCHead.attach`, called by
`model.build`): a CTC loss of the transcript over the projected audio positions, whose classes are
the LLM's own (frozen) input embedding rows plus one learned blank vector, `ctc_blank`. The core
model knows it only as one of its `aux_heads`: `AudioLLM.forward` adds `weight * loss` for each,
the trainer scales each head's sum, and the export writes each head's files
(`ctc_blank.safetensors`, listed as "ctc_blank"), from which the next stage and inference attach
it again.

Joint decoding: a model trained with the head has two readings of the same audio: the LLM's
autoregressive one and the CTC head's alignment of the projected positions to token embeddings.
They fail differently. A small LLM can lose its place in the audio and loop ("our our our") or
skip a word; CTC cannot, because every output token must be paid for by audio positions, but it
has no view of the text so far. Decoding with both (Watanabe et al., 2017, "Hybrid CTC/attention
architecture for end-to-end speech recognition") scores each candidate continuation `h = g + c`
of the hypothesis `g` by

    (1 - w) * log p_llm(c | g, audio) + w * (log p_ctc(h... | audio) - log p_ctc(g... | audio))

where `p_ctc(g... | audio)` is the CTC *prefix* probability: the probability that the
transcript starts with `g`, summed over every alignment. Only the LLM's `candidates` best
tokens are scored (the rest are ruled out), and end-of-sequence is scored with the probability
that the whole transcript is exactly `g`. Over a beam the step scores add up to the joint score
of the finished hypothesis, so greedy and beam search both use it unchanged.

`CTCPrefixScorer` is a transformers `LogitsProcessor`: `AudioLLM.generate(decoding=
ctc_decoding(w))` hands it to `generate()`. Its prefix states are cached per (clip, prefix), so
each step costs one pass over the clip's positions for the candidates of every row, whatever the
beam reordering does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from audio_llm import dist
from audio_llm.errors import AudioLLMError

if TYPE_CHECKING:
    from audio_llm.model.audio_llm import AudioLLM

# The CTC head's learned blank, exported beside the projector when train.ctc_weight > 0, so that
# stage 2 continues stage 1's CTC loss instead of restarting it from a zero blank.
CTC_BLANK_FILE = "ctc_blank.safetensors"
NEG_INF = float("-inf")


class CTCPrefixScorer:
    """LogitsProcessor for `generate()` whose rows are `clips x num_beams`, in that order.

    `log_probs [B, T, V + 1]`: the CTC head's log-probabilities per projected position, the
    blank last; `lengths [B]`: valid positions per clip; `eos`: token ids that end a transcript.
    All rows are scored together: one loop over the positions per generated token.
    """

    def __init__(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        weight: float,
        eos: list[int],
        num_beams: int = 1,
        candidates: int = 8,
    ) -> None:
        if not 0.0 < weight <= 1.0:
            raise AudioLLMError(f"the CTC decoding weight must be in (0, 1], got {weight}")
        log_probs = log_probs.float()
        self.lengths = lengths.to(log_probs.device).long()
        self.ends = (lengths.long() - 1).tolist()  # each clip's last position, read once
        # positions past a clip's end can hold no token (the blank there is harmless: only
        # values up to the last valid position are read)
        beyond = torch.arange(log_probs.shape[1], device=log_probs.device) >= self.lengths[:, None]
        self.log_probs = log_probs.masked_fill(beyond[..., None], NEG_INF)
        self.log_probs[..., -1] = log_probs[..., -1]
        self.weight = weight
        self.eos = sorted(set(eos))
        self.num_beams = num_beams
        self.candidates = candidates
        self.vocab = log_probs.shape[-1] - 1  # token classes; the blank is index `vocab`
        # (clip, prefix) -> (r_nonblank [T], r_blank [T], prefix log-prob), for this step's
        # prefixes only: older ones are never looked up again
        self.states: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, float]]
        self.states = {}

    def _initial(self, clip: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The empty prefix: no token yet, only blanks so far (probability 1 as a prefix)."""
        r_blank = torch.cumsum(self.log_probs[clip, :, -1], 0)
        return torch.full_like(r_blank, NEG_INF), r_blank, 0.0

    def _state(
        self, clip: int, prefix: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The cached state of `prefix`, or rebuilt token by token (first step; rare after)."""
        state = self.states.get((clip, prefix))
        if state is None:
            state = self._initial(clip)
            for i, token in enumerate(prefix):
                grown = self._extend([clip], [state], [prefix[:i]], torch.tensor([[token]]))
                state = grown[0][0]
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        llm = torch.log_softmax(scores.float(), dim=-1)  # greedy passes logits, beams log-probs
        out = llm.clone()
        k = min(self.candidates, self.vocab)
        rows, clips, prefixes, states = [], [], [], []
        for row, ids in enumerate(input_ids.tolist()):
            prefix = tuple(ids)
            if any(token in self.eos for token in prefix):  # finished: generate() pads it
                continue
            rows.append(row)
            clips.append(row // self.num_beams)
            prefixes.append(prefix)
            states.append(self._state(clips[-1], prefix))
        if not rows:
            return out.to(scores.dtype)
        index = torch.tensor(rows, device=llm.device)
        tokens = llm[index, : self.vocab].topk(k, dim=-1).indices  # [R, k]
        host_tokens = tokens.cpu()
        grown = self._extend(clips, states, prefixes, host_tokens)
        self.states = {}
        # The rows' values are read to the host together after the loop, not one by one
        # inside it: each read would make the host wait for the device, rows x beams per token.
        # Every value is computed by the same operation on the same operands as one row alone
        # would be, so the scores (and the hypotheses) are unchanged.
        ctc, ended = [], []
        for i in range(len(rows)):
            r_nonblank, r_blank, prefix_logp = states[i]
            new = [state[2] for state in grown[i]]
            for token, state in zip(host_tokens[i].tolist(), grown[i], strict=True):
                self.states[(clips[i], (*prefixes[i], token))] = state
            ctc.append((torch.tensor(new) - prefix_logp).nan_to_num(nan=NEG_INF))
            t = self.ends[clips[i]]  # the transcript is exactly the prefix: ends at the clip's end
            ended.append(torch.logaddexp(r_nonblank[t], r_blank[t]))
        ctc_all = torch.stack(ctc).to(llm.device)
        joints, finite = [], []
        for i, (row, ended_logp) in enumerate(zip(rows, torch.stack(ended).tolist(), strict=True)):
            joint = torch.full_like(llm[row], NEG_INF)
            joint[tokens[i]] = (1 - self.weight) * llm[row, tokens[i]] + self.weight * ctc_all[i]
            ended_score = ended_logp - states[i][2]
            if math.isnan(ended_score):  # -inf - -inf: an impossible prefix
                ended_score = NEG_INF
            for token in self.eos:
                if token < joint.shape[0]:
                    joint[token] = (1 - self.weight) * llm[row, token] + self.weight * ended_score
            joints.append(joint)
            finite.append(torch.isfinite(joint).any())
        for row, joint, fits in zip(rows, joints, torch.stack(finite).tolist(), strict=True):
            if fits:  # else no candidate fits the audio: LLM alone
                out[row] = joint
        return out.to(scores.dtype)

    def _extend(
        self,
        clips: list[int],
        states: list[tuple[torch.Tensor, torch.Tensor, float]],
        prefixes: list[tuple[int, ...]],
        tokens: torch.Tensor,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """Prefix states of `prefix + (c,)` for each row's tokens c (`tokens [R, k]`), all rows
        in one pass over the positions."""
        device = self.log_probs.device
        r_nonblank = torch.stack([s[0] for s in states])  # [R, T]
        r_blank = torch.stack([s[1] for s in states])
        tokens = tokens.to(device)
        rows, k = tokens.shape
        lp = self.log_probs[torch.tensor(clips, device=device)]  # [R, T, V + 1]
        x = lp.gather(2, tokens[:, None, :].expand(rows, lp.shape[1], k))  # [R, T, k]
        blank = lp[..., -1:]  # [R, T, 1]
        # phi[t]: log-prob that g is complete by position t and c may start at t + 1; after a
        # token equal to c, only paths ending in a blank may start it (CTC merges repeats)
        last = torch.tensor([p[-1] if p else -1 for p in prefixes], device=device)
        same = (tokens == last[:, None])[:, None, :]  # [R, 1, k]
        phi = torch.where(
            same, r_blank[..., None], torch.logaddexp(r_nonblank, r_blank)[..., None]
        ).expand(rows, lp.shape[1], k)
        new_nonblank = torch.full_like(x, NEG_INF)
        new_blank = torch.full_like(x, NEG_INF)
        empty = (last < 0)[:, None]
        new_nonblank[:, 0] = torch.where(empty, x[:, 0], NEG_INF)
        for t in range(1, x.shape[1]):
            new_nonblank[:, t] = torch.logaddexp(new_nonblank[:, t - 1], phi[:, t - 1]) + x[:, t]
            new_blank[:, t] = torch.logaddexp(new_blank[:, t - 1], new_nonblank[:, t - 1])
            new_blank[:, t] += blank[:, t]
        # the prefix probability of g + c: c starts (for the first time) at some position t
        starts = torch.cat([new_nonblank[:, :1], phi[:, :-1] + x[:, 1:]], dim=1)
        prefix_logp = torch.logsumexp(starts, dim=1).tolist()  # [R][k]
        return [
            [(new_nonblank[r, :, i], new_blank[r, :, i], prefix_logp[r][i]) for i in range(k)]
            for r in range(rows)
        ]


class CTCHead:
    """The auxiliary CTC loss of `train.ctc_weight`, kept in `AudioLLM.aux_heads["ctc"]`.

    Not a module: its one parameter, `ctc_blank`, is registered on the AudioLLM root, where it
    comes first in `named_parameters()` (the order DeepSpeed's flat buffers and checkpoints
    follow). `weight` 0: a head attached for joint decoding only, which adds no loss.
    """

    name = "ctc"  # key in `aux_heads`; metrics `train/ctc_loss`
    file_key, file = "ctc_blank", CTC_BLANK_FILE  # its entry in export.json / audio_llm.json

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @classmethod
    def attach(
        cls, model: AudioLLM, weight: float, blank_init: str | Path | None = None
    ) -> CTCHead:
        """Add the head to `model` with its blank vector, zero or read from `blank_init` (a
        `CTC_BLANK_FILE` an earlier stage exported)."""
        dim = model.llm.get_input_embeddings().embedding_dim
        first = model.projector.net[0].weight
        blank = torch.zeros(dim, dtype=first.dtype, device=first.device)
        if blank_init is not None:
            from safetensors.torch import load_file

            saved = load_file(str(blank_init)).get("ctc_blank")
            if saved is None or saved.shape != blank.shape:
                got = "no ctc_blank tensor" if saved is None else f"shape {tuple(saved.shape)}"
                raise AudioLLMError(
                    f"{blank_init}: {got}, this model needs ctc_blank of shape ({dim},): "
                    "it was exported by a run with another LLM"
                )
            blank = saved.to(first.device, first.dtype)
        model.ctc_blank = nn.Parameter(blank)
        head = cls(weight)
        model.aux_heads[cls.name] = head
        return head

    @classmethod
    def init_file(cls, projector_init: str) -> Path | None:
        """The blank an earlier stage exported beside `projector_init`, if there is one."""
        if not projector_init:
            return None
        blank = Path(projector_init).with_name(cls.file)
        return blank if blank.is_file() else None

    def loss_sum(
        self, model: AudioLLM, projected: torch.Tensor, rows: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """CTC of the transcript tokens over the projected audio positions, summed over clips.

        Each position's logits are its dot products with the LLM's input embedding rows plus the
        learned blank vector, so the projector learns to write, in order, embeddings the LLM
        already reads as those tokens. Targets are each clip's target tokens without
        end-of-turn (`rows["transcripts"]`, concatenated, built by `model.rows`); a clip with
        more targets than positions contributes nothing (`zero_infinity`). Each clip's loss is
        divided by its target length, as torch's "mean" does, and the clips are added (the
        caller divides by the clips of the batch or step). The lengths are host tensors: CTC
        reads them as ints, which from the device would be a wait.
        """
        log_probs = self.log_probs(model, projected)
        target_lengths = rows["transcript_lengths"]
        per_clip = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            rows["transcripts"],
            rows["clip_positions"],
            target_lengths,
            blank=log_probs.shape[-1] - 1,
            reduction="none",
            zero_infinity=True,
        )
        divisor = target_lengths.clamp(min=1).to(per_clip.device, per_clip.dtype, non_blocking=True)
        return (per_clip / divisor).sum()

    def log_probs(self, model: AudioLLM, projected: torch.Tensor) -> torch.Tensor:
        """float32 `[B, T, V + 1]`: per projected position, log-softmax over the LLM's input
        embedding rows (dot products) and the learned blank, which is last."""
        # ZeRO-3 partitions the table (and, outside forward(), the blank): private full copies
        weight = dist.full_copy(model.llm.get_input_embeddings().weight)
        blank = dist.full_copy(model.ctc_blank)
        projected = projected.to(weight.dtype)
        table = weight.detach()
        # Two products rather than one against [table; blank]: no gradient for the frozen table.
        tokens = projected @ table.T
        blank = projected @ blank.to(weight.dtype)[:, None]
        return torch.cat([tokens, blank], -1).float().log_softmax(-1)

    def export(self, model: AudioLLM, folder: Path) -> dict[str, str]:
        """Write the blank into `folder`; returns its manifest entry (key -> file name)."""
        from safetensors.torch import save_file

        blank = model.ctc_blank.detach().contiguous().cpu()
        save_file({"ctc_blank": blank}, str(folder / self.file))
        return {self.file_key: self.file}


@dataclass(frozen=True)
class JointCTCDecoding:
    """A decoding hook for `AudioLLM.generate`: the CTC head rescores the LLM's candidates with
    weight `weight` in (0, 1] (`CTCPrefixScorer`)."""

    weight: float

    def logits_processor(
        self, model: AudioLLM, projected: torch.Tensor, lengths: torch.Tensor, num_beams: int
    ) -> CTCPrefixScorer:
        head = model.aux_heads.get(CTCHead.name)
        if head is None:
            raise AudioLLMError(
                "joint CTC decoding needs the CTC head of a run trained with "
                "train.ctc_weight > 0 (its export has ctc_blank.safetensors); "
                "decode with ctc_weight 0"
            )
        eos = model.llm.generation_config.eos_token_id
        stops = eos if isinstance(eos, list) else [eos]
        return CTCPrefixScorer(
            head.log_probs(model, projected), lengths, self.weight, stops, num_beams
        )


def ctc_decoding(weight: float) -> tuple[JointCTCDecoding, ...]:
    """The decoding hooks of a CTC decoding weight (`eval.ctc_weight`, `--ctc-weight`): none
    for 0 (the LLM alone), joint CTC/LLM decoding for a weight in (0, 1]."""
    if not 0 <= weight <= 1:
        raise AudioLLMError(f"the CTC decoding weight must be in [0, 1], got {weight}")
    return (JointCTCDecoding(weight),) if weight > 0 else ()
