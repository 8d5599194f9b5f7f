"""`audio-llm pack --verify DIR`: re-read every shard an index.json lists and check checksums,
sizes, member names, sample json and payload shapes; list every problem rather than stop at one.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.audio.io import decode_flac
from audio_llm.data.shards import INDEX_NAME, read_index
from audio_llm.data.shards import PAYLOADS as PAYLOAD_SUFFIX
from audio_llm.errors import AudioLLMError
from audio_llm.files import sha256_file


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
