"""Using a trained model: WER scoring (`wer`), batched evaluation over shards (`evaluate`), the
self-contained export bundle (`export`) and long-audio transcription (`transcribe`).

May import `config`, `dist`, `files`, `audio`, `model`, `data`; never `train`, `planning` or
`demo`.
"""
