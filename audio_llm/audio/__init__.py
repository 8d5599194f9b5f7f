"""Audio in, features out: file decoding and FLAC for shards (`io`), Whisper's log-mel in torch
(`features`), the one copy of the sample rate, hop and frame arithmetic (`frames`), and cutting
long recordings at pauses (`segment`).

Owns no model and no training state. May import `audio_llm.errors` only (and numpy, torch,
transformers' feature code and audio libraries), so reading audio never pulls in a model class.
"""
