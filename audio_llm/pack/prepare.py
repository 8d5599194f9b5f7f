"""Turning one `Utterance` into a sample for `audio-llm pack`: decode the audio (file, Kaldi ark
entry or `--allow-pipes` command), downmix and resample to 16 kHz, apply the length policy, and
encode the payload (FLAC, float16 log-mel, or the frozen encoder's output for `--mode encoder`).

Skips are returned as `Skipped`, never raised, so the driver counts every one by reason.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import subprocess
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from audio_llm.audio.frames import SAMPLE_RATE, WINDOW_SECONDS, encoder_frames
from audio_llm.audio.io import (
    AudioDecodeError,
    AudioFileMissing,
    decode_flac,
    encode_flac,
    load_audio,
    to_mono_16k,
)
from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import normalize_transcript
from audio_llm.pack.manifests import Utterance

MAX_SECONDS = WINDOW_SECONDS  # Whisper's 30 s window
MIN_SAMPLES = 400  # one 25 ms STFT window: anything shorter has no meaningful feature frame
SKIP_REASONS = ("missing_file", "undecodable", "empty_text", "too_long", "too_short")


@dataclass(frozen=True)
class PackSettings:
    """What a worker needs to turn an utterance into a sample (picklable, sent once per worker)."""

    mode: str
    long_audio: str = "skip"
    min_seconds: float = 0.1
    mel_filters: np.ndarray | None = None
    allow_pipes: bool = False  # checked again where a command would run, not only when reading


@dataclass
class Prepared:
    key: str
    meta: dict
    payload: bytes | None  # flac / mel.npy bytes; None in encoder mode until the encoder runs
    mel: np.ndarray | None = None  # float32 log-mel, encoder mode only
    truncated: bool = False


@dataclass
class Skipped:
    key: str
    utt_id: str
    reason: str
    detail: str


def npy_bytes(array: np.ndarray) -> bytes:
    """`.npy` bytes of a plain numeric array; loadable with `np.load(..., allow_pickle=False)`."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# Kaldi ark entries pack reads: a whole WAV file (what `wav-copy` writes) or kaldiio's
# length-prefixed `AUDIO` record. Anything else (feature matrices, kaldiio's pickled `PKL`
# records) is refused before kaldiio parses it: nothing from an input is ever unpickled.
_ARK_AUDIO_FLAGS = (b"RIFF", b"AUDIO")
COMMAND_NOT_FOUND = 127  # /bin/sh's exit status when the program does not exist


def read_ark_audio(ark: Path, offset: int) -> np.ndarray:
    """The audio stored at byte `offset` of a Kaldi ark (`foo.ark:1234`), as float32 mono 16 kHz.

    The ark is opened as a plain file: kaldiio only parses the bytes, and never sees a name it
    could run as a command.
    """
    import kaldiio.matio  # imported here: only Kaldi inputs with ark offsets need it

    where = f"{ark}:{offset}"
    if not ark.is_file():
        raise AudioFileMissing(f"{where}: ark file not found")
    with open(ark, "rb") as f:
        f.seek(offset)
        flag = f.read(5)
        if not flag.startswith(_ARK_AUDIO_FLAGS):
            raise AudioDecodeError(
                f"{where}: not a WAV or kaldiio audio record (starts with {flag!r}); a wav.scp "
                "ark entry must hold audio, e.g. from `wav-copy`, not features"
            )
        f.seek(offset)
        try:
            rate, audio = kaldiio.matio.read_kaldi(f)
        except (ValueError, EOFError, RuntimeError, OSError, sf.SoundFileError) as exc:
            raise AudioDecodeError(f"{where}: cannot decode the ark entry ({exc})") from exc
    audio = np.asarray(audio)
    if audio.dtype == np.uint8:  # 8-bit WAV is unsigned
        audio = (audio.astype(np.float32) - 128) / 128
    elif np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / -np.iinfo(audio.dtype).min
    return to_mono_16k(audio, int(rate))


def run_audio_command(command: str, where: str) -> np.ndarray:
    """Run a Kaldi piped rxfilename (`flac -c -d -s x.flac |`) through /bin/sh, as Kaldi does,
    and decode its stdout as an audio file. Only reached with `--allow-pipes`."""
    result = subprocess.run(
        command.strip().strip("|"),
        shell=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    stderr = result.stderr.decode("utf-8", "replace").strip()[-300:]
    if result.returncode == COMMAND_NOT_FOUND:
        # Every entry using this program would fail the same way: stop instead of skipping all.
        raise AudioLLMError(
            f"{where}: command not found running {command!r} ({stderr}); install it or convert "
            "the audio to files first"
        )
    if result.returncode != 0:
        raise AudioDecodeError(
            f"{where}: command {command!r} exited with status {result.returncode}: {stderr}"
        )
    return decode_flac(result.stdout, f"{where}: output of {command!r}")


def load_utterance_audio(utt: Utterance, allow_pipes: bool) -> np.ndarray:
    """The audio of one utterance: a file (segment), an ark entry, or a command's output."""
    if utt.command is not None:
        if not allow_pipes:
            raise AudioLLMError(f"{utt.id}: {utt.command!r} is a command; pass --allow-pipes")
        return run_audio_command(utt.command, utt.id)
    if utt.ark_offset is not None:
        return read_ark_audio(utt.audio, utt.ark_offset)
    return load_audio(utt.audio, utt.offset, utt.duration)


def prepare_sample(key: str, utt: Utterance, settings: PackSettings) -> Prepared | Skipped:
    """Decode, check and featurise one utterance. Skips are returned, not raised, to be counted."""
    text = normalize_transcript(utt.text)
    if not text:
        return Skipped(key, utt.id, "empty_text", f"{utt.source}: empty transcript")
    if utt.audio is None and utt.command is None:
        return Skipped(key, utt.id, "missing_file", f"{utt.source}: no audio listed for it")
    try:
        audio = load_utterance_audio(utt, settings.allow_pipes)
    except AudioFileMissing as exc:
        return Skipped(key, utt.id, "missing_file", str(exc))
    except AudioDecodeError as exc:
        return Skipped(key, utt.id, "undecodable", str(exc))
    seconds = len(audio) / SAMPLE_RATE
    if len(audio) < MIN_SAMPLES or seconds < settings.min_seconds:
        return Skipped(key, utt.id, "too_short", f"{utt.source}: {seconds:.3f} s")
    truncated = seconds > MAX_SECONDS
    if truncated:
        if settings.long_audio == "skip":
            detail = f"{utt.source}: {seconds:.2f} s > {MAX_SECONDS:g} s"
            return Skipped(key, utt.id, "too_long", detail)
        audio = audio[: int(MAX_SECONDS * SAMPLE_RATE)]

    meta = {
        "id": utt.id,
        "text": text,
        "duration": len(audio) / SAMPLE_RATE,
        "num_samples": len(audio),
        "sample_rate": SAMPLE_RATE,
        "source": utt.source,
    }
    for name in ("speaker", "lang", "prompt"):
        if getattr(utt, name) is not None:
            meta[name] = getattr(utt, name)
    if truncated:
        meta["truncated_from"] = seconds

    if settings.mode == "audio":
        return Prepared(key, meta, encode_flac(audio), truncated=truncated)
    from audio_llm.audio.features import log_mel  # torch only where features are computed

    mel = log_mel(audio, settings.mel_filters).numpy()
    if settings.mode == "mel":
        meta["frames"] = mel.shape[1]
        return Prepared(key, meta, npy_bytes(mel.astype(np.float16)), truncated=truncated)
    meta["frames"] = int(encoder_frames(mel.shape[1]))
    return Prepared(key, meta, None, mel=mel, truncated=truncated)


_worker_settings: PackSettings | None = None


def _init_worker(settings: PackSettings) -> None:
    global _worker_settings
    _worker_settings = settings
    import torch

    torch.set_num_threads(1)  # N workers x 1 thread, not N x all cores


def _prepare_in_worker(task: tuple[str, Utterance]) -> Prepared | Skipped:
    return prepare_sample(task[0], task[1], _worker_settings)


def prepared_stream(
    tasks: list[tuple[str, Utterance]], settings: PackSettings, workers: int
) -> Iterator[Prepared | Skipped]:
    """Prepared samples in task order, from a process pool when workers > 1."""
    if workers <= 1:
        for key, utt in tasks:
            yield prepare_sample(key, utt, settings)
        return
    # spawn, not fork: the parent may hold torch thread pools (encoder mode) that fork can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        # A bounded window of tasks in flight (Pool.imap would queue every result in memory when
        # the consumer, e.g. the encoder, is slower than the workers); popped in order.
        todo = iter(tasks)
        in_flight = deque(
            pool.apply_async(_prepare_in_worker, (task,))
            for task in itertools.islice(todo, 8 * workers)
        )
        while in_flight:
            result = in_flight.popleft().get()
            for task in itertools.islice(todo, 1):
                in_flight.append(pool.apply_async(_prepare_in_worker, (task,)))
            yield result


# The batcher holds this many batches of clips, runs them shortest first, and hands them back in
# input order: a batch of similar lengths pads little (demo clips of 1.5-5.5 s, whisper-tiny.en,
# bfloat16 on one CPU thread: 48 clips/s sorted against 27 in input order). Capped in clips, so
# a large --batch-size of 30 s clips keeps at most a few GB of log-mel in memory.
SORT_WINDOW_BATCHES = 8
SORT_WINDOW_MAX_CLIPS = 1024


class EncoderBatcher:
    """Runs the frozen encoder over log-mel and fills each sample's payload. Samples come back in
    the order they were added: a window of them is run in batches of similar length, so the
    output of one clip depends only on the window it fell in (windows end with each block)."""

    def __init__(
        self, encoder_dir: Path, batch_size: int, device: str, dtype: str, varlen: bool = False
    ) -> None:
        import torch

        from audio_llm.model.encoder import AudioEncoder, encoder_identity, load_whisper_encoder

        self.torch = torch
        self.device = torch.device(device)
        whisper = load_whisper_encoder(encoder_dir, getattr(torch, dtype))
        # includes a weights fingerprint and how the encoder is run
        self.identity = encoder_identity(whisper, encoder_dir, varlen)
        self.encoder = AudioEncoder(whisper, varlen).to(self.device)
        self.batch_size = batch_size
        self.window = max(batch_size, min(SORT_WINDOW_BATCHES * batch_size, SORT_WINDOW_MAX_CLIPS))
        self.d_model = self.encoder.d_model
        self._pending: list[Prepared] = []

    def add(self, sample: Prepared) -> list[Prepared]:
        self._pending.append(sample)
        return self.flush() if len(self._pending) >= self.window else []

    def flush(self) -> list[Prepared]:
        """Encode every pending sample; returns them in the order they were added."""
        window, self._pending = self._pending, []
        by_length = sorted(window, key=lambda s: s.mel.shape[1])  # stable: ties keep input order
        for start in range(0, len(by_length), self.batch_size):
            self._encode(by_length[start : start + self.batch_size])
        return window

    def _encode(self, batch: list[Prepared]) -> None:
        torch = self.torch
        lengths = torch.tensor([s.mel.shape[1] for s in batch])
        features = torch.zeros(len(batch), batch[0].mel.shape[0], int(lengths.max()))
        for row, sample in enumerate(batch):
            features[row, :, : sample.mel.shape[1]] = torch.from_numpy(sample.mel)
        hidden, out_lengths = self.encoder(features.to(self.device), lengths.to(self.device))
        hidden = hidden.float().cpu()
        for row, sample in enumerate(batch):
            enc = hidden[row, : int(out_lengths[row])].numpy().astype(np.float16)
            if not np.isfinite(enc).all():
                raise AudioLLMError(
                    f"encoder output for {sample.meta['id']!r} overflows float16; "
                    "pack in mode mel or audio instead"
                )
            sample.payload, sample.mel = npy_bytes(enc), None
