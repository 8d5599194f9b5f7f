"""Text-only "reading" pretraining: a stand-in for what a real pretrained LLM brings.

A real Qwen2-VL already turns embeddings at placeholder positions (image patches) into text. A
tiny random LLM knows nothing, and LoRA on top of nothing stays at the text prior. So before the
demo trains anything on audio, `teach_reading` trains the tiny LLM (all weights, no audio) to
read back a transcript from a noisy, stretched copy of its own token embeddings written at the
audio placeholders, in the same chat-templated prompt layout the audio runs use:

- each token is repeated 1-5 times (audio positions outnumber tokens and vary in rate),
- empty runs (zero vectors) are inserted between tokens, like silence or CTC blanks, and always
  between two equal tokens, so a long run means one token, as CTC's own convention has it,
- Gaussian noise of `noise` x the embedding spread is added everywhere.

Sentences are random sequences of the embedded word list (the tokenizer's own training words, a
superset of the demo's vocabulary): the model learns to read, not any particular test sentence.
After this the model is saved in place, through `save_pretrained`, and loads like any checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from audio_llm.config import DEFAULT_AUDIO_TOKEN
from audio_llm.errors import AudioLLMError
from audio_llm.files import sha256_file, staged_dir
from audio_llm.model.prompts import IGNORE_INDEX, PromptBuilder
from audio_llm.model.tiny import vocabulary


@dataclass(frozen=True)
class ReadingSpec:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    max_repeat: int = 5
    blank_prob: float = 0.3
    noise: float = 0.7
    min_words: int = 1
    max_words: int = 12
    prompt: str = "Read the text."
    seed: int = 0


def _example(
    rng: random.Random, words: list[str], prompts: PromptBuilder, spec: ReadingSpec
) -> tuple[list[int], list[int], list[int]]:
    """(source token ids with -1 for a blank position, input ids, labels) for one sentence."""
    text = " ".join(rng.choices(words, k=rng.randint(spec.min_words, spec.max_words)))
    source: list[int] = []
    for token in prompts.tokenizer(text, add_special_tokens=False)["input_ids"]:
        if source and source[-1] == token:  # as in CTC: a blank always separates a repeat
            source += [-1] * rng.randint(1, 3)
        source += [token] * rng.randint(1, spec.max_repeat)
        if rng.random() < spec.blank_prob:
            source += [-1] * rng.randint(1, 3)
    example = prompts.example(len(source), text, spec.prompt)
    return source, example.input_ids, example.labels


def teach_reading(
    llm_dir: str | Path, spec: ReadingSpec | None = None, log_every: int = 100
) -> list[float]:
    """Train the checkpoint at `llm_dir` to read (see module doc) and save it back in place.

    Returns the mean loss of each `log_every` interval. CPU, float32, one process.
    """
    spec = spec or ReadingSpec()
    llm_dir = Path(llm_dir)
    if not (llm_dir / "config.json").is_file():
        raise AudioLLMError(f"{llm_dir} is not a checkpoint folder (no config.json)")
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = Qwen2VLForConditionalGeneration.from_pretrained(llm_dir, dtype=torch.float32)
    prompts = PromptBuilder(tokenizer, DEFAULT_AUDIO_TOKEN, spec.prompt)
    words = vocabulary()
    table = llm.get_input_embeddings()
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(llm.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / spec.warmup) * max(0.05, 1 - s / spec.steps),
    )
    llm.train()
    history, running, began = [], 0.0, time.time()
    for step in range(1, spec.steps + 1):
        batch = [_example(rng, words, prompts, spec) for _ in range(spec.batch_size)]
        width = max(len(ids) for _, ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for _, i, _ in batch])
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, _, lab in batch])
        mask = torch.arange(width)[None] < torch.tensor([len(i) for _, i, _ in batch])[:, None]
        sources = torch.tensor([t for src, _, _ in batch for t in src])
        with torch.no_grad():
            scale = table.weight.std()
        vectors = table(sources.clamp(min=0)) * (sources >= 0)[:, None]
        vectors = vectors + torch.randn_like(vectors) * scale * spec.noise
        embeds = table(ids)
        at_audio = (ids == prompts.audio_token_id)[..., None]
        embeds = embeds.masked_scatter(at_audio, vectors)
        loss = llm(inputs_embeds=embeds, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        running += loss.item()
        if step % log_every == 0 or step == spec.steps:
            history.append(running / (step - (step - 1) // log_every * log_every))
            took = time.time() - began
            print(
                f"reading step {step}/{spec.steps} loss {history[-1]:.3f} ({took:.0f} s)",
                flush=True,
            )
            running = 0.0
    llm.eval()
    with staged_dir(llm_dir) as tmp:
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return history


# The demo's reader, shipped: the reading pretraining is deterministic on the project's machines
# (pinned torch, one process, seeded), so its result is a fact that can be shipped and checked,
# like a downloaded checkpoint, instead of 16 minutes of every new user's first `make demo`.
READER_ASSET = Path(__file__).resolve().parents[1] / "assets" / "reader"
READER_MANIFEST = "reader.json"


def shipped_reader(settings: dict, asset: Path | None = None) -> tuple[dict | None, str]:
    """The shipped reader's manifest if it was built with `settings` and every file matches its
    sha256, else None; the string says which (a line for the user)."""
    asset = asset or READER_ASSET
    path = asset / READER_MANIFEST
    if not path.is_file():
        return None, f"no shipped reader at {asset}"
    manifest = json.loads(path.read_text())
    if manifest.get("settings") != settings:
        return None, f"the shipped reader ({asset}) was built with other settings"
    for name, digest in manifest["files"].items():
        if not (asset / name).is_file() or sha256_file(asset / name) != digest:
            return None, f"{asset / name}: sha256 differs from {READER_MANIFEST} (corrupt asset)"
    return manifest, f"shipped reader {asset} (sha256 verified)"


def install_reader(asset: Path, dst: Path, manifest: dict) -> None:
    """Copy the shipped reader's files to `dst` (replacing it whole: a temp folder, then rename)."""
    with staged_dir(dst) as tmp:
        for name in manifest["files"]:
            shutil.copyfile(asset / name, tmp / name)


def write_reader_asset(built: Path, asset: Path, manifest: dict) -> dict:
    """Ship the reader folder `built` as `asset`: its files plus a manifest of their sha256
    (`manifest` adds the settings it was built with, its time and losses)."""
    files = sorted(p.name for p in built.iterdir() if p.is_file())
    manifest = {**manifest, "files": {name: sha256_file(built / name) for name in files}}
    with staged_dir(asset) as tmp:
        shutil.copytree(built, tmp, dirs_exist_ok=True)
        (tmp / READER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def rebuilt_matches(built: Path, asset: Path | None = None) -> list[str]:
    """Files of a freshly rebuilt reader folder whose sha256 differs from the shipped manifest
    (empty: the rebuild reproduces the asset bit for bit)."""
    asset = asset or READER_ASSET
    manifest = json.loads((asset / READER_MANIFEST).read_text())
    return [
        name
        for name, digest in manifest["files"].items()
        if not (built / name).is_file() or sha256_file(built / name) != digest
    ]
