"""audio_llm: frozen Whisper encoder -> trainable projector -> Qwen2-VL with regex-targeted LoRA."""

__version__ = "0.1.0"
