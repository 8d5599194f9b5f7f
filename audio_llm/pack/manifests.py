"""Reading the inputs of `audio-llm pack` into `Utterance` records: NeMo-style JSONL manifests,
LibriSpeech folders and Kaldi data dirs (`wav.scp` files, ark offsets, piped commands).

Nothing is decoded here: a record names where the audio is and what its transcript says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from audio_llm.errors import AudioLLMError

FORMATS = ("jsonl", "librispeech", "kaldi")


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
