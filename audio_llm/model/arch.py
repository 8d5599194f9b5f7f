"""Published shapes of the real checkpoints, for planning and guards without downloading them.

Values are those of the configs on the Hugging Face hub (openai/whisper-large-v3,
Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct). Models built from them go on the meta
device: names and shapes are real, no memory is used.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, Qwen2VLConfig, WhisperConfig

from audio_llm.errors import AudioLLMError

_QWEN2VL_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
_QWEN2VL_TEXT = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def whisper_large_v3() -> WhisperConfig:
    return WhisperConfig(
        vocab_size=51866,
        num_mel_bins=128,
        d_model=1280,
        encoder_layers=32,
        encoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_layers=32,
        decoder_attention_heads=20,
        decoder_ffn_dim=5120,
        max_source_positions=1500,
        max_target_positions=448,
    )


def qwen2_vl(size: str) -> Qwen2VLConfig:
    """Qwen2-VL-2B-Instruct or -7B-Instruct."""
    text = {
        "2b": {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
        },
        "7b": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
    }[size]
    return Qwen2VLConfig(
        text_config={**_QWEN2VL_TEXT, **text},
        vision_config={**_QWEN2VL_VISION, "hidden_size": text["hidden_size"]},
        tie_word_embeddings=size == "2b",
    )


PUBLISHED = {
    "whisper-large-v3": whisper_large_v3,
    "qwen2-vl-2b": lambda: qwen2_vl("2b"),
    "qwen2-vl-7b": lambda: qwen2_vl("7b"),
}


def resolve_config(name_or_path: str) -> PretrainedConfig:
    """A built-in name (see PUBLISHED) or a local checkpoint folder -> its config."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]()
    if not Path(name_or_path, "config.json").is_file():
        raise AudioLLMError(
            f"{name_or_path!r} is neither a checkpoint folder with config.json nor one of "
            f"{sorted(PUBLISHED)}"
        )
    return AutoConfig.from_pretrained(name_or_path)
