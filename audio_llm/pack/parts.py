"""Packing in blocks: how `--part I/N` slices the input, the state that makes a pack resumable,
and `--merge`, which turns the finished blocks into index.json.

The sorted (optionally shuffled) input is cut into blocks of `--max-samples` utterances; block b
becomes shard `PREFIX-{b:06d}.tar` (plus `PREFIX-{b:06d}-1.tar`, ... where `--max-bytes` cuts
it). A shard's bytes therefore depend only on its block, never on which process packed it or
on what other blocks skipped, so N parts give the same shards and the same index.json as one
process: one process is simply part 0/1.

State lives in `OUT/.pack-state/`: `plan.json` (what is being packed: a fingerprint of the
inputs and every flag that changes bytes, plus the index's settings) and one
`block-NNNNNN.json` per finished block (its shards with size and sha256, and its part of the
report). A block's record is written after its shards, so a record means the block is done;
resuming keeps a block only if its record matches the plan and every shard's checksum verifies.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from audio_llm.data.shards import INDEX_NAME
from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_bytes, sha256_file

STATE_DIR = ".pack-state"
PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class Part:
    """The `index`-th of `count` disjoint slices of the blocks (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise AudioLLMError(
                f"--part {self.index}/{self.count}: need 0 <= I < N (parts count from 0)"
            )

    @classmethod
    def parse(cls, text: str) -> Part:
        """`"2/8"` -> Part(2, 8)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise AudioLLMError(f"--part {text!r}: expected I/N, e.g. 0/8, or auto")
        return cls(int(match.group(1)), int(match.group(2)))

    def blocks(self, total: int) -> range:
        """This part's blocks: a contiguous run, sizes differing by one at most."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def block_count(inputs: int, max_samples: int) -> int:
    """Blocks of `max_samples` utterances (the last one may be shorter)."""
    return -(-inputs // max_samples)


def shard_name(prefix: str, block: int, piece: int) -> str:
    """Block `block`'s `piece`-th shard; piece 0 keeps the plain name."""
    return f"{prefix}-{block:06d}.tar" if piece == 0 else f"{prefix}-{block:06d}-{piece}.tar"


def _block_of(prefix: str, name: str) -> int | None:
    """The block a shard file or its temporary file belongs to (None: not one of ours)."""
    match = re.fullmatch(
        r"\.?" + re.escape(prefix) + r"-(\d{6,})(?:-\d+)?\.tar(?:\.[^.]+\.tmp)?", name
    )
    return int(match.group(1)) if match else None


def fingerprint(settings: dict, tasks: list) -> str:
    """sha256 of the flags that change bytes and of every (key, utterance) in packing order."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, utt in tasks:
        digest.update(json.dumps([key, vars(utt)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def read_plan(out: Path) -> dict | None:
    """`OUT/.pack-state/plan.json`, or None when there is none (no pack of this kind there)."""
    path = Path(out) / STATE_DIR / PLAN_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AudioLLMError(
            f"{path}: not valid JSON ({exc.msg}); pack again with --overwrite"
        ) from exc


class PackState:
    """The `.pack-state` folder of one `--out`: the plan and the finished blocks' records."""

    def __init__(self, out: Path, prefix: str) -> None:
        self.out, self.prefix = Path(out), prefix
        self.dir = self.out / STATE_DIR

    def _record_path(self, block: int) -> Path:
        return self.dir / f"block-{block:06d}.json"

    def read_plan(self) -> dict | None:
        """The plan, or None when there is none (not a resumable pack)."""
        return read_plan(self.out)

    def claim(self, plan: dict, overwrite: bool) -> None:
        """Make `plan` this folder's plan, refusing to mix it with a different pack.

        Concurrent parts all write the same bytes, so the order they do it in does not matter.
        Shards are listed before the plan is read: a part that writes its plan and then a shard
        in between can never make another part see shards without a plan.
        """
        ours = [p.name for p in self._shard_files()] + [
            n for n in [INDEX_NAME] if (self.out / n).exists()
        ]
        current = self.read_plan()
        if current is not None and current["fingerprint"] == plan["fingerprint"]:
            return
        if (ours or current is not None) and not overwrite:
            what = "a pack of other inputs or flags" if current else f"{sorted(ours)[0]}"
            raise AudioLLMError(
                f"{self.out} already holds {what}; pick another --out or pass --overwrite "
                "(a pack with the same inputs and flags resumes without it)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(plan, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(self.dir / PLAN_NAME, text.encode("utf-8"))

    def _shard_files(self) -> list[Path]:
        if not self.out.is_dir():
            return []
        return [p for p in self.out.iterdir() if _block_of(self.prefix, p.name) is not None]

    def kept_record(self, block: int, plan: dict) -> dict | None:
        """Block `block`'s record if it is of this plan and its shards verify, else None."""
        path = self._record_path(block)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if record.get("fingerprint") != plan["fingerprint"]:
            return None
        for shard in record["shards"]:
            shard_path = self.out / shard["name"]
            if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
                return None
            if sha256_file(shard_path) != shard["sha256"]:
                return None
        return record

    def clear_blocks(self, blocks: list[int]) -> None:
        """Forget `blocks` before redoing them: the record first (so a crash here leaves the
        block unfinished, never finished with missing shards), then shards and temporary files
        of those blocks only, since other parts may be writing theirs right now."""
        wanted = set(blocks)
        for block in blocks:
            self._record_path(block).unlink(missing_ok=True)
        for path in self._shard_files():
            if _block_of(self.prefix, path.name) in wanted:
                path.unlink(missing_ok=True)

    def write_record(self, block: int, plan: dict, shards: list[dict], report: dict) -> None:
        """Mark `block` finished (after its shards are in place)."""
        record = {"fingerprint": plan["fingerprint"], "block": block, "shards": shards}
        record["report"] = report
        text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
        atomic_write_bytes(self._record_path(block), text.encode("utf-8"))

    def missing_blocks(self, plan: dict) -> list[int]:
        """Blocks of the plan without a record of this plan (cheap: no checksums)."""
        missing = []
        for block in range(plan["blocks"]):
            try:
                record = json.loads(self._record_path(block).read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):
                missing.append(block)
                continue
            if record.get("fingerprint") != plan["fingerprint"]:
                missing.append(block)
        return missing

    def records(self, plan: dict) -> list[dict]:
        """Every block's record, in block order (call after `missing_blocks` found none)."""
        return [
            json.loads(self._record_path(b).read_text(encoding="utf-8"))
            for b in range(plan["blocks"])
        ]

    def remove_stale(self, plan: dict, keep: set[str]) -> None:
        """After the index is written (every block done): shards of ours it does not list,
        temporary shard files a killed run left, and records of blocks beyond the plan (left by
        an earlier, larger pack). Not temporary index files: a merge running beside this one
        (two parts finishing together) may be writing one now."""
        for path in self._shard_files():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        for path in self.dir.glob("block-*.json"):
            if int(path.stem.partition("-")[2]) >= plan["blocks"]:
                path.unlink(missing_ok=True)


def describe_missing(out: Path, plan: dict, missing: list[int]) -> str:
    """Why `--merge` cannot write the index yet, and what to run."""
    shown = ", ".join(str(b) for b in missing[:10]) + (", ..." if len(missing) > 10 else "")
    return (
        f"{out}: {len(missing)} of {plan['blocks']} blocks not packed yet ({shown}); part I of "
        f"N packs blocks I*{plan['blocks']}//N to (I+1)*{plan['blocks']}//N - 1: run (or rerun) "
        f"the parts that own them with the same flags, then `audio-llm pack --merge {out}`"
    )
