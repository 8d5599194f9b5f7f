"""`audio-llm pack`: manifests (JSONL, LibriSpeech, Kaldi) -> WebDataset tar shards + index.json,
written to temporary names and renamed so a crash never leaves half a shard, and `--verify`.

Modules: `manifests` (inputs -> `Utterance` records), `prepare` (a record -> a sample: decode,
resample, FLAC / log-mel / encoder output), `writer` (shards, index.json, the `pack()` driver) and
`verify` (`--verify`); the flags are in `audio_llm.cli.pack`.

May import `audio_llm.audio`, `model.encoder` (for `--mode encoder`), `model.prompts`,
`data.shards` (the format both sides read) and `files`; never `train` or `evaluation`.
"""
