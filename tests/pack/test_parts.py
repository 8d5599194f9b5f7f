"""`audio-llm pack --part I/N` and `--merge`: parts give one process's shards and index byte for
byte; an interrupted pack resumes, keeping (not rewriting) the blocks it finished."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_llm.cli import main
from audio_llm.cli.pack import part_from_env
from audio_llm.errors import AudioLLMError
from audio_llm.pack import prepare as prepare_module
from audio_llm.pack.merge import merge
from audio_llm.pack.parts import STATE_DIR, Part
from audio_llm.pack.verify import verify
from audio_llm.pack.writer import PackOptions, pack, pack_part

N_CLIPS = 11  # + 1 missing file: 12 inputs, 4 blocks of 3


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Clips of different lengths and one missing file (a skip inside block 1)."""
    root = tmp_path_factory.mktemp("parts")
    rows = []
    rng = np.random.default_rng(0)
    for i in range(N_CLIPS):
        seconds = 0.3 + 0.1 * (i % 4)
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(root / f"c{i:02d}.wav", audio.astype(np.float32), 16000)
        rows.append({"audio_filepath": f"c{i:02d}.wav", "text": f"clip {i}", "id": f"u{i:02d}"})
    rows.append({"audio_filepath": "gone.wav", "text": "missing", "id": "u04a"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _output(out: Path) -> dict[str, bytes]:
    """What a reader sees: index.json and every shard, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _pack_in_parts(manifest: Path, out: Path, count: int, **flags) -> list:
    results = []
    for index in range(count):
        options = PackOptions(out=out, part=Part(index, count), quiet=True, **flags)
        results.append(pack_part([manifest], options))
    return results


@pytest.mark.parametrize("flags", [{}, {"shuffle": True, "seed": 3}], ids=["sorted", "shuffled"])
def test_three_parts_equal_one_process_byte_for_byte(manifest, tmp_path, flags):
    single = pack([manifest], PackOptions(out=tmp_path / "one", max_samples=3, quiet=True, **flags))
    results = _pack_in_parts(manifest, tmp_path / "parts", 3, max_samples=3, **flags)
    assert [list(r.blocks) for r in results] == [[0], [1], [2, 3]]
    # only the last part to finish writes the index
    assert [r.index is None for r in results] == [True, True, False]
    assert results[-1].index == single
    assert _output(tmp_path / "parts") == _output(tmp_path / "one")
    assert single["totals"]["shards"] == 4 and single["report"]["skipped"]["missing_file"] == 1
    assert verify(tmp_path / "parts") == []


def test_encoder_mode_parts_equal_one_process(manifest, tmp_path, tiny_models):
    flags = {"mode": "encoder", "encoder": tiny_models["whisper"], "batch_size": 2}
    single = pack([manifest], PackOptions(out=tmp_path / "one", max_samples=3, quiet=True, **flags))
    _pack_in_parts(manifest, tmp_path / "parts", 3, max_samples=3, **flags)
    assert _output(tmp_path / "parts") == _output(tmp_path / "one")
    assert single["totals"]["samples"] == N_CLIPS and verify(tmp_path / "parts") == []


def test_max_bytes_cuts_blocks_into_numbered_pieces_the_same_in_parts(manifest, tmp_path):
    one_each = pack([manifest], PackOptions(out=tmp_path / "1", max_samples=1, quiet=True))
    max_bytes = 2 * max(s["bytes"] for s in one_each["shards"])  # 2 clips a shard at least
    flags = {"max_samples": 4, "max_bytes": max_bytes}
    single = pack([manifest], PackOptions(out=tmp_path / "one", quiet=True, **flags))
    _pack_in_parts(manifest, tmp_path / "parts", 3, **flags)
    assert _output(tmp_path / "parts") == _output(tmp_path / "one")
    names = [s["name"] for s in single["shards"]]
    assert "shard-000000.tar" in names and "shard-000000-1.tar" in names
    assert all(s["bytes"] <= max_bytes for s in single["shards"])
    assert sum(s["samples"] for s in single["shards"]) == N_CLIPS


def test_merge_names_the_missing_blocks_then_writes_the_same_index(manifest, tmp_path, capsys):
    out = tmp_path / "parts"
    for index in (0, 2):
        pack_part([manifest], PackOptions(out=out, max_samples=3, part=Part(index, 3), quiet=True))
    assert not (out / "index.json").exists()
    with pytest.raises(AudioLLMError, match=r"1 of 4 blocks not packed yet \(1\)"):
        merge(out)
    args = ["pack", "--input", str(manifest), "--out", str(out), "--max-samples", "3"]
    assert main([*args, "--part", "1/3", "--quiet"]) == 0
    assert "part 1/3: blocks 1-1, 1 packed now" in capsys.readouterr().out
    written = (out / "index.json").read_bytes()
    assert main(["pack", "--merge", str(out)]) == 0
    assert (out / "index.json").read_bytes() == written
    single = pack([manifest], PackOptions(out=tmp_path / "one", max_samples=3, quiet=True))
    assert json.loads(written) == single


def test_parts_with_other_flags_are_refused(manifest, tmp_path):
    out = tmp_path / "out"
    pack_part([manifest], PackOptions(out=out, max_samples=3, part=Part(0, 2), quiet=True))
    with pytest.raises(AudioLLMError, match="other inputs or flags.*--overwrite"):
        pack_part([manifest], PackOptions(out=out, max_samples=4, part=Part(1, 2), quiet=True))


def test_more_parts_than_blocks_leaves_some_idle(manifest, tmp_path):
    results = _pack_in_parts(manifest, tmp_path / "out", 6, max_samples=3)
    assert [len(r.blocks) for r in results] == [0, 1, 1, 0, 1, 1]
    assert results[-1].index["totals"]["samples"] == N_CLIPS


# ----------------------------------------------------------------------------- resume


def _counting_encoder(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count FLAC encodes (one per written sample); raise at call `fail_at` (1-based)."""
    calls = []
    real = prepare_module.encode_flac

    def encode(audio):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("node lost")
        return real(audio)

    monkeypatch.setattr(prepare_module, "encode_flac", encode)
    return calls


def test_interrupted_pack_resumes_keeping_finished_shards(manifest, tmp_path, monkeypatch):
    reference = pack([manifest], PackOptions(out=tmp_path / "ref", max_samples=3, quiet=True))
    out = tmp_path / "out"
    _counting_encoder(monkeypatch, fail_at=6)  # block 2's first clip: blocks 0 and 1 are done
    with pytest.raises(RuntimeError, match="node lost"):
        pack([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (out / "index.json").exists()
    # as a kill -9 would leave them: a half-written shard of block 2, a stale one of block 3
    (out / ".shard-000002.tar.k1ll3d.tmp").write_bytes(b"half a shard")
    (out / "shard-000003.tar").write_bytes(b"finished by nobody: no record")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    calls = _counting_encoder(monkeypatch)
    index = pack([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    assert len(calls) == N_CLIPS - 5  # blocks 2 and 3 only (block 1 also skipped one input)
    for name in ("shard-000000.tar", "shard-000001.tar"):  # kept: same file, untouched
        assert (out / name).stat().st_ino == before[name][0]
        assert (out / name).stat().st_mtime_ns == before[name][1]
    assert index == reference
    assert _output(out) == _output(tmp_path / "ref")
    assert not list(out.glob(".*.tmp")) and verify(out) == []


def test_resume_redoes_a_block_whose_shard_no_longer_verifies(manifest, tmp_path, monkeypatch):
    out = tmp_path / "out"
    reference = pack([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    shard = out / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    calls = _counting_encoder(monkeypatch)
    assert pack([manifest], PackOptions(out=out, max_samples=3, quiet=True)) == reference
    assert len(calls) == 3  # block 2 alone
    assert verify(out) == []


def test_overwrite_redoes_everything(manifest, tmp_path, monkeypatch):
    out = tmp_path / "out"
    pack([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    calls = _counting_encoder(monkeypatch)
    pack([manifest], PackOptions(out=out, max_samples=3, overwrite=True, quiet=True))
    assert len(calls) == N_CLIPS


def test_state_lives_in_one_hidden_folder(manifest, tmp_path):
    out = tmp_path / "out"
    pack([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [STATE_DIR]
    records = sorted(p.name for p in (out / STATE_DIR).iterdir())
    assert records == [f"block-00000{b}.json" for b in range(4)] + ["plan.json"]


# ----------------------------------------------------------------------------- --part auto


@pytest.mark.parametrize(
    ("environ", "part", "local_rank"),
    [
        ({}, Part(0, 1), None),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, Part(3, 8), 3),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16"}, Part(5, 16), None),
        (  # array ids 10, 12, 14: task 12 is the second of three
            {
                "SLURM_ARRAY_TASK_ID": "12",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            Part(1, 3),
            None,
        ),
        (  # an array of 4 nodes, each running 8 ranks
            {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
            | {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"},
            Part(21, 32),
            5,
        ),
    ],
)
def test_part_auto_reads_the_launcher_and_slurm(environ, part, local_rank):
    assert part_from_env(environ) == (part, local_rank)


def test_part_flag_is_checked():
    assert Part.parse(" 2 / 8 ") == Part(2, 8)
    with pytest.raises(AudioLLMError, match="0 <= I < N"):
        Part.parse("8/8")
    with pytest.raises(AudioLLMError, match="expected I/N"):
        Part.parse("half")


def test_a_block_with_every_input_skipped_leaves_a_gap_in_the_names(manifest, tmp_path):
    """Readers go by index.json, so a gap in shard numbers (a block whose inputs were all
    skipped) costs nothing."""
    out = tmp_path / "out"
    index = pack([manifest], PackOptions(out=out, max_samples=1, quiet=True))
    names = [s["name"] for s in index["shards"]]
    assert len(names) == N_CLIPS and "shard-000005.tar" not in names  # u04a: missing file
    assert "shard-000006.tar" in names and verify(out) == []


def test_parts_left_unfinished_can_be_finished_by_one_process(manifest, tmp_path, monkeypatch):
    """The part count is not part of the plan: one process completes what parts began."""
    out = tmp_path / "out"
    for index in (0, 2):
        pack_part([manifest], PackOptions(out=out, max_samples=3, part=Part(index, 3), quiet=True))
    calls = _counting_encoder(monkeypatch)
    result = pack_part([manifest], PackOptions(out=out, max_samples=3, quiet=True))
    assert (result.kept, result.packed) == ([0, 2, 3], [1])
    assert len(calls) == 2  # block 1: u03, u04 (u04a is missing)
    single = pack([manifest], PackOptions(out=tmp_path / "one", max_samples=3, quiet=True))
    assert result.index == single and _output(out) == _output(tmp_path / "one")
