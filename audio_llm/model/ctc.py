"""Joint CTC / LLM decoding: the projector's CTC head rescores the LLM's next-token candidates.

A model trained with `train.ctc_weight > 0` has two readings of the same audio: the LLM's
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

`CTCPrefixScorer` is a transformers `LogitsProcessor`: `AudioLLM.generate(ctc_weight=w)` hands
it to `generate()`. Its prefix states are cached per (clip, prefix), so each step costs one pass
over the clip's positions for the candidates of every row, whatever the beam reordering does.
"""

from __future__ import annotations

import math

import torch

from audio_llm.errors import AudioLLMError

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
        grown = self._extend(clips, states, prefixes, tokens.cpu())
        self.states = {}
        ended_at = self.lengths[torch.tensor(clips, device=self.lengths.device)] - 1
        for i, row in enumerate(rows):
            r_nonblank, r_blank, prefix_logp = states[i]
            new = [state[2] for state in grown[i]]
            for token, state in zip(tokens[i].tolist(), grown[i], strict=True):
                self.states[(clips[i], (*prefixes[i], token))] = state
            ctc = (torch.tensor(new) - prefix_logp).nan_to_num(nan=NEG_INF).to(llm.device)
            joint = torch.full_like(llm[row], NEG_INF)
            joint[tokens[i]] = (1 - self.weight) * llm[row, tokens[i]] + self.weight * ctc
            # end of sequence: the transcript is exactly the prefix
            t = int(ended_at[i])
            ended = float(torch.logaddexp(r_nonblank[t], r_blank[t])) - prefix_logp
            ended = NEG_INF if math.isnan(ended) else ended  # -inf - -inf: an impossible prefix
            for token in self.eos:
                if token < joint.shape[0]:
                    joint[token] = (1 - self.weight) * llm[row, token] + self.weight * ended
            if torch.isfinite(joint).any():  # else no candidate fits the audio: LLM alone
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
