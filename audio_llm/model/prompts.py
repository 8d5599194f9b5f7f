"""Transcript normalisation and the token layout of one training example.

Layout (chat template on):  [<|im_start|>system SYSTEM <|im_end|>] <|im_start|>user AUDIO*N PROMPT
<|im_end|> <|im_start|>assistant TRANSCRIPT <|im_end|>. Only TRANSCRIPT and its closing token
are learned; the audio span is expanded at the id level, so its text never passes the tokenizer.
The system turn is a choice (`system_prompt`): the template's own default (Qwen2-VL-Instruct adds
"You are a helpful assistant." when no system message is given), a text of one's own, or none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from audio_llm.errors import AudioLLMError

IGNORE_INDEX = -100
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


def normalize_transcript(text: str) -> str:
    """CRLF/CR -> LF, collapse runs of spaces/tabs, trim every line and the whole text.

    Label noise of this kind (" polyp" vs "polyp", "\\r\\n") gives the same words different token
    ids, which the model is then punished for; normalising first keeps targets consistent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(lines).strip()


def audio_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of the audio placeholder; an error if the tokenizer lacks it as a single token."""
    ids = tokenizer.convert_tokens_to_ids([token])
    vocab = tokenizer.get_vocab()
    if token not in vocab or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise AudioLLMError(
            f"audio token {token!r} is not a token of the tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}); set model.audio_token to one that is, "
            "e.g. '<|vision_pad|>' for Qwen2-VL"
        )
    return int(ids[0])


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


class PromptBuilder:
    """Turns (number of audio tokens, prompt, transcript) into input ids and masked labels."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        audio_token: str,
        prompt: str = "Transcribe the audio.",
        chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        """`system_prompt`: None, whatever the chat template does without a system message
        (Qwen2-VL's adds its default one); "" no system turn at all; any other text, a system
        turn with it. Ignored without a chat template."""
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.audio_token = audio_token
        self.audio_token_id = audio_token_id(tokenizer, audio_token)
        self.default_prompt = prompt
        self.use_chat_template = chat_template and tokenizer.chat_template is not None
        if tokenizer.eos_token_id is None:
            raise AudioLLMError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
        self.eos_id = int(tokenizer.eos_token_id)
        self._prefix_cache: dict[str, tuple[list[int], list[int]]] = {}

    def _prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single audio placeholder (cached per prompt)."""
        if prompt not in self._prefix_cache:
            user = self.audio_token + normalize_transcript(prompt)
            text = self._chat_text(user) if self.use_chat_template else user + "\n"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(self.audio_token_id) != 1:
                raise AudioLLMError(
                    f"prompt {prompt!r} must contain no {self.audio_token!r} of its own"
                )
            cut = ids.index(self.audio_token_id)
            self._prefix_cache[prompt] = (ids[:cut], ids[cut + 1 :])
        return self._prefix_cache[prompt]

    def _chat_text(self, user: str) -> str:
        """The chat-templated text of one user turn and the assistant's header, with the system
        turn `system_prompt` asks for."""
        messages = [{"role": "user", "content": user}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if self.system_prompt == "":
            # No system turn: the template's default would come back without a system message,
            # so one is given empty and its turn (as the template writes it alone) is cut off.
            empty = self.tokenizer.apply_chat_template(messages[:1], tokenize=False)
            if not text.startswith(empty):
                raise AudioLLMError(
                    "this chat template does not write the system turn first, so it cannot be "
                    "left out: set model.system_prompt to a text, or to null for the template's "
                    "own default"
                )
            text = text[len(empty) :]
        return text

    def transcript_ids(self, transcript: str) -> list[int]:
        """Target ids: the normalised transcript, tokenised on its own, then the end-of-turn id."""
        ids = self.tokenizer(normalize_transcript(transcript), add_special_tokens=False)
        return [*ids["input_ids"], self.eos_id]

    def prompt(self, num_audio_tokens: int, prompt: str | None = None) -> list[int]:
        """Ids for generation: everything up to where the transcript starts."""
        before, after = self._prompt_ids(prompt or self.default_prompt)
        return [*before, *[self.audio_token_id] * num_audio_tokens, *after]

    def example(self, num_audio_tokens: int, transcript: str, prompt: str | None = None) -> Example:
        """Ids and labels for training: labels are IGNORE_INDEX everywhere but the target."""
        context = self.prompt(num_audio_tokens, prompt)
        target = self.transcript_ids(transcript)
        return Example(input_ids=context + target, labels=[IGNORE_INDEX] * len(context) + target)
