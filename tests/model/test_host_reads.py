"""One training micro-batch makes no GPU wait for the host: a forward + backward of the stage-2
model on a collated batch performs no data-dependent op (an op whose output shape or control
flow needs a tensor's values), recorded by a TorchDispatchMode on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from audio_llm.config import LoraConfig
from audio_llm.data.collate import AudioSample, Collator
from audio_llm.data.layout import layout_of
from audio_llm.model.build import build_audio_llm

aten = torch.ops.aten
# Ops that read a tensor's values on the host (or size their output by them).
ALWAYS = {
    aten.nonzero.default,
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.masked_scatter.default,
    aten.masked_scatter_.default,
    aten.item.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostReads(TorchDispatchMode):
    """Records every data-dependent op dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ALWAYS:
            self.seen.append(str(func))
        elif func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.seen.append(f"{func} (boolean index)")
        return func(*args, **kwargs)


def samples(layout, mel_lengths: list[int], texts: list[str]) -> list[AudioSample]:
    rng = np.random.default_rng(0)
    out = []
    for i, (frames, text) in enumerate(zip(mel_lengths, texts, strict=True)):
        mel = rng.standard_normal((layout.num_mel_bins, frames)).astype(np.float32)
        example = layout.example({"text": text}, frames, "mel")
        out.append(AudioSample(f"clip{i}", text, None, frames / 100, example, mel=mel))
    return out


TEXTS = ["the red fox runs", "hello world", "a third and longer transcript"]


@pytest.mark.parametrize(
    ("ctc_weight", "varlen", "pack_tokens"),
    [(0.0, False, 0), (0.5, False, 0), (0.5, True, 0), (0.5, True, 4096)],
    ids=["lora", "lora+ctc", "lora+ctc+varlen", "lora+ctc+varlen+packed"],
)
def test_forward_backward_reads_nothing_on_the_host(model_config, ctc_weight, varlen, pack_tokens):
    torch.manual_seed(0)
    config = dataclasses.replace(model_config, varlen_encoder=varlen)
    model = build_audio_llm(config, LoraConfig(), ctc_weight=ctc_weight)
    model.train()
    collate = Collator(layout_of(model, identity=False), "mel", pack_tokens=pack_tokens)
    batch = collate(samples(collate.layout, [300, 170, 240], TEXTS))
    inputs = model.batch_inputs(batch, "cpu")
    with HostReads() as reads:
        out = model(**inputs)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert reads.seen == []
