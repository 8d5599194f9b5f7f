"""The network: the frozen Whisper encoder (`encoder`), the trainable projector (`projector`),
the prompt and token layout of one example (`prompts`), the LLM rows of a batch, padded or
packed, with every index the forward pass needs, built on the host (`rows`; data/ builds them
too), the composed `AudioLLM` (`audio_llm`),
regex-chosen LoRA on the LLM only (`lora`), the optional CTC component with joint decoding
(`ctc`: an auxiliary head and a decoding hook of `AudioLLM`), `build`, the one module that
assembles them all from checkpoint folders (`build_audio_llm`), the published shapes of the
real checkpoints (`arch`), which the LoRA guard, `audio-llm plan` and `audio-llm tiny --like` read,
and `tiny`, which writes offline checkpoints (tiny, or at those published shapes with random
weights) that `build` loads like the real ones: the tests, the benchmarks, `audio-llm tiny` and
the demo use them.

Owns parameters and the forward pass. May import `audio_llm.config`, `errors`, `audio`, `dist`
(ZeRO-3 gathering); never `data`, `train`, `evaluation` or `demo`.
"""
