"""`make demo`, the embedded end-to-end job: the espeak-ng spoken corpus (`speech`), text-only
reading pretraining of the tiny LLM (`reading`), pretrained whisper-tiny.en fetched as data and
converted from CTranslate2 (`pretrained`, `ct2_whisper`) and the driver that runs the real
commands (`run`, `python -m audio_llm.demo`); its tiny models come from `audio_llm.model.tiny`.

May import `config`, `dist`, `errors`, `files`, `audio`, `model`, `planning` and `pack`; it runs
training, packing and evaluation as commands, the way a user does, never by importing `train`,
`data` or `evaluation`. Nothing in the package imports `demo` except the CLI's `teach-reading`
command.
"""
