"""data.augment: SpecAugment masks (data.time_masks / data.feature_masks) on the batches the loader
yields."""

from pathlib import Path

import pytest
import torch

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of
from audio_llm.errors import AudioLLMError


def _masked(cfg: DataConfig, model, folder: Path, n: int) -> tuple[list[dict], list[dict]]:
    """The first `n` batches of `folder` without masks and with `cfg`'s masks (same seed)."""
    plain = DataConfig(**{**vars(cfg), "time_masks": 0, "feature_masks": 0})
    clean = iter(build_loader(plain, layout_of(model), spec=str(folder)))
    masked = iter(build_loader(cfg, layout_of(model), spec=str(folder)))
    return [next(clean) for _ in range(n)], [next(masked) for _ in range(n)]


def test_time_masks_fall_inside_each_clip_and_keep_the_transcript(shard_dirs, model):
    cfg = DataConfig(
        batch_size=4, num_workers=0, shuffle_buffer=4, time_masks=2, time_mask_seconds=0.3
    )
    clean, masked = _masked(cfg, model, shard_dirs["encoder"], 3)
    total_hit = 0
    for a, b in zip(clean, masked, strict=True):
        batch_hit = 0
        assert a["keys"] == b["keys"]
        for name in ("input_ids", "labels", "attention_mask", "audio_lengths"):
            assert torch.equal(a[name], b[name])
        for row, n in enumerate(b["audio_lengths"].tolist()):
            before, after = a["audio_embeds"][row].float(), b["audio_embeds"][row].float()
            assert torch.equal(after[n:], before[n:])  # padding untouched
            hit = (after[:n] != before[:n]).any(dim=1)
            # a masked frame is the clip's mean in every channel; at most 2 spans of 15 frames
            fill = before[:n].mean()
            torch.testing.assert_close(
                after[:n][hit], fill.expand_as(after[:n][hit]), atol=2e-3, rtol=0
            )
            assert int(hit.sum()) <= 2 * 15
            batch_hit += int(hit.sum())
        assert b["stats"]["masked_frames"] == batch_hit  # the counter TensorBoard shows
        total_hit += batch_hit
    assert total_hit > 0


def test_feature_masks_cover_bands_of_mel_bins(shard_dirs, model):
    cfg = DataConfig(
        batch_size=4, num_workers=0, shuffle_buffer=4, feature_masks=1, feature_mask_fraction=0.25
    )
    clean, masked = _masked(cfg, model, shard_dirs["mel"], 2)
    bands = 0
    for a, b in zip(clean, masked, strict=True):
        for row, n in enumerate(b["feature_lengths"].tolist()):
            before = a["input_features"][row, :, :n].float()
            after = b["input_features"][row, :, :n].float()
            changed = (after != before).any(dim=1).nonzero().flatten().tolist()
            assert len(changed) <= 20  # 25% of 80 mel bins
            if changed:
                assert changed == list(range(changed[0], changed[-1] + 1))  # one band
                band = after[changed]
                assert torch.all(band == band[0, 0])  # filled with one value
                bands += 1
            assert torch.equal(b["input_features"][row, :, n:], a["input_features"][row, :, n:])
    assert bands > 0


def test_masks_are_reproducible_and_replayed_on_resume(shard_dirs, model):
    cfg = DataConfig(
        batch_size=3,
        num_workers=0,
        shuffle_buffer=4,
        time_masks=2,
        time_mask_seconds=0.2,
        feature_masks=2,
    )
    spec = str(shard_dirs["audio"])  # live log-mel, computed in the loader, then masked
    first = iter(build_loader(cfg, layout_of(model), spec=spec))
    reference = [next(first)["input_features"] for _ in range(4)]
    again = iter(build_loader(cfg, layout_of(model), spec=spec))
    assert all(torch.equal(next(again)["input_features"], r) for r in reference)
    resumed = build_loader(cfg, layout_of(model), spec=spec)
    resumed.load_state_dict({"epoch": 0, "consumed": [2]})
    it = iter(resumed)
    assert torch.equal(next(it)["input_features"], reference[2])
    assert torch.equal(next(it)["input_features"], reference[3])
    other = iter(build_loader(DataConfig(**{**vars(cfg), "seed": 1}), layout_of(model), spec=spec))
    assert not torch.equal(next(other)["input_features"], reference[0])


def test_masks_refuse_waveform_batches_and_bad_settings(shard_dirs, model):
    cfg = DataConfig(batch_size=2, num_workers=0, time_masks=1, features_on="device")
    with pytest.raises(AudioLLMError, match="features_on=loader"):
        build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    # precomputed features ignore features_on, so the same config masks encoder shards
    assert (
        build_loader(cfg, layout_of(model), spec=str(shard_dirs["encoder"])).stream.augment
        is not None
    )
    with pytest.raises(AudioLLMError, match="time_masks"):
        DataConfig(time_masks=-1)
    with pytest.raises(AudioLLMError, match="feature_mask_fraction"):
        DataConfig(feature_masks=1, feature_mask_fraction=1.5)
