"""`audio-llm pack`: manifests (JSONL, LibriSpeech, Kaldi) -> WebDataset tar shards + index.json,
written to temporary names and renamed so a crash never leaves half a shard, and `--verify`.

May import `audio_llm.audio`, `model.encoder` (for `--mode encoder`), `model.prompts`,
`data.shards` (the format both sides read) and `files`; never `train` or `evaluation`.
"""
