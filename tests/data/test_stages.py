"""data.stages: bad shards and members are skipped and counted (never unpickled), over-long
samples refused."""

import io
import json
import pickle
import tarfile
from pathlib import Path

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of


def _add_members(src: Path, dst: Path, extra: list[tuple[str, bytes]]) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            tout.addfile(member, tin.extractfile(member))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_truncated_shard_and_pickle_member_are_skipped_counted_never_run(
    shard_dirs, model, tmp_path
):
    folder = tmp_path / "bad"
    folder.mkdir()
    index = json.loads((shard_dirs["mel"] / "index.json").read_text())
    for entry in index["shards"]:
        (folder / entry["name"]).write_bytes((shard_dirs["mel"] / entry["name"]).read_bytes())
    (folder / "index.json").write_text(json.dumps(index))
    names = [e["name"] for e in index["shards"]]
    data = (folder / names[0]).read_bytes()
    (folder / names[0]).write_bytes(data[: len(data) // 2])  # truncated mid-sample
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Boom(str(marker)))
    with tarfile.open(folder / names[1]) as tar:
        first_key = tar.getnames()[0].split(".")[0]
    _add_members(folder / names[1], tmp_path / "tmp.tar", [(f"{first_key}x.pyd", evil)])
    (tmp_path / "tmp.tar").replace(folder / names[1])

    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=4)
    loader = build_loader(cfg, layout_of(model), spec=str(folder))
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    assert len(batches) == loader.batches_per_epoch
    assert loader.problems["corrupt_shard"] >= 1
    assert loader.problems["ignored_member"] >= 1
    assert not marker.exists()
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) + loader.problems["repeated_to_fill_quota"]


def test_over_long_samples_are_refused_and_counted(shard_dirs, model):
    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=1, max_length=140)
    loader = build_loader(cfg, layout_of(model), spec=str(shard_dirs["encoder"]))
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    assert all(b["input_ids"].shape[1] <= 140 for b in batches)
    assert loader.problems["over_max_length"] > 0
