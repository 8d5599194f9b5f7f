"""The streaming pipeline: equal batches per rank, exact resume, bad shards, all three modes."""

import io
import json
import pickle
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio_llm.config import DataConfig
from audio_llm.data import ShardSet, build_loader, layout_of, plan_epoch
from audio_llm.data.shards import ShardInfo
from audio_llm.demo.tiny import vocabulary
from audio_llm.errors import AudioLLMError
from audio_llm.model.build import build_audio_llm
from audio_llm.model.prompts import IGNORE_INDEX
from audio_llm.pack.writer import PackOptions, pack

N_CLIPS = 40


def _corpus(folder: Path) -> Path:
    """N_CLIPS tone clips of 0.5-3 s with short word transcripts, as a JSONL manifest."""
    rng = random.Random(0)
    words = vocabulary()
    lines = []
    for i in range(N_CLIPS):
        seconds = rng.uniform(0.5, 3.0)
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) * np.hanning(len(t))
        sf.write(folder / f"clip{i:02d}.wav", audio.astype(np.float32), 16000)
        text = " ".join(rng.choices(words, k=rng.randint(2, 6)))
        lines.append(
            json.dumps({"audio_filepath": f"clip{i:02d}.wav", "text": text, "id": f"u{i:02d}"})
        )
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("data")
    manifest = _corpus(root)
    dirs = {}
    for mode in ("audio", "mel", "encoder"):
        options = PackOptions(
            out=root / mode,
            mode=mode,
            max_samples=5,
            encoder=tiny_models["whisper"] if mode != "audio" else None,
            quiet=True,
        )
        pack([manifest], options)
        dirs[mode] = root / mode
    return dirs


@pytest.fixture(scope="module")
def model(model_config):
    return build_audio_llm(model_config)


def _keys_per_rank(shard_dir, model, world, workers, batch_size=3):
    cfg = DataConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=8)
    out = {}
    for rank in range(world):
        loader = build_loader(
            cfg, layout_of(model), spec=str(shard_dir), rank=rank, world_size=world
        )
        per_epoch = loader.batches_per_epoch
        batches = [b for _, b in zip(range(per_epoch), loader, strict=False)]
        assert loader.epoch == 0 and sum(loader.consumed) == per_epoch
        out[rank] = (batches, loader)
    return out


def test_two_ranks_two_workers_disjoint_equal_and_complete(shard_dirs, model, caplog):
    runs = _keys_per_rank(shard_dirs["audio"], model, world=2, workers=2)
    plan = runs[0][1].stream.plan(0)
    keys = {r: [k for b in batches for k in b["keys"]] for r, (batches, _) in runs.items()}
    assert len(runs[0][0]) == len(runs[1][0]) == plan.batches_per_rank
    assert not set(keys[0]) & set(keys[1])
    for r in (0, 1):
        assert len(keys[r]) == len(set(keys[r]))  # no repeats within a rank
    dropped = sum(plan.dropped.values())
    assert len(keys[0]) + len(keys[1]) + dropped == N_CLIPS
    assert dropped < 2 * 2 * 3  # at most a partial batch per worker


def test_epochs_reshuffle_and_are_reproducible(shard_dirs, model):
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=8)
    first = build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))
    n = first.batches_per_epoch
    stream = iter(first)
    epoch0 = [k for _ in range(n) for k in next(stream)["keys"]]
    epoch1 = [k for _ in range(n) for k in next(stream)["keys"]]
    assert first.epoch == 1 and epoch0 != epoch1
    again = iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"])))
    assert [k for _ in range(n) for k in next(again)["keys"]] == epoch0


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from audio_llm.config import DataConfig, ModelConfig
    from audio_llm.data import build_loader, layout_of
    from audio_llm.model.build import build_audio_llm
    args = json.loads(sys.argv[1])
    model = build_audio_llm(ModelConfig(**args["model"]))
    cfg = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=8)
    loader = build_loader(cfg, layout_of(model), spec=args["shards"])
    loader.load_state_dict(args["state"])
    left = loader.batches_per_epoch - sum(args["state"]["consumed"])
    it = iter(loader)
    print(json.dumps([k for _ in range(left) for k in next(it)["keys"]]))
    """
)


def test_resume_in_a_new_process_continues_with_the_unseen_samples(shard_dirs, model, model_config):
    cfg = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=8)
    full = build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    n = full.batches_per_epoch
    whole = iter(full)
    reference = [k for _ in range(n) for k in next(whole)["keys"]]

    partial = build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    it = iter(partial)
    seen = [k for _ in range(5) for k in next(it)["keys"]]
    state = json.loads(json.dumps(partial.state_dict()))  # as a checkpoint stores it
    args = {"model": vars(model_config), "shards": str(shard_dirs["audio"]), "state": state}
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(reference)
    assert len(seen + rest) == len(reference)


def test_plan_refuses_too_few_shards_and_balances_quotas():
    shards = [ShardInfo(f"s{i}.tar", f"s{i}.tar", 10 + i, 1.0) for i in range(3)]
    with pytest.raises(AudioLLMError, match="3 shard.* for 2 rank.* x 2 loader worker"):
        plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=0, epoch=0)
    shards = [
        ShardInfo(f"s{i}.tar", f"s{i}.tar", n, 1.0) for i, n in enumerate([9, 2, 7, 30, 5, 4])
    ]
    plan = plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=3, epoch=1)
    for r in (0, 1):
        assert sum(plan.quotas[(r, w)] for w in (0, 1)) == plan.batches_per_rank
        for w in (0, 1):
            have = sum(s.samples for s in plan.assignments[(r, w)])
            assert plan.quotas[(r, w)] * 2 <= have
    assert plan == plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=3, epoch=1)


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


def test_mel_shards_match_live_features(shard_dirs, model):
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=1)
    live = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))))
    mel = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))))
    assert live["keys"] == mel["keys"]
    assert torch.equal(live["feature_lengths"], mel["feature_lengths"])
    assert mel["input_features"].dtype == torch.float16  # as stored; the encoder casts it
    for row, n in enumerate(live["feature_lengths"].tolist()):
        torch.testing.assert_close(
            mel["input_features"][row, :, :n].float(),
            live["input_features"][row, :, :n],
            atol=5e-3,
            rtol=0,
        )
    assert torch.equal(live["input_ids"], mel["input_ids"])


def test_every_mode_trains_the_model(shard_dirs, model):
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4)
    losses = {}
    for mode, folder in shard_dirs.items():
        batch = next(iter(build_loader(cfg, layout_of(model), spec=str(folder))))
        stats = batch.pop("stats")
        assert stats["samples"] == 3 and stats["target_tokens"] > 0
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert (batch["labels"] != IGNORE_INDEX).sum() == stats["target_tokens"]
        losses[mode] = model(**batch).loss.item()
    assert all(np.isfinite(v) for v in losses.values())
    # the three modes carry the same audio, so the loss agrees up to float16 storage
    assert losses["encoder"] == pytest.approx(losses["audio"], rel=2e-2)


def test_shards_from_another_encoder_are_refused(shard_dirs, model_config, tmp_path):
    from audio_llm.demo.tiny import write_tiny_models

    other = write_tiny_models(tmp_path / "other", seed=5)
    import dataclasses

    model = build_audio_llm(dataclasses.replace(model_config, encoder=str(other["whisper"])))
    with pytest.raises(AudioLLMError, match="made by another encoder"):
        build_loader(
            DataConfig(batch_size=2, num_workers=0),
            layout_of(model),
            spec=str(shard_dirs["encoder"]),
        )


def test_varlen_encoder_shards_train_like_the_live_varlen_encoder(
    shard_dirs, model_config, tmp_path
):
    """Shards packed with --varlen-encoder carry what model.varlen_encoder=true computes live, and
    a run whose setting differs from the shards' is refused with the fix."""
    import dataclasses

    manifest = _corpus(tmp_path)
    options = PackOptions(
        out=tmp_path / "varlen",
        mode="encoder",
        max_samples=5,
        encoder=Path(model_config.encoder),
        varlen_encoder=True,
        quiet=True,
    )
    index = pack([manifest], options)
    assert index["encoder"]["varlen"] is True
    varlen = build_audio_llm(dataclasses.replace(model_config, varlen_encoder=True))
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4)
    losses = {}
    for name, folder in (("live", shard_dirs["audio"]), ("packed", tmp_path / "varlen")):
        batch = next(iter(build_loader(cfg, layout_of(varlen), spec=str(folder))))
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        losses[name] = varlen(**batch).loss.item()
    assert losses["packed"] == pytest.approx(losses["live"], rel=2e-2)
    with pytest.raises(AudioLLMError, match="model.varlen_encoder"):
        build_loader(cfg, layout_of(varlen), spec=str(shard_dirs["encoder"]))
    with pytest.raises(AudioLLMError, match="model.varlen_encoder"):
        build_loader(cfg, layout_of(build_audio_llm(model_config)), spec=str(tmp_path / "varlen"))


def test_over_long_samples_are_refused_and_counted(shard_dirs, model):
    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=1, max_length=140)
    loader = build_loader(cfg, layout_of(model), spec=str(shard_dirs["encoder"]))
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    assert all(b["input_ids"].shape[1] <= 140 for b in batches)
    assert loader.problems["over_max_length"] > 0


def test_url_specs_need_an_index(shard_dirs, tmp_path):
    names = sorted(p.name for p in shard_dirs["audio"].glob("*.tar"))
    spec = f"{shard_dirs['audio']}/shard-{{000000..{len(names) - 1:06d}}}.tar"
    shards = ShardSet.open(spec)  # local URLs find the index beside them
    assert [s.name for s in shards.shards] == names
    with pytest.raises(AudioLLMError, match="need their index.json"):
        ShardSet.open(f"pipe:cat {shard_dirs['audio']}/shard-000000.tar")
    piped = ShardSet.open(
        f"pipe:cat {shard_dirs['audio']}/shard-000000.tar", str(shard_dirs["audio"] / "index.json")
    )
    assert piped.shards[0].name == names[0]
    with pytest.raises(AudioLLMError, match="no index.json"):
        ShardSet.open(str(tmp_path))


def test_features_on_device_loader_yields_int16_waveforms_and_the_same_loss(shard_dirs, model):
    """features_on=device: workers send int16 waveforms; the model's own log-mel of them equals
    the loader's features, so the loss is the same batch for batch."""
    batches = {}
    for where in ("loader", "device"):
        cfg = DataConfig(batch_size=3, num_workers=1, shuffle_buffer=4, features_on=where)
        batches[where] = next(
            iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"])))
        )
    live, wave = batches["loader"], batches["device"]
    assert wave["waveforms"].dtype == torch.int16 and "input_features" not in wave
    assert wave["keys"] == live["keys"] and wave["stats"] == live["stats"]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(wave[key], live[key])
    assert torch.equal(wave["waveform_lengths"] // 160, live["feature_lengths"])
    features, frames = model.log_mel(wave["waveforms"], wave["waveform_lengths"])
    assert torch.equal(frames, live["feature_lengths"])
    # same clip, same code, int16 / 32768 == soundfile's float32: identical on a CPU
    torch.testing.assert_close(features, live["input_features"], atol=1e-6, rtol=0)
    model.eval()
    losses = {
        where: model(**{k: v for k, v in b.items() if isinstance(v, torch.Tensor)}).loss.item()
        for where, b in batches.items()
    }
    assert losses["device"] == pytest.approx(losses["loader"], rel=1e-6)
    # precomputed shards have no log-mel left to move: the option leaves them as they are
    cfg = DataConfig(batch_size=3, num_workers=0, features_on="device")
    mel = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))))
    assert "input_features" in mel and "waveforms" not in mel


def test_device_log_mel_forward_and_generate_on_odd_lengths(model):
    """0.3, 7.77 and 29.99 s clips in one batch, through FLAC as in shards: the same loss and the
    same generated ids from waveforms (device) as from the collator's log-mel (loader)."""
    from audio_llm.audio.io import decode_flac, encode_flac
    from audio_llm.data import AudioSample, Collator
    from audio_llm.data.stages import frames_of

    rng = np.random.default_rng(7)
    flacs = [encode_flac(0.2 * rng.standard_normal(round(s * 16000))) for s in (0.3, 7.77, 29.99)]
    texts = ["one two", "three four five", "six"]
    outputs = {}
    layout = layout_of(model)
    for where in ("loader", "device"):
        collator = Collator(layout, "audio", where)
        samples = []
        for i, (data, text) in enumerate(zip(flacs, texts, strict=True)):
            audio = decode_flac(data, pcm16=collator.features_on_device)
            meta = {"text": text, "num_samples": len(audio)}
            example = layout.example(meta, frames_of(meta, "audio"), "audio")
            samples.append(AudioSample(f"k{i}", text, None, len(audio) / 16000, example, audio))
        train, prompts = collator(samples), collator.prompt_batch(samples)
        if where == "device":
            assert train["waveforms"].dtype == prompts["waveforms"].dtype == torch.int16
            assert train["waveform_lengths"].tolist() == [4800, 124320, 479840]
        model.eval()
        tensors = {k: v for k, v in train.items() if isinstance(v, torch.Tensor)}
        loss = model(**tensors).loss.item()
        tensors = {k: v for k, v in prompts.items() if isinstance(v, torch.Tensor)}
        audio = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
        projected, _ = model.project_audio(**audio)  # what generate() embeds
        outputs[where] = (loss, projected, model.generate(**tensors, max_new_tokens=4))
    assert outputs["device"][0] == pytest.approx(outputs["loader"][0], rel=1e-6)
    torch.testing.assert_close(outputs["device"][1], outputs["loader"][1], atol=1e-6, rtol=0)
    assert outputs["device"][2] == outputs["loader"][2]


# -- SpecAugment masks (data.time_masks / data.feature_masks) --------------------------------


def _masked(cfg: DataConfig, model, folder: Path, n: int) -> tuple[list[dict], list[dict]]:
    """The first `n` batches of `folder` without masks and with `cfg`'s masks (same seed)."""
    plain = DataConfig(**{**vars(cfg), "time_masks": 0, "feature_masks": 0})
    clean = iter(build_loader(plain, layout_of(model), spec=str(folder)))
    masked = iter(build_loader(cfg, layout_of(model), spec=str(folder)))
    return [next(clean) for _ in range(n)], [next(masked) for _ in range(n)]


def test_time_masks_fall_inside_each_clip_and_keep_the_transcript(shard_dirs, model):
    cfg = DataConfig(
        batch_size=4, num_workers=0, shuffle_buffer=4, time_masks=2, time_mask_seconds=0.3
    )
    clean, masked = _masked(cfg, model, shard_dirs["encoder"], 3)
    total_hit = 0
    for a, b in zip(clean, masked, strict=True):
        batch_hit = 0
        assert a["keys"] == b["keys"]
        for name in ("input_ids", "labels", "attention_mask", "audio_lengths"):
            assert torch.equal(a[name], b[name])
        for row, n in enumerate(b["audio_lengths"].tolist()):
            before, after = a["audio_embeds"][row].float(), b["audio_embeds"][row].float()
            assert torch.equal(after[n:], before[n:])  # padding untouched
            hit = (after[:n] != before[:n]).any(dim=1)
            # a masked frame is the clip's mean in every channel; at most 2 spans of 15 frames
            fill = before[:n].mean()
            torch.testing.assert_close(
                after[:n][hit], fill.expand_as(after[:n][hit]), atol=2e-3, rtol=0
            )
            assert int(hit.sum()) <= 2 * 15
            batch_hit += int(hit.sum())
        assert b["stats"]["masked_frames"] == batch_hit  # the counter TensorBoard shows
        total_hit += batch_hit
    assert total_hit > 0


def test_feature_masks_cover_bands_of_mel_bins(shard_dirs, model):
    cfg = DataConfig(
        batch_size=4, num_workers=0, shuffle_buffer=4, feature_masks=1, feature_mask_fraction=0.25
    )
    clean, masked = _masked(cfg, model, shard_dirs["mel"], 2)
    bands = 0
    for a, b in zip(clean, masked, strict=True):
        for row, n in enumerate(b["feature_lengths"].tolist()):
            before = a["input_features"][row, :, :n].float()
            after = b["input_features"][row, :, :n].float()
            changed = (after != before).any(dim=1).nonzero().flatten().tolist()
            assert len(changed) <= 20  # 25% of 80 mel bins
            if changed:
                assert changed == list(range(changed[0], changed[-1] + 1))  # one band
                band = after[changed]
                assert torch.all(band == band[0, 0])  # filled with one value
                bands += 1
            assert torch.equal(b["input_features"][row, :, n:], a["input_features"][row, :, n:])
    assert bands > 0


def test_masks_are_reproducible_and_replayed_on_resume(shard_dirs, model):
    cfg = DataConfig(
        batch_size=3,
        num_workers=0,
        shuffle_buffer=4,
        time_masks=2,
        time_mask_seconds=0.2,
        feature_masks=2,
    )
    spec = str(shard_dirs["audio"])  # live log-mel, computed in the loader, then masked
    first = iter(build_loader(cfg, layout_of(model), spec=spec))
    reference = [next(first)["input_features"] for _ in range(4)]
    again = iter(build_loader(cfg, layout_of(model), spec=spec))
    assert all(torch.equal(next(again)["input_features"], r) for r in reference)
    resumed = build_loader(cfg, layout_of(model), spec=spec)
    resumed.load_state_dict({"epoch": 0, "consumed": [2]})
    it = iter(resumed)
    assert torch.equal(next(it)["input_features"], reference[2])
    assert torch.equal(next(it)["input_features"], reference[3])
    other = iter(build_loader(DataConfig(**{**vars(cfg), "seed": 1}), layout_of(model), spec=spec))
    assert not torch.equal(next(other)["input_features"], reference[0])


def test_masks_refuse_waveform_batches_and_bad_settings(shard_dirs, model):
    cfg = DataConfig(batch_size=2, num_workers=0, time_masks=1, features_on="device")
    with pytest.raises(AudioLLMError, match="features_on=loader"):
        build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    # precomputed features ignore features_on, so the same config masks encoder shards
    assert (
        build_loader(cfg, layout_of(model), spec=str(shard_dirs["encoder"])).stream.augment
        is not None
    )
    with pytest.raises(AudioLLMError, match="time_masks"):
        DataConfig(time_masks=-1)
    with pytest.raises(AudioLLMError, match="feature_mask_fraction"):
        DataConfig(feature_masks=1, feature_mask_fraction=1.5)


def test_the_layout_counts_audio_positions_as_the_model_does(model):
    """`layout_of` is the pipeline's one view of the model: its audio span for a clip is the
    model's `num_audio_tokens`, from mel frames (audio, mel shards) or encoder frames."""
    layout = layout_of(model)
    assert layout.stack == model.projector.stack
    for mel in (1, 2, 3, 159, 160, 161, 2999, 3000):
        enc = (mel - 1) // 2 + 1
        assert layout.audio_tokens(mel, "audio") == model.num_audio_tokens(mel)
        assert layout.audio_tokens(enc, "encoder") == model.num_audio_tokens(mel)
