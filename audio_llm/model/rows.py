"""How a batch's samples sit in the LLM's rows, and every index the forward pass needs, computed
on the host.

A GPU that must learn a length, a count or the positions of a boolean mask from a tensor it holds
waits for the host (`nonzero`, `.item()`, boolean indexing): a stall per micro-batch. So the
collator, which already holds every sample as host lists, builds them here once: where each
clip's projected audio goes (`audio_slots`, filled from `audio_clips` x `audio_frames`), which
positions meet the LM head and what they predict (`score_slots`, `score_targets`), each clip's
transcript for auxiliary heads (`transcripts`, concatenated), and the attention layout
(`position_ids` restarting per sample, `segment_ids` confining attention to a sample,
flash-attention's `cu_seq_lens`).
`AudioLLM.forward` only gathers and scatters with these integer indices, whose backward is
data-independent too.

Rows are right-padded, one sample per row, or packed (`pack_tokens`): samples placed first-fit
decreasing into rows of at most that many tokens, padding-free but for each row's tail. Hand-built
batches without these keys get them from `rows_of_batch` (reading their tensors to the host).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import IGNORE_INDEX

# What `rows_of_batch`/`build_rows` add beside input_ids, attention_mask and labels. HOST_KEYS
# stay on the host (`AudioLLM.batch_inputs`): lengths that kernels read as Python ints.
ROW_KEYS = (
    "position_ids",
    "segment_ids",
    "cu_seq_lens",
    "audio_slots",
    "audio_clips",
    "audio_frames",
    "score_slots",
    "score_targets",
    "transcripts",
)
HOST_KEYS = ("transcript_lengths", "clip_positions", "max_seq_len")
# Per sample, for the FLOP counter (`planning.flops`); the model ignores them.
SAMPLE_KEYS = ("sample_lengths", "sample_targets")


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
    count of target tokens (`count_targets`) all read it, through the rows built here.
    """
    never = (input_ids == audio_token_id) | (attention_mask == 0)
    never[:, 0] = True
    return labels.masked_fill(never, IGNORE_INDEX)


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sample indices per row, first-fit decreasing into rows of at most `budget` tokens; the
    samples of a row keep their batch order. A sample longer than `budget` is an error."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > budget:
            raise AudioLLMError(
                f"a sample of {lengths[i]} tokens does not fit data.pack_tokens={budget}: "
                "set data.pack_tokens >= data.max_length"
            )
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return [sorted(r) for r in rows]


def build_rows(
    ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    audio_counts: Sequence[int],
    *,
    audio_token_id: int,
    eos_id: int,
    pad_id: int,
    pack_tokens: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The LLM rows of a batch of samples (token ids and labels each) and their indices.

    `audio_counts[b]`: the projected audio positions of clip b, which must equal its placeholders
    (the error names `names[b]`, the sample key). `pack_tokens` 0: one sample per row,
    right-padded; otherwise rows packed up to that many tokens.
    """
    lengths = [len(row) for row in ids]
    layout = pack_rows(lengths, pack_tokens) if pack_tokens else [[b] for b in range(len(ids))]
    width = max(sum(lengths[b] for b in row) for row in layout)
    shape = (len(layout), width)
    out = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "segment_ids": torch.zeros(shape, dtype=torch.long),
    }
    start = [0] * len(ids)  # flat position (row * width + column) of each sample's first token
    seq_lens = []
    for r, row in enumerate(layout):
        col = 0
        for seg, b in enumerate(row):
            n = lengths[b]
            out["input_ids"][r, col : col + n] = torch.tensor(ids[b])
            out["labels"][r, col : col + n] = torch.tensor(labels[b])
            out["attention_mask"][r, col : col + n] = 1
            out["position_ids"][r, col : col + n] = torch.arange(n)
            out["segment_ids"][r, col : col + n] = seg
            start[b] = r * width + col
            seq_lens.append(n)
            col += n
        if col < width:  # the tail is a segment of its own: no sample attends to it
            out["segment_ids"][r, col:] = len(row)
            seq_lens.append(width - col)
    out["cu_seq_lens"] = torch.tensor([0, *seq_lens]).cumsum(0).to(torch.int32)
    out["max_seq_len"] = torch.tensor(max(seq_lens))
    if not pack_tokens:
        # One sample per row, right-padded: causal attention alone keeps each sample from its
        # padding, so the LLM gets no mask (SDPA keeps its flash kernel; the pad rows' outputs
        # are never read).
        del out["segment_ids"]
    out.update(_sample_indices(ids, labels, audio_counts, start, audio_token_id, eos_id, names))
    out["sample_lengths"] = torch.tensor(lengths)
    return out


def _sample_indices(
    ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    audio_counts: Sequence[int],
    start: Sequence[int],
    audio_token_id: int,
    eos_id: int,
    names: Sequence[str] | None,
) -> dict[str, torch.Tensor]:
    """Audio, scoring and transcript indices of samples whose first tokens sit at `start`."""
    slots, clips, frames, scored, predicted, spoken = [], [], [], [], [], []
    for b, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        row = torch.tensor(row_ids)
        where = (row == audio_token_id).nonzero().flatten()  # on the host: free
        if len(where) != audio_counts[b]:
            name = f"sample {names[b]!r}" if names else f"batch row {b}"
            raise AudioLLMError(
                f"{name}: {len(where)} audio placeholders for {audio_counts[b]} audio frames; "
                "build prompts with num_audio_tokens()"
            )
        slots.append(where + start[b])
        clips.append(torch.full((len(where),), b))
        frames.append(torch.arange(len(where)))
        targets = target_labels(
            row[None], torch.ones_like(row)[None], torch.tensor([row_labels]), audio_token_id
        )[0]
        # position t predicts token t + 1
        at = (targets[1:] != IGNORE_INDEX).nonzero().flatten()
        scored.append(at + start[b])
        predicted.append(targets[1:][at])
        # what the clip's audio says: the targets without end-of-turn (the CTC head's targets)
        words = targets[(targets != IGNORE_INDEX) & (targets != eos_id)]
        spoken.append(words)
    return {
        "audio_slots": torch.cat(slots),
        "audio_clips": torch.cat(clips),
        "audio_frames": torch.cat(frames),
        "score_slots": torch.cat(scored),
        "score_targets": torch.cat(predicted),
        "transcripts": torch.cat(spoken),
        "transcript_lengths": torch.tensor([len(s) for s in spoken]),
        "clip_positions": torch.tensor(list(audio_counts)),
        "sample_targets": torch.tensor([len(s) for s in scored]),
    }


def rows_of_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    audio_lengths: torch.Tensor,
    *,
    audio_token_id: int,
    eos_id: int,
) -> dict[str, torch.Tensor]:
    """The indices of a hand-built batch (rows as they are: left or right padded), read from
    its tensors on the host; for batches that did not come through the collator."""
    device = input_ids.device
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    labels = torch.full_like(ids, IGNORE_INDEX) if labels is None else labels.cpu()
    rows, width = ids.shape
    samples = [ids[r][mask[r]].tolist() for r in range(rows)]
    sample_labels = [labels[r][mask[r]].tolist() for r in range(rows)]
    first = mask.long().argmax(1).tolist()  # each row's first valid column (0 if empty)
    start = [r * width + first[r] for r in range(rows)]
    out = _sample_indices(
        samples, sample_labels, audio_lengths.tolist(), start, audio_token_id, eos_id, None
    )
    if any(first):  # left padding is a segment of its own (right padding needs no mask)
        out["segment_ids"] = (~mask).long()
    out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    valid = mask.sum(1).tolist()
    seq_lens = [n for r in range(rows) for n in (first[r], valid[r], width - first[r] - valid[r])]
    seq_lens = [n for n in seq_lens if n > 0]
    out["cu_seq_lens"] = torch.tensor([0, *seq_lens]).cumsum(0).to(torch.int32)
    out["max_seq_len"] = torch.tensor(max(seq_lens))
    return {k: v if k in HOST_KEYS else v.to(device) for k, v in out.items()}


def count_targets(batch: dict[str, torch.Tensor], audio_token_id: int) -> int:
    """Target tokens of a (host) training batch: what its LM loss sum adds up."""
    if "score_targets" in batch:
        return len(batch["score_targets"])
    targets = target_labels(
        batch["input_ids"], batch["attention_mask"], batch["labels"], audio_token_id
    )
    return int((targets != IGNORE_INDEX).sum())


def count_clips(batch: dict[str, torch.Tensor]) -> int:
    """Clips (utterances) of a (host) training batch, one per audio clip however its samples are
    packed into rows: what the auxiliary heads' loss sums add up."""
    if "clip_positions" in batch:
        return len(batch["clip_positions"])
    return len(batch["input_ids"])
