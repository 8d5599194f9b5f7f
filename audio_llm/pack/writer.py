"""`audio-llm pack`: manifests, LibriSpeech and Kaldi dirs -> WebDataset shards + index.json.

One sample is `KEY.json` plus exactly one payload: `KEY.flac` (mode audio), `KEY.mel.npy`
(mode mel) or `KEY.enc.npy` (mode encoder). The format is described for users in shards/README.md.

Invariants this module keeps:
- Deterministic: samples are sorted by id (optionally shuffled with a seed) and tar headers carry no
  time or owner, so the same input and options give byte-identical shards and checksums.
- Atomic: every shard and the index are written under a temporary name and `os.replace`d; the index
  comes last, so a folder with an index.json is complete and a crash never leaves a half shard under
  a final name.
- Counted: every input utterance is either written, truncated-and-written, or skipped for a named
  reason; the report is printed and stored in index.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from audio_llm import __version__
from audio_llm.audio.frames import HOP_LENGTH, MEL_FRAMES_PER_WINDOW, SAMPLE_RATE, encoder_frames
from audio_llm.audio.io import (
    AudioDecodeError,
    AudioFileMissing,
    decode_flac,
    encode_flac,
    load_audio,
    to_mono_16k,
)
from audio_llm.data.shards import FORMAT_VERSION, INDEX_NAME, read_index
from audio_llm.data.shards import PAYLOADS as PAYLOAD_SUFFIX
from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import normalize_transcript

MODES = tuple(PAYLOAD_SUFFIX)
FORMATS = ("jsonl", "librispeech", "kaldi")
MAX_SECONDS = MEL_FRAMES_PER_WINDOW * HOP_LENGTH / SAMPLE_RATE  # Whisper's 30 s window
MIN_SAMPLES = 400  # one 25 ms STFT window: anything shorter has no meaningful feature frame
SKIP_REASONS = ("missing_file", "undecodable", "empty_text", "too_long", "too_short")
SKIP_LOG_LIMIT = 10  # skipped samples named per reason before the log only counts them

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Utterance:
    """One input utterance, as read from a manifest or directory (nothing decoded yet)."""

    id: str
    audio: Path | None  # None: no audio file (a transcript without audio, or a command)
    text: str
    source: str  # the audio path as the input wrote it (or the Kaldi/LibriSpeech id)
    offset: float = 0.0
    duration: float | None = None  # segment length; only set together with an offset
    speaker: str | None = None
    lang: str | None = None
    prompt: str | None = None
    ark_offset: int | None = None  # Kaldi `foo.ark:1234`: `audio` is the ark, read from here
    command: str | None = None  # Kaldi piped entry `cmd |`: its stdout is the audio file


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def read_jsonl(path: Path) -> list[Utterance]:
    """NeMo-style JSONL manifest: `audio_filepath` (or `audio`), `text`, optional `duration`,
    `offset`, `id`, `prompt`, `speaker`, `lang`. Relative audio paths resolve against the
    manifest's folder. With `offset`, `duration` selects a segment; without it, the whole file is
    used and `duration` is informative only (the decoded length decides)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AudioLLMError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise AudioLLMError(f"{where}: expected a JSON object per line")
            audio = row.get("audio_filepath", row.get("audio"))
            if not isinstance(audio, str) or not audio:
                raise AudioLLMError(f"{where}: no 'audio_filepath' (or 'audio') path")
            if "text" not in row:
                raise AudioLLMError(f"{where}: no 'text' field (NeMo manifests use 'text')")
            offset = row.get("offset")
            audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
            default_id = str(Path(audio).with_suffix(""))
            if offset:
                default_id += f"-{round(float(offset) * 1000):09d}"
            items.append(
                Utterance(
                    id=str(row.get("id") or default_id),
                    audio=audio_path,
                    text=str(row.get("text") or ""),
                    source=audio,
                    offset=float(offset or 0.0),
                    duration=float(row["duration"]) if offset and row.get("duration") else None,
                    speaker=_optional_str(row.get("speaker")),
                    lang=_optional_str(row.get("lang")),
                    prompt=_optional_str(row.get("prompt")),
                )
            )
    return items


def read_librispeech(root: Path) -> list[Utterance]:
    """LibriSpeech layout: `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` lines `UTTID TEXT`, audio
    in `UTTID.flac` beside it. `root` may be a split (dev-clean) or any folder above the
    transcripts."""
    items = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utt_id}.flac"
            items.append(
                Utterance(
                    id=utt_id,
                    audio=audio,
                    text=text,
                    source=str(audio.relative_to(root)),
                    speaker=utt_id.split("-")[0],
                )
            )
    return items


def _read_kaldi_table(path: Path) -> Iterator[tuple[int, str, str]]:
    """Lines `KEY VALUE...` of a Kaldi table file -> (line number, key, rest of the line)."""
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            key, _, value = line.strip().partition(" ")
            yield line_no, key, value.strip()


_ARK_OFFSET = re.compile(r"(?P<ark>.+):(?P<offset>\d+)")  # Kaldi's offset rxfilename


def _is_command(value: str) -> bool:
    """A Kaldi rxfilename that runs a command (`cmd |`), rather than naming a file."""
    return value.endswith("|") or value.startswith("|")


def _refuse_pipes(wav_scp: Path, piped: list[tuple[int, str, str]], total: int) -> AudioLLMError:
    line_no, utt_id, value = piped[0]
    return AudioLLMError(
        f"{wav_scp}:{line_no}: piped entry {value!r} (utterance {utt_id!r}) runs a command; "
        f"{len(piped)} of {total} wav.scp entries do. pack runs none unless asked: either pass "
        "--allow-pipes to run them through /bin/sh from the current folder (read wav.scp "
        "first; the commands are listed in the report), or write the audio out once, e.g. "
        f"`wav-copy scp:{wav_scp} ark,scp:wav.ark,wav_ark.scp`, and pack a data dir whose "
        "wav.scp is wav_ark.scp (pack reads `foo.ark:OFFSET` entries directly)"
    )


def read_kaldi(data_dir: Path, allow_pipes: bool = False) -> list[Utterance]:
    """Kaldi data dir: `wav.scp`, `text` (`UTTID TRANSCRIPT`), optional `utt2spk`.

    `wav.scp` lines are `UTTID RXFILENAME`, where the rxfilename is an audio file path, an ark
    offset `foo.ark:1234` (read directly, nothing run), or a command ending in `|` whose stdout is
    the audio: commands are refused, naming the line, unless `allow_pipes`. Relative paths resolve
    against the current directory (Kaldi's convention: the recipe folder), falling back to the
    data dir. A `segments` file is refused rather than packed wrongly.
    """
    if (data_dir / "segments").exists():
        raise AudioLLMError(
            f"{data_dir / 'segments'}: Kaldi segments are not supported; cut the segments to files "
            "(e.g. `extract-segments`) or write a JSONL manifest with offset/duration"
        )
    texts = {key: value for _, key, value in _read_kaldi_table(data_dir / "text")}
    speakers = {}
    if (data_dir / "utt2spk").exists():
        speakers = {key: value for _, key, value in _read_kaldi_table(data_dir / "utt2spk")}
    wav_scp = data_dir / "wav.scp"
    entries = list(_read_kaldi_table(wav_scp))
    piped = [entry for entry in entries if _is_command(entry[2])]
    if piped and not allow_pipes:
        raise _refuse_pipes(wav_scp, piped, len(entries))

    def resolve(path: str) -> Path:
        audio = Path(path)
        if not audio.is_absolute() and not audio.exists() and (data_dir / audio).exists():
            audio = data_dir / audio
        return audio

    items = []
    for _, utt_id, value in entries:
        common = {
            "id": utt_id,
            "text": texts.get(utt_id, ""),
            "source": value,
            "speaker": speakers.get(utt_id),
        }
        ark = _ARK_OFFSET.fullmatch(value)
        if _is_command(value):
            items.append(Utterance(audio=None, command=value, **common))
        elif ark:
            # Opened as a plain file by us, never handed to kaldiio as a name (it would run a
            # name like `cmd |:12` as a command).
            audio = resolve(ark["ark"])
            items.append(Utterance(audio=audio, ark_offset=int(ark["offset"]), **common))
        else:
            items.append(Utterance(audio=resolve(value), **common))
    # Transcripts without audio are counted too, as missing files, so nothing vanishes silently.
    listed = {u.id for u in items}
    for utt_id in sorted(set(texts) - listed):
        items.append(Utterance(id=utt_id, audio=None, text=texts[utt_id], source=utt_id))
    return items


def detect_format(path: Path) -> str:
    """`jsonl` for a file, `kaldi` for a dir with wav.scp, `librispeech` for *.trans.txt below."""
    if path.is_file():
        return "jsonl"
    if path.is_dir():
        if (path / "wav.scp").is_file():
            if not (path / "text").is_file():
                raise AudioLLMError(f"{path}: Kaldi data dir has wav.scp but no `text` file")
            return "kaldi"
        if next(path.rglob("*.trans.txt"), None) is not None:
            return "librispeech"
        raise AudioLLMError(
            f"{path}: not a Kaldi data dir (no wav.scp) and no LibriSpeech *.trans.txt below it; "
            "pass a JSONL manifest, a Kaldi data dir or a LibriSpeech folder (or set --format)"
        )
    raise AudioLLMError(f"{path}: input not found")


READERS: dict[str, Callable[[Path], list[Utterance]]] = {
    "jsonl": read_jsonl,
    "librispeech": read_librispeech,
    "kaldi": read_kaldi,
}


def read_inputs(
    paths: Iterable[str | Path], fmt: str = "auto", allow_pipes: bool = False
) -> list[Utterance]:
    """All utterances of all inputs, each read with `fmt` or its detected format.

    `allow_pipes` lets Kaldi `wav.scp` commands (`cmd |`) through; by default they are refused.
    """
    items: list[Utterance] = []
    for path in map(Path, paths):
        if not path.exists():
            raise AudioLLMError(f"--input {path}: not found")
        reader = detect_format(path) if fmt == "auto" else fmt
        if reader == "kaldi":
            items.extend(read_kaldi(path, allow_pipes))
        else:
            items.extend(READERS[reader](path))
    return items


def assign_keys(ids: Iterable[str]) -> list[str]:
    """Webdataset-safe, unique keys: letters, digits, `_` and `-` only (webdataset splits member
    names at the first dot), no leading `_` (`__key__`-style names are metadata), `_N` appended
    on clashes."""
    used: set[str] = set()
    keys = []
    for utt_id in ids:
        base = _KEY_UNSAFE.sub("_", utt_id).lstrip("_") or "utt"
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


# ----------------------------------------------------------------------------- samples


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


def _prepared_stream(
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


class EncoderBatcher:
    """Runs the frozen encoder over batches of log-mel, in order; fills each sample's payload."""

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
        self.d_model = self.encoder.d_model
        self._pending: list[Prepared] = []

    def add(self, sample: Prepared) -> list[Prepared]:
        self._pending.append(sample)
        return self.flush() if len(self._pending) >= self.batch_size else []

    def flush(self) -> list[Prepared]:
        batch, self._pending = self._pending, []
        if not batch:
            return []
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
        return batch


# ----------------------------------------------------------------------------- shards


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_file(folder: Path, name: str) -> tuple[int, Path]:
    """A hidden temporary file beside `name`, readable like a normal file (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` via a temporary file in the same folder and `os.replace`."""
    fd, tmp = _temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _tar_member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # header + data padded to whole blocks


class ShardWriter:
    """Writes samples into `PREFIX-000000.tar`, ... rolling over at max samples / max bytes.

    Each shard is built under a temporary name and renamed only when complete; tar headers have
    fixed mtime/owner/mode so the bytes depend only on the samples.
    """

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._samples = 0
        self._seconds = 0.0

    def add(self, key: str, members: list[tuple[str, bytes]], seconds: float) -> None:
        size = sum(_tar_member_bytes(len(data)) for _, data in members)
        if self._tar is not None and (
            self._samples >= self.max_samples
            or self._file.tell() + size + 1024 > self.max_bytes  # 1024: end-of-archive blocks
        ):
            self._finish()
        if self._tar is None:
            self._start()
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1
        self._seconds += seconds

    def _start(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        fd, self._tmp = _temp_file(self.out_dir, name)
        self._file = os.fdopen(fd, "wb")
        # Closed in _finish/abort: the archive spans many add() calls, so no `with` block.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT
        )
        self._samples, self._seconds = 0, 0.0

    def _finish(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / name
        os.replace(self._tmp, final)
        self.shards.append(
            {
                "name": name,
                "samples": self._samples,
                "seconds": round(self._seconds, 3),
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
            }
        )
        self._tar = self._file = self._tmp = None

    def close(self) -> list[dict]:
        """Finish the open shard; returns the per-shard index entries."""
        if self._tar is not None:
            self._finish()
        _fsync_dir(self.out_dir)
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None


# ----------------------------------------------------------------------------- report


@dataclass
class PackReport:
    """What happened to every input utterance."""

    inputs: int = 0
    samples: int = 0
    seconds: float = 0.0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    commands: int = 0  # wav.scp commands run (--allow-pipes)
    command_examples: list[str] = field(default_factory=list)

    def skip(self, item: Skipped, log: Callable[[str], None] | None) -> None:
        self.skipped[item.reason] += 1
        if len(self.examples[item.reason]) < SKIP_LOG_LIMIT:
            self.examples[item.reason].append(f"{item.utt_id}: {item.detail}")
            if log is not None:
                log(f"skip ({item.reason.replace('_', ' ')}) {item.utt_id}: {item.detail}")

    def ran_command(self, utt: Utterance, log: Callable[[str], None] | None) -> None:
        self.commands += 1
        if len(self.command_examples) < SKIP_LOG_LIMIT:
            self.command_examples.append(f"{utt.id}: {utt.command}")
            if log is not None:
                log(f"ran (--allow-pipes) {self.command_examples[-1]}")

    def to_dict(self) -> dict:
        report = {
            "inputs": self.inputs,
            "samples_written": self.samples,
            "hours_written": round(self.seconds / 3600, 6),
            "truncated": self.truncated,
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS},
            "skipped_total": sum(self.skipped.values()),
            "skip_examples": {r: self.examples[r] for r in SKIP_REASONS if self.examples[r]},
        }
        if self.commands:  # only with --allow-pipes: what ran, for the record
            report["commands_run"] = self.commands
            report["command_examples"] = self.command_examples
        return report


def report_summary(report: dict) -> str:
    """The human-readable report of `PackReport.to_dict()` (as stored in index.json)."""
    skipped = report["skipped"]
    counts = ", ".join(f"{r.replace('_', ' ')} {skipped[r]}" for r in SKIP_REASONS)
    lines = [
        f"wrote {report['samples_written']} of {report['inputs']} samples "
        f"({report['hours_written']:.3f} h)",
        f"skipped {report['skipped_total']}: {counts}",
        f"truncated to {MAX_SECONDS:g} s: {report['truncated']}",
    ]
    unnamed = {r: n - SKIP_LOG_LIMIT for r, n in skipped.items() if n > SKIP_LOG_LIMIT}
    if unnamed:
        more = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in unnamed.items())
        lines.append(f"(skips not named individually: {more})")
    if report.get("commands_run"):
        examples = report["command_examples"]
        lines.append(f"ran {report['commands_run']} wav.scp command(s) (--allow-pipes):")
        lines += [f"  {command}" for command in examples]
        if report["commands_run"] > len(examples):
            lines.append(f"  ... and {report['commands_run'] - len(examples)} more like these")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pack


@dataclass
class PackOptions:
    """Options of `pack`; the CLI flags map one to one (see `audio-llm pack --help`)."""

    out: Path
    mode: str = "audio"
    fmt: str = "auto"
    prefix: str = "shard"
    max_samples: int = 1000
    max_bytes: int = 1 << 30
    long_audio: str = "skip"
    min_seconds: float = 0.1
    encoder: Path | None = None
    feature_extractor: Path | None = None
    n_mels: int | None = None
    workers: int = 0
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    varlen_encoder: bool = False
    shuffle: bool = False
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False
    allow_pipes: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.mode not in MODES:
            raise AudioLLMError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "encoder" and self.encoder is None:
            raise AudioLLMError("--mode encoder needs --encoder DIR (a Whisper checkpoint)")
        if self.mode == "mel" and not (self.encoder or self.feature_extractor or self.n_mels):
            raise AudioLLMError(
                "--mode mel needs the feature extractor of the encoder you will train with: "
                "--encoder DIR, --feature-extractor DIR or --n-mels 80|128"
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.prefix):
            raise AudioLLMError(f"--prefix {self.prefix!r}: use letters, digits, '.', '_', '-'")
        if self.max_samples < 1 or self.max_bytes < 1 or self.batch_size < 1:
            raise AudioLLMError("--max-samples, --max-bytes and --batch-size must be positive")
        if self.long_audio not in ("skip", "truncate"):
            raise AudioLLMError(f"--long-audio must be skip or truncate, got {self.long_audio!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise AudioLLMError(f"--dtype must be float32, float16 or bfloat16, not {self.dtype!r}")


def _feature_extractor(options: PackOptions):
    from transformers import WhisperFeatureExtractor

    from audio_llm.model.encoder import load_feature_extractor

    if options.feature_extractor is not None:
        return load_feature_extractor(options.feature_extractor)
    if options.encoder is not None:
        return load_feature_extractor(options.encoder)
    return WhisperFeatureExtractor(feature_size=options.n_mels)


def _prepare_out_dir(options: PackOptions) -> None:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob(f"{options.prefix}-*.tar")) + sorted(out.glob(INDEX_NAME))
    if old and not options.overwrite:
        raise AudioLLMError(
            f"{out} already holds {old[0].name}"
            + (f" and {len(old) - 1} more" if old[1:] else "")
            + "; pick another --out or pass --overwrite"
        )
    # Drop the old index first: until the new one lands, the folder reads as incomplete.
    (out / INDEX_NAME).unlink(missing_ok=True)
    # Temporary files a killed run left behind (never under a final name, but still litter).
    for pattern in (f".{options.prefix}-*.tar.*.tmp", f".{INDEX_NAME}.*.tmp"):
        for leftover in out.glob(pattern):
            leftover.unlink()


def _remove_stale_shards(options: PackOptions, written: list[dict]) -> None:
    keep = {s["name"] for s in written}
    for path in options.out.glob(f"{options.prefix}-*.tar"):
        ours = re.fullmatch(re.escape(options.prefix) + r"-\d{6}\.tar", path.name)
        if ours and path.name not in keep:
            path.unlink()


def pack(inputs: list[str | Path], options: PackOptions) -> dict:
    """Pack `inputs` into shards under `options.out`; returns the index (also written there).

    With `options.workers > 1` worker processes are spawned, so a script calling this needs the
    usual `if __name__ == "__main__":` guard.
    """
    utterances = read_inputs(inputs, options.fmt, options.allow_pipes)
    if not utterances:
        raise AudioLLMError(f"no utterances found in {', '.join(map(str, inputs))}")
    # Sort by id so output depends on content, not on input order or file-system listing order.
    utterances.sort(key=lambda u: u.id)
    tasks = list(zip(assign_keys(u.id for u in utterances), utterances, strict=True))
    if options.shuffle:
        random.Random(options.seed).shuffle(tasks)

    features = encoder_info = batcher = None
    mel_filters = None
    if options.mode != "audio":
        from audio_llm.audio.features import feature_settings

        extractor = _feature_extractor(options)
        features = feature_settings(extractor)
        mel_filters = np.asarray(extractor.mel_filters, dtype=np.float32)
    if options.mode == "encoder":
        import torch

        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        batcher = EncoderBatcher(
            options.encoder, options.batch_size, device, options.dtype, options.varlen_encoder
        )
        encoder_info = batcher.identity
        if encoder_info["num_mel_bins"] != features["n_mels"]:
            raise AudioLLMError(
                f"feature extractor gives {features['n_mels']} mel bins but {options.encoder} "
                f"expects {encoder_info['num_mel_bins']}; use the encoder's own extractor"
            )
    settings = PackSettings(
        options.mode, options.long_audio, options.min_seconds, mel_filters, options.allow_pipes
    )

    _prepare_out_dir(options)
    report = PackReport(inputs=len(tasks))
    writer = ShardWriter(options.out, options.prefix, options.max_samples, options.max_bytes)
    payload = PAYLOAD_SUFFIX[options.mode]
    progress = tqdm(
        total=len(tasks),
        unit="utt",
        desc="pack",
        file=sys.stderr,
        disable=options.quiet or not sys.stderr.isatty(),
    )
    log = None if options.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))

    def write(sample: Prepared) -> None:
        meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        writer.add(sample.key, [("json", meta), (payload, sample.payload)], sample.meta["duration"])
        report.samples += 1
        report.seconds += sample.meta["duration"]
        report.truncated += sample.truncated

    stream = _prepared_stream(tasks, settings, options.workers)
    try:
        for (_, utt), item in zip(tasks, stream, strict=True):
            progress.update()
            # prepare_sample runs an utterance's command unless its transcript is empty
            ran = utt.command is not None
            if ran and not (isinstance(item, Skipped) and item.reason == "empty_text"):
                report.ran_command(utt, log)
            if isinstance(item, Skipped):
                report.skip(item, log)
            elif batcher is None:
                write(item)
            else:
                for sample in batcher.add(item):
                    write(sample)
        if batcher is not None:
            for sample in batcher.flush():
                write(sample)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        stream.close()  # stops the worker pool, also on errors
        progress.close()

    if report.samples == 0:
        raise AudioLLMError(
            f"no samples written from {len(tasks)} utterances; nothing was written to "
            f"{options.out}.\n{report_summary(report.to_dict())}"
        )
    index = {
        "format": "audio_llm.shards",
        "format_version": FORMAT_VERSION,
        "created_by": f"audio_llm {__version__}",
        "mode": options.mode,
        "payload": payload,
        "sample_rate": SAMPLE_RATE,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": report.samples,
            "seconds": round(sum(s["seconds"] for s in shards), 3),
            "hours": round(report.seconds / 3600, 6),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "features": features,
        "encoder": encoder_info,
        "length_policy": {
            "max_seconds": MAX_SECONDS,
            "long_audio": options.long_audio,
            "min_seconds": options.min_seconds,
        },
        "order": {"sorted_by": "id", "shuffle": options.shuffle, "seed": options.seed},
        "report": report.to_dict(),
    }
    # The index goes last: its presence means every shard it lists is complete.
    text = json.dumps(index, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(options.out / INDEX_NAME, text.encode("utf-8"))
    _remove_stale_shards(options, shards)
    return index


# ----------------------------------------------------------------------------- verify


def load_index(out_dir: str | Path) -> dict:
    """Read and sanity-check `DIR/index.json` written by `pack`."""
    return read_index(Path(out_dir) / INDEX_NAME)


def _check_payload(index: dict, meta: dict, data: bytes, where: str) -> list[str]:
    """Decode one payload and compare its shape with the sample's json and the index."""
    mode = index["mode"]
    if mode == "audio":
        audio = decode_flac(data, where)
        if len(audio) != meta.get("num_samples"):
            return [f"{where}: {len(audio)} samples, json says {meta.get('num_samples')}"]
        return []
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.float16 or array.ndim != 2:
        return [f"{where}: expected a 2-D float16 array, got {array.dtype} {array.shape}"]
    if mode == "mel":
        expected = (index["features"]["n_mels"], meta.get("frames"))
    else:
        expected = (meta.get("frames"), index["encoder"]["d_model"])
    problems = []
    if array.shape != expected:
        problems.append(f"{where}: shape {array.shape}, expected {expected}")
    if not np.isfinite(array).all():
        problems.append(f"{where}: non-finite values")
    return problems


def _check_shard(index: dict, path: Path, entry: dict, seen: set[str]) -> list[str]:
    payload = PAYLOAD_SUFFIX[index["mode"]]
    problems = []
    if path.stat().st_size != entry.get("bytes"):
        problems.append(
            f"{path.name}: {path.stat().st_size} bytes, index says {entry.get('bytes')}"
        )
    if sha256_file(path) != entry.get("sha256"):
        problems.append(f"{path.name}: sha256 differs from index.json (modified or corrupt)")
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                where = f"{path.name}:{info.name}"
                if not info.isreg():
                    problems.append(f"{where}: not a regular file")
                    continue
                key, dot, suffix = info.name.partition(".")
                if not dot or "/" in info.name:
                    problems.append(f"{where}: not a KEY.EXT member name")
                    continue
                if key not in members:
                    order.append(key)
                if suffix in members[key]:
                    problems.append(f"{where}: duplicate member")
                members[key][suffix] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [*problems, f"{path.name}: unreadable tar ({exc})"]

    seconds = 0.0
    rejected: list[str] = []  # keys whose audio cannot be checked or counted
    for key in order:
        found = members[key]
        where = f"{path.name}:{key}"
        if key in seen:
            problems.append(f"{where}: key also appears in an earlier shard")
        seen.add(key)
        if not {"json", payload} <= set(found):
            problems.append(f"{where}: members {sorted(found)}, expected json + {payload}")
            rejected.append(key)
            continue
        extra = sorted(set(found) - {"json", payload})
        if extra:
            # The loader ignores such members and still trains on the sample: check it as usual.
            problems.append(
                f"{where}: extra members {extra} beside json + {payload} (the loader skips "
                "them; re-pack to drop them)"
            )
        try:
            meta = json.loads(found["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{where}.json: not valid JSON ({exc})")
            rejected.append(key)
            continue
        if not isinstance(meta.get("text"), str) or not meta["text"]:
            problems.append(f"{where}.json: empty or missing text")
        if meta.get("sample_rate") != SAMPLE_RATE:
            problems.append(f"{where}.json: sample_rate {meta.get('sample_rate')!r}")
        seconds += float(meta.get("duration", 0.0))
        try:
            problems += _check_payload(index, meta, found[payload], f"{where}.{payload}")
        except (AudioLLMError, ValueError, OSError) as exc:
            problems.append(f"{where}.{payload}: cannot decode ({exc})")
    if len(order) != entry.get("samples"):
        problems.append(f"{path.name}: {len(order)} samples, index says {entry.get('samples')}")
    if rejected:
        # A seconds mismatch would only restate the rejections above: say what it means instead.
        uncounted = float(entry.get("seconds", 0.0)) - seconds
        problems.append(
            f"{path.name}: {len(rejected)} sample(s) rejected above (missing members or bad "
            f"json: {', '.join(rejected[:3])}{', ...' if len(rejected) > 3 else ''}), so their "
            f"{uncounted:.3f} s of audio (per index.json) are not counted"
        )
    elif not math.isclose(seconds, float(entry.get("seconds", -1)), abs_tol=0.01):
        problems.append(f"{path.name}: {seconds:.3f} s of audio, index says {entry.get('seconds')}")
    return problems


def verify(out_dir: str | Path) -> list[str]:
    """Re-read every shard listed in index.json; returns the problems found (empty if none).

    `.tar` files in the folder that the index does not list are problems too: training never
    reads them, which is rarely what whoever put them there meant.
    """
    out_dir = Path(out_dir)
    index = load_index(out_dir)
    problems: list[str] = []
    seen: set[str] = set()
    for entry in index["shards"]:
        path = out_dir / str(entry.get("name"))
        if not path.is_file():
            problems.append(f"{path.name}: listed in index.json but missing")
            continue
        problems += _check_shard(index, path, entry, seen)
    totals = index.get("totals", {})
    if totals.get("samples") != sum(s.get("samples", 0) for s in index["shards"]):
        problems.append("index.json: totals.samples is not the sum of the shards' samples")
    listed = {str(entry.get("name")) for entry in index["shards"]}
    for path in sorted(out_dir.glob("*.tar")):
        if path.name not in listed:
            problems.append(
                f"{path.name}: in the folder but not in index.json (not used for training; "
                "delete it or re-pack)"
            )
    return problems


# ----------------------------------------------------------------------------- CLI


def parse_size(text: str) -> int:
    """`500M`, `1G`, `1.5GiB`, `100000` -> bytes (K/M/G/T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 1G")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


DESCRIPTION = """\
Build WebDataset tar shards + index.json from NeMo JSONL manifests, LibriSpeech folders or Kaldi
data dirs, or check shards built earlier (--verify).

Each sample is KEY.json (text, duration, sample_rate, source, ...) plus one payload:
  --mode audio    KEY.flac     16 kHz mono 16-bit FLAC; features are computed while training
  --mode mel      KEY.mel.npy  float16 log-mel [n_mels, frames] (needs the feature extractor)
  --mode encoder  KEY.enc.npy  float16 Whisper encoder output [frames, d_model] (needs --encoder)
Audio in any format/rate/channel count soundfile reads is downmixed and resampled to 16 kHz.
Audio longer than 30 s (Whisper's window) is skipped or truncated (--long-audio); every skip is
counted by reason in the report. Output is deterministic: same input and flags, same bytes.
See shards/README.md for the format."""

EPILOG = """\
examples:
  audio-llm pack --input train.jsonl --out shards/train
  audio-llm pack --input LibriSpeech/train-clean-100 --out shards/ls100 --workers 8
  audio-llm pack --input data/train --format kaldi --out shards/mel --mode mel --n-mels 80
  audio-llm pack --input data/train --allow-pipes --out shards/train  # wav.scp has `cmd |`
  audio-llm pack --input train.jsonl --out shards/enc --mode encoder --encoder whisper-small
  audio-llm pack --verify shards/train"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pack",
        help="build WebDataset shards + index.json from manifests/LibriSpeech/Kaldi dirs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_args = p.add_argument_group("input and output")
    io_args.add_argument(
        "--input",
        action="append",
        metavar="PATH",
        help="JSONL manifest, LibriSpeech folder or Kaldi data dir (repeatable)",
    )
    io_args.add_argument(
        "--format",
        dest="fmt",
        choices=("auto", *FORMATS),
        default="auto",
        help="input format (default auto: file -> jsonl, dir with wav.scp -> kaldi, "
        "dir with *.trans.txt -> librispeech)",
    )
    io_args.add_argument(
        "--allow-pipes",
        action="store_true",
        help="Kaldi wav.scp: run piped entries (`sox x.wav -t wav - |`) through /bin/sh and "
        "pack their output; refused by default. The commands are listed in the report. "
        "Ark offsets (`foo.ark:1234`) are read without this flag",
    )
    io_args.add_argument("--out", metavar="DIR", help="output folder for shards and index.json")
    io_args.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    io_args.add_argument(
        "--max-samples",
        type=int,
        default=1000,
        metavar="N",
        help="samples per shard at most (default 1000)",
    )
    io_args.add_argument(
        "--max-bytes",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="start a new shard before one would exceed SIZE, e.g. 500M (default 1G)",
    )
    io_args.add_argument(
        "--overwrite", action="store_true", help="replace shards and index.json already in --out"
    )
    io_args.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of packing: re-read every shard in DIR/index.json, check checksums, "
        "members and payloads; exit 1 on any problem",
    )

    content = p.add_argument_group("payload")
    content.add_argument("--mode", choices=MODES, default="audio", help="payload (default audio)")
    content.add_argument(
        "--encoder",
        type=Path,
        metavar="DIR",
        help="Whisper checkpoint: the encoder for --mode encoder, and its preprocessor_config.json "
        "for the features",
    )
    content.add_argument(
        "--feature-extractor",
        type=Path,
        metavar="DIR",
        help="folder with a WhisperFeatureExtractor preprocessor_config.json (mode mel)",
    )
    content.add_argument(
        "--n-mels",
        type=int,
        choices=(80, 128),
        help="mode mel without files: stock Whisper features with 80 (v1/v2) or 128 (v3) bins",
    )

    policy = p.add_argument_group("length policy")
    policy.add_argument(
        "--long-audio",
        choices=("skip", "truncate"),
        default="skip",
        help="audio over 30 s: skip it, or keep the first 30 s (counted as truncated) "
        "(default skip)",
    )
    policy.add_argument(
        "--min-seconds",
        type=float,
        metavar="SECONDS",
        default=0.1,
        help="skip audio shorter than this (default 0.1)",
    )

    run_args = p.add_argument_group("execution")
    run_args.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=0,
        help="processes decoding/resampling/featurising in parallel (default 0: in this process)",
    )
    run_args.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="encoder batch size, mode encoder (default 16)",
    )
    run_args.add_argument(
        "--device", help="encoder device, mode encoder (default: cuda if available, else cpu)"
    )
    run_args.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="encoder weights dtype, mode encoder (default float32)",
    )
    run_args.add_argument(
        "--varlen-encoder",
        action="store_true",
        help="mode encoder: run Whisper on each clip's own frames instead of the 30 s window "
        "(train with model.varlen_encoder=true; the index records which)",
    )
    run_args.add_argument(
        "--shuffle",
        action="store_true",
        help="shuffle samples across shards (deterministic with --seed); default: sorted by id",
    )
    run_args.add_argument(
        "--seed", type=int, default=0, metavar="S", help="shuffle seed (default 0)"
    )
    run_args.add_argument(
        "--quiet", action="store_true", help="no progress bar and no per-sample skip lines"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.verify:
        if args.input or args.out:
            raise AudioLLMError("--verify DIR checks existing shards; drop --input/--out")
        problems = verify(args.verify)
        for problem in problems:
            print(f"FAIL {problem}")
        if problems:
            print(f"{args.verify}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        totals = load_index(args.verify)["totals"]
        print(
            f"OK {args.verify}: {totals['shards']} shards, {totals['samples']} samples, "
            f"{totals['hours']:.3f} h"
        )
        return 0
    if not args.input or not args.out:
        raise AudioLLMError("pack needs --input PATH (one or more) and --out DIR, or --verify DIR")
    options = PackOptions(
        out=Path(args.out),
        mode=args.mode,
        fmt=args.fmt,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        long_audio=args.long_audio,
        min_seconds=args.min_seconds,
        encoder=args.encoder,
        feature_extractor=args.feature_extractor,
        n_mels=args.n_mels,
        workers=args.workers,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        varlen_encoder=args.varlen_encoder,
        shuffle=args.shuffle,
        seed=args.seed,
        overwrite=args.overwrite,
        quiet=args.quiet,
        allow_pipes=args.allow_pipes,
    )
    index = pack(args.input, options)
    print(report_summary(index["report"]))
    print(f"{index['totals']['shards']} shard(s) + {INDEX_NAME} in {options.out}")
    return 0
