"""`audio-llm pack`: the shard writer and the `pack()` driver (manifests.py reads the inputs,
prepare.py turns each into a sample, parts.py cuts the input into blocks and keeps the resume
state, merge.py writes index.json, verify.py checks the result, cli/pack.py has the flags).

One sample is `KEY.json` plus exactly one payload: `KEY.flac` (mode audio), `KEY.mel.npy`
(mode mel) or `KEY.enc.npy` (mode encoder). The format is described for users in shards/README.md.

Invariants this module keeps:
- Deterministic: samples are sorted by id (optionally shuffled with a seed), cut into blocks of
  --max-samples (block b -> shard b, see parts.py) and tar headers carry no time or owner, so the
  same input and options give byte-identical shards and checksums, in one process or in N parts.
- Atomic: every shard and the index are written under a temporary name and `os.replace`d; the index
  comes last, so a folder with an index.json is complete and a crash never leaves a half shard under
  a final name. A block's record (parts.py) comes after its shards, so a resumed pack knows which
  blocks are done.
- Counted: every input utterance is either written, truncated-and-written, or skipped for a named
  reason; the report is printed and stored in index.json.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audio_llm import __version__
from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.data.shards import FORMAT_VERSION, INDEX_NAME
from audio_llm.data.shards import PAYLOADS as PAYLOAD_SUFFIX
from audio_llm.errors import AudioLLMError
from audio_llm.files import fsync_dir, sha256_file, temp_file
from audio_llm.pack.manifests import Utterance, read_inputs
from audio_llm.pack.merge import merge
from audio_llm.pack.parts import PackState, Part, block_count, fingerprint, shard_name
from audio_llm.pack.prepare import (
    MAX_SECONDS,
    EncoderBatcher,
    PackSettings,
    Prepared,
    Skipped,
    prepared_stream,
)
from audio_llm.pack.progress import PackProgress
from audio_llm.pack.report import SKIP_LOG_LIMIT, PackReport, report_summary

MODES = tuple(PAYLOAD_SUFFIX)
__all__ = ["MODES", "PackOptions", "assign_keys", "pack", "pack_part", "report_summary"]

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
    """Writes one block's samples into `PREFIX-{block:06d}.tar`, rolling over to
    `PREFIX-{block:06d}-1.tar`, ... before a shard would exceed max samples / max bytes.

    Each shard is built under a temporary name and renamed only when complete; tar headers have
    fixed mtime/owner/mode so the bytes depend only on the samples.
    """

    def __init__(
        self, out_dir: Path, prefix: str, block: int, max_samples: int, max_bytes: int
    ) -> None:
        self.out_dir, self.prefix, self.block = out_dir, prefix, block
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
        name = shard_name(self.prefix, self.block, len(self.shards))
        fd, self._tmp = temp_file(self.out_dir, name)
        self._file = os.fdopen(fd, "wb")
        # Closed in _finish/abort: the archive spans many add() calls, so no `with` block.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT
        )
        self._samples, self._seconds = 0, 0.0

    def _finish(self) -> None:
        name = shard_name(self.prefix, self.block, len(self.shards))
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
    part: Part = field(default_factory=Part)  # which blocks this process packs (--part I/N)

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


def read_tasks(inputs: list[str | Path], options: PackOptions) -> list[tuple[str, Utterance]]:
    """(key, utterance) of every input in packing order: sorted by id, then shuffled if asked."""
    utterances = read_inputs(inputs, options.fmt, options.allow_pipes)
    if not utterances:
        raise AudioLLMError(f"no utterances found in {', '.join(map(str, inputs))}")
    # Sort by id so output depends on content, not on input order or file-system listing order.
    utterances.sort(key=lambda u: u.id)
    tasks = list(zip(assign_keys(u.id for u in utterances), utterances, strict=True))
    if options.shuffle:
        random.Random(options.seed).shuffle(tasks)
    return tasks


@dataclass
class PayloadSetup:
    """How samples become payloads: the worker settings, the features and the encoder."""

    settings: PackSettings
    features: dict | None = None
    batcher: EncoderBatcher | None = None
    encoder_info: dict | None = None


def payload_setup(options: PackOptions) -> PayloadSetup:
    """Load the feature extractor (modes mel, encoder) and the encoder (mode encoder)."""
    features = batcher = encoder_info = mel_filters = None
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
        # the identity the trainer checks, plus what the encoder computed in (for the record:
        # a run may train in another dtype than its shards were packed in)
        encoder_info = {**batcher.identity, "dtype": options.dtype}
        if encoder_info["num_mel_bins"] != features["n_mels"]:
            raise AudioLLMError(
                f"feature extractor gives {features['n_mels']} mel bins but {options.encoder} "
                f"expects {encoder_info['num_mel_bins']}; use the encoder's own extractor"
            )
    settings = PackSettings(
        options.mode, options.long_audio, options.min_seconds, mel_filters, options.allow_pipes
    )
    return PayloadSetup(settings, features, batcher, encoder_info)


def make_plan(options: PackOptions, tasks: list, setup: PayloadSetup) -> dict:
    """What this pack is (parts.py): the index's settings and a fingerprint of everything that
    changes a byte of output. Not the part or the worker count: those never change bytes, so
    a pack may resume with other ones."""
    head = {
        "format": "audio_llm.shards",
        "format_version": FORMAT_VERSION,
        "created_by": f"audio_llm {__version__}",
        "mode": options.mode,
        "payload": PAYLOAD_SUFFIX[options.mode],
        "sample_rate": SAMPLE_RATE,
        "features": setup.features,
        "encoder": setup.encoder_info,
        "length_policy": {
            "max_seconds": MAX_SECONDS,
            "long_audio": options.long_audio,
            "min_seconds": options.min_seconds,
        },
        "order": {"sorted_by": "id", "shuffle": options.shuffle, "seed": options.seed},
    }
    settings = {"index": head, "prefix": options.prefix, "max_samples": options.max_samples}
    settings["max_bytes"] = options.max_bytes
    if options.mode == "encoder":  # a batch's padding can change the last bits of its outputs
        settings |= {"batch_size": options.batch_size, "dtype": options.dtype}
    return {
        "fingerprint": fingerprint(settings, tasks),
        "blocks": block_count(len(tasks), options.max_samples),
        "inputs": len(tasks),
        "prefix": options.prefix,
        "max_samples": options.max_samples,
        "index": head,
    }


@dataclass
class PartResult:
    """What `pack_part` did: blocks kept from an earlier run and packed now; the index when
    this part completed the pack (it was alone or the last to finish), else None."""

    part: Part
    blocks: range
    kept: list[int]
    packed: list[int]
    samples: int
    index: dict | None


@dataclass
class _Job:
    options: PackOptions
    tasks: list[tuple[str, Utterance]]
    setup: PayloadSetup
    plan: dict
    state: PackState
    log: Callable[[str], None] | None

    def block_tasks(self, block: int) -> list[tuple[str, Utterance]]:
        size = self.options.max_samples
        return self.tasks[block * size : (block + 1) * size]


class _BlockPacker:
    """One block: its shards, then its record (after the shards, so a record means done)."""

    def __init__(self, job: _Job, block: int) -> None:
        options = job.options
        self.job, self.block = job, block
        self.writer = ShardWriter(
            options.out, options.prefix, block, options.max_samples, options.max_bytes
        )
        self.report = PackReport()
        self.payload = PAYLOAD_SUFFIX[options.mode]

    def add(self, utt: Utterance, item: Prepared | Skipped) -> None:
        report, batcher = self.report, self.job.setup.batcher
        report.inputs += 1
        # prepare_sample runs an utterance's command unless its transcript is empty
        ran = utt.command is not None
        if ran and not (isinstance(item, Skipped) and item.reason == "empty_text"):
            report.ran_command(utt, self.job.log)
        if isinstance(item, Skipped):
            report.skip(item, self.job.log)
        elif batcher is None:
            self._write(item)
        else:
            for sample in batcher.add(item):
                self._write(sample)

    def _write(self, sample: Prepared) -> None:
        meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        members = [("json", meta), (self.payload, sample.payload)]
        self.writer.add(sample.key, members, sample.meta["duration"])
        self.report.samples += 1
        self.report.seconds += sample.meta["duration"]
        self.report.truncated += sample.truncated

    def finish(self) -> int:
        """Close the block's last shard and record it; returns the samples written."""
        # Encoder batches end with the block, so a shard's bytes never depend on its neighbours.
        if self.job.setup.batcher is not None:
            for sample in self.job.setup.batcher.flush():
                self._write(sample)
        shards = self.writer.close()
        self.job.state.write_record(self.block, self.job.plan, shards, self.report.to_state())
        return self.report.samples

    def abort(self) -> None:
        self.writer.abort()


def _pack_blocks(job: _Job, blocks: list[int], progress: PackProgress) -> int:
    """Pack `blocks` through one worker pool; returns the samples written."""
    work = [(block, task) for block in blocks for task in job.block_tasks(block)]
    stream = prepared_stream([task for _, task in work], job.setup.settings, job.options.workers)
    current: _BlockPacker | None = None
    samples = 0
    try:
        for at, ((block, (_, utt)), item) in enumerate(zip(work, stream, strict=True)):
            current = current or _BlockPacker(job, block)
            current.add(utt, item)
            progress.update()
            # Finish a block at its last input, not when the next one arrives: a fault while
            # preparing the next block must not cost this one.
            if at + 1 == len(work) or work[at + 1][0] != block:
                samples += current.finish()
                current = None
    except BaseException:
        if current is not None:
            current.abort()
        raise
    finally:
        stream.close()  # stops the worker pool, also on errors
    return samples


def _skip_log(progress: PackProgress, quiet: bool) -> Callable[[str], None] | None:
    """Skip and command lines, SKIP_LOG_LIMIT per kind for the whole part (a block's report
    limits its own examples, but a part has many blocks)."""
    if quiet:
        return None
    shown: dict[str, int] = {}

    def log(message: str) -> None:
        kind = message.partition(")")[0]
        shown[kind] = shown.get(kind, 0) + 1
        if shown[kind] <= SKIP_LOG_LIMIT:
            progress.write(message)

    return log


def pack_part(inputs: list[str | Path], options: PackOptions) -> PartResult:
    """Pack the blocks of `options.part` into `options.out`, keeping blocks an interrupted run
    finished; writes index.json when no block of any part is left (see parts.py, merge.py).

    With `options.workers > 1` worker processes are spawned, so a script calling this needs the
    usual `if __name__ == "__main__":` guard.
    """
    tasks = read_tasks(inputs, options)
    setup = payload_setup(options)
    plan = make_plan(options, tasks, setup)
    options.out.mkdir(parents=True, exist_ok=True)
    state = PackState(options.out, options.prefix)
    state.claim(plan, options.overwrite)
    blocks = options.part.blocks(plan["blocks"])
    kept = [] if options.overwrite else [b for b in blocks if state.kept_record(b, plan)]
    todo = [b for b in blocks if b not in kept]
    size = options.max_samples
    clips = [min(size, len(tasks) - b * size) for b in blocks]  # inputs per block
    done = sum(n for b, n in zip(blocks, clips, strict=True) if b in kept)
    label = "pack" if options.part.count == 1 else f"pack part {options.part}"
    progress = PackProgress(sum(clips), done, label, options.quiet)
    if options.part.count == 1:  # alone: no other part can be merging right now
        for leftover in options.out.glob(f".{INDEX_NAME}.*.tmp"):
            leftover.unlink()
    samples = 0
    try:
        if todo:
            (options.out / INDEX_NAME).unlink(missing_ok=True)  # incomplete until the merge
            state.clear_blocks(todo)
            job = _Job(options, tasks, setup, plan, state, _skip_log(progress, options.quiet))
            samples = _pack_blocks(job, todo, progress)
    finally:
        progress.close()
    index = None if state.missing_blocks(plan) else merge(options.out)
    return PartResult(options.part, blocks, kept, todo, samples, index)


def pack(inputs: list[str | Path], options: PackOptions) -> dict:
    """Pack all of `inputs` into shards under `options.out` in this process (part 0/1 unless
    `options.part` says otherwise); returns the index (also written there)."""
    result = pack_part(inputs, options)
    if result.index is None:
        raise AudioLLMError(
            f"part {options.part} of {options.out} is packed, other parts are not yet; "
            f"`audio-llm pack --merge {options.out}` writes the index once they are"
        )
    return result.index
