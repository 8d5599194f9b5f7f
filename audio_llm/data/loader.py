"""Config + model -> a ready `ShardLoader`, with the start-up checks that keep hour three safe."""

from __future__ import annotations

from audio_llm.config import DataConfig
from audio_llm.data.augment import SpecAugment
from audio_llm.data.collate import model_collator
from audio_llm.data.shards import ShardSet
from audio_llm.data.stream import ShardLoader, ShardStream
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import encoder_identity


def check_compatible(shards: ShardSet, model) -> None:
    """Precomputed shards must come from this run's encoder / feature extractor."""
    index = shards.index
    if shards.mode == "mel":
        n_mels = int(index.get("features", {}).get("n_mels", -1))
        if n_mels != model.encoder.num_mel_bins:
            raise AudioLLMError(
                f"{shards.source}: mel shards have {n_mels} mel bins, the encoder takes "
                f"{model.encoder.num_mel_bins}; "
                "repack with --encoder pointing at this run's encoder"
            )
    elif shards.mode == "encoder":
        packed = index.get("encoder") or {}
        whisper = model.encoder.whisper
        ours = encoder_identity(whisper, whisper.config.name_or_path, model.encoder.varlen)
        packed = {"varlen": False, **packed}  # shards from before the option ran padded
        keys = [k for k in ours if k != "name_or_path" and k in packed]
        diff = {k: (packed[k], ours[k]) for k in keys if packed[k] != ours[k]}
        if diff or not keys:
            if set(diff) == {"varlen"}:
                raise AudioLLMError(
                    f"{shards.source}: encoder-output shards were packed with varlen="
                    f"{packed['varlen']} but model.varlen_encoder is {ours['varlen']}; set "
                    "model.varlen_encoder to match, or repack (pack --varlen-encoder)"
                )
            raise AudioLLMError(
                f"{shards.source}: encoder-output shards were made by another encoder "
                f"({packed.get('name_or_path')!r}; differing: {diff or 'no identity recorded'}) "
                f"than model.encoder ({ours['name_or_path']!r}); repack them with this encoder"
            )


def build_loader(
    cfg: DataConfig,
    model,
    *,
    spec: str,
    index: str = "",
    rank: int = 0,
    world_size: int = 1,
    seed_offset: int = 0,
) -> ShardLoader:
    """Open `spec` (packed folder, or URLs + `index`), check it against `model`, build a loader."""
    shards = ShardSet.open(spec, index)
    check_compatible(shards, model)
    collator = model_collator(model, shards.mode, cfg.max_length, cfg.features_on)
    stream = ShardStream(
        shards,
        collator,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed + seed_offset,
        shuffle_buffer=cfg.shuffle_buffer,
        long_audio=cfg.long_audio,
        bucket_by_length=cfg.bucket_by_length,
        max_batch_seconds=cfg.max_batch_seconds,
        augment=SpecAugment(
            cfg.time_masks, cfg.time_mask_seconds, cfg.feature_masks, cfg.feature_mask_fraction
        ),
    )
    return ShardLoader(stream)
