"""The network: the frozen Whisper encoder (`encoder`), the trainable projector (`projector`),
the prompt and token layout of one example (`prompts`), the composed `AudioLLM` (`audio_llm`),
regex-chosen LoRA on the LLM only (`lora`) and the optional CTC component with joint decoding
(`ctc`).

Owns parameters and the forward pass. May import `audio_llm.config`, `errors`, `audio`; never
`data`, `train`, `evaluation` or `demo`.
"""
