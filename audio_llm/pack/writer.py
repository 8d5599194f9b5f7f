"""`audio-llm pack`: the shard writer, the report and the `pack()` driver (manifests.py reads the
inputs, prepare.py turns each into a sample, verify.py checks the result, cli/pack.py the flags).

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

import io
import json
import os
import random
import re
import sys
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from audio_llm import __version__
from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.data.shards import FORMAT_VERSION, INDEX_NAME
from audio_llm.data.shards import PAYLOADS as PAYLOAD_SUFFIX
from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_bytes, fsync_dir, sha256_file, temp_file
from audio_llm.pack.manifests import Utterance, read_inputs
from audio_llm.pack.prepare import (
    MAX_SECONDS,
    SKIP_REASONS,
    EncoderBatcher,
    PackSettings,
    Prepared,
    Skipped,
    prepared_stream,
)

MODES = tuple(PAYLOAD_SUFFIX)
SKIP_LOG_LIMIT = 10  # skipped samples named per reason before the log only counts them

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


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


# ----------------------------------------------------------------------------- shards


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
        fd, self._tmp = temp_file(self.out_dir, name)
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
        fsync_dir(self.out_dir)
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

    stream = prepared_stream(tasks, settings, options.workers)
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
