"""`audio-llm pack --merge DIR`: index.json from the finished blocks of every part.

The last part to finish runs it too, so a SLURM array or a `torchrun` pack ends with an index
without a separate step; parts that finish together both write the same bytes (atomic renames),
so no lock is needed. One process runs it at its end like any part.
"""

from __future__ import annotations

import json
from pathlib import Path

from audio_llm.data.shards import INDEX_NAME
from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_bytes
from audio_llm.pack.parts import PackState, describe_missing, read_plan
from audio_llm.pack.report import PackReport, report_summary


def build_index(head: dict, shards: list[dict], report: PackReport) -> dict:
    """index.json: the plan's settings around the shards, their totals and the report."""
    index = {key: head[key] for key in ("format", "format_version", "created_by")}
    index |= {key: head[key] for key in ("mode", "payload", "sample_rate")}
    index["shards"] = shards
    index["totals"] = {
        "shards": len(shards),
        "samples": report.samples,
        "seconds": round(sum(s["seconds"] for s in shards), 3),
        "hours": round(report.seconds / 3600, 6),
        "bytes": sum(s["bytes"] for s in shards),
    }
    index |= {key: head[key] for key in ("features", "encoder", "length_policy", "order")}
    index["report"] = report.to_dict()
    return index


def merge(out: str | Path) -> dict:
    """Write `out/index.json` once every block of the plan is packed; returns the index.

    Shards are checked for presence and size only: the parts hashed them as they wrote them and
    `audio-llm pack --verify` re-reads them all.
    """
    out = Path(out)
    plan = read_plan(out)
    if plan is None:
        raise AudioLLMError(
            f"{out}: nothing to merge (no .pack-state/plan.json); pack with `audio-llm pack "
            "--part I/N --out` this folder first"
        )
    state = PackState(out, plan["prefix"])
    missing = state.missing_blocks(plan)
    if missing:
        raise AudioLLMError(describe_missing(out, plan, missing))
    report, shards = PackReport(), []
    for record in state.records(plan):
        for shard in record["shards"]:
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise AudioLLMError(
                    f"{path}: missing or not the size block {record['block']} recorded; rerun "
                    "the part that packs that block (it redoes the block) and merge again"
                )
        shards += record["shards"]
        report.absorb(record["report"])
    if report.samples == 0:
        raise AudioLLMError(
            f"no samples written from {report.inputs} utterances; nothing was written to "
            f"{out}.\n{report_summary(report.to_dict())}"
        )
    index = build_index(plan["index"], shards, report)
    # The index goes last: its presence means every shard it lists is complete.
    text = json.dumps(index, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(out / INDEX_NAME, text.encode("utf-8"))
    state.remove_stale(plan, {s["name"] for s in shards})
    return index
