import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from transformers import WhisperFeatureExtractor

from audio_llm.audio.features import log_mel
from audio_llm.audio.io import load_audio
from audio_llm.cli import main
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import AudioEncoder, encoder_identity, load_whisper_encoder
from audio_llm.pack import prepare as prepare_module
from audio_llm.pack.manifests import Utterance, read_inputs
from audio_llm.pack.parts import STATE_DIR
from audio_llm.pack.prepare import PackSettings
from audio_llm.pack.verify import verify
from audio_llm.pack.writer import PackOptions, assign_keys, pack

PCM16_STEP = 1 / 32768


def _speech_like(seconds: float, rate: int = 16000, seed: int = 0, channels: int = 1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    x = (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    return x if channels == 1 else np.stack([x, 0.5 * x], axis=1)


def _write(path: Path, seconds: float, rate: int = 16000, seed: int = 0, channels: int = 1):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _speech_like(seconds, rate, seed, channels), rate)
    return path


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards in index order, read with tarfile: key -> {suffix: bytes}."""
    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return samples


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A manifest with two good clips (one 44.1 kHz stereo) and one of every kind of problem."""
    audio = tmp_path / "audio"
    _write(audio / "a.wav", 1.5, seed=1)
    _write(audio / "stereo.flac", 2.0, rate=44100, seed=2, channels=2)
    _write(audio / "long.wav", 45.0, seed=3)
    _write(audio / "tiny.wav", 0.05, seed=4)
    (audio / "junk.wav").write_bytes(b"this is not audio")
    rows = [
        {"audio_filepath": "audio/a.wav", "text": "Hello \t world\r\nagain ", "id": "spk1.utt.1"},
        {"audio_filepath": "audio/stereo.flac", "text": "stereo", "speaker": "s2", "lang": "en"},
        {"audio": "audio/long.wav", "text": "a long one", "prompt": "Transcribe."},
        {"audio_filepath": "audio/tiny.wav", "text": "too short"},
        {"audio_filepath": "audio/junk.wav", "text": "undecodable"},
        {"audio_filepath": "audio/missing.wav", "text": "missing"},
        {"audio_filepath": "audio/a.wav", "text": "   ", "id": "blank"},
    ]
    return _manifest(tmp_path / "train.jsonl", rows)


def _only_final_files(out: Path) -> list[str]:
    """Shards, index and temporary files; not the resume state (its own tests are in
    test_parts.py)."""
    return sorted(p.name for p in out.iterdir() if p.name != STATE_DIR)


# ----------------------------------------------------------------------------- audio mode


def test_audio_mode_round_trip_and_report(corpus, tmp_path):
    out = tmp_path / "out"
    index = pack([corpus], PackOptions(out=out, quiet=True))
    report = index["report"]
    assert report["samples_written"] == 2
    assert report["skipped"] == {
        "missing_file": 1,
        "undecodable": 1,
        "empty_text": 1,
        "too_long": 1,
        "too_short": 1,
    }
    assert report["truncated"] == 0
    assert _only_final_files(out) == ["index.json", "shard-000000.tar"]

    samples = _read_shards(out)
    assert list(samples) == ["audio_stereo", "spk1_utt_1"]  # sorted by id; dots, "/" replaced
    for key, source in [("spk1_utt_1", "a.wav"), ("audio_stereo", "stereo.flac")]:
        assert set(samples[key]) == {"json", "flac"}
        meta = json.loads(samples[key]["json"])
        decoded, rate = sf.read(io.BytesIO(samples[key]["flac"]), dtype="float32")
        assert rate == 16000 and decoded.ndim == 1
        expected = load_audio(corpus.parent / "audio" / source)
        np.testing.assert_allclose(decoded, np.clip(expected, -1, 1), atol=PCM16_STEP)
        assert meta["num_samples"] == len(decoded) and meta["sample_rate"] == 16000
        assert meta["duration"] == pytest.approx(len(decoded) / 16000)
    first = json.loads(samples["spk1_utt_1"]["json"])
    assert first["text"] == "Hello world\nagain"
    assert first["id"] == "spk1.utt.1" and first["source"] == "audio/a.wav"
    second = json.loads(samples["audio_stereo"]["json"])
    assert (second["speaker"], second["lang"], second["duration"]) == ("s2", "en", 2.0)


def test_long_audio_truncate_is_counted_and_cut_to_30_s(corpus, tmp_path):
    index = pack([corpus], PackOptions(out=tmp_path / "out", long_audio="truncate", quiet=True))
    assert index["report"]["truncated"] == 1
    assert index["report"]["skipped"]["too_long"] == 0
    assert index["report"]["samples_written"] == 3
    meta = json.loads(_read_shards(tmp_path / "out")["audio_long"]["json"])
    assert meta["duration"] == 30.0 and meta["num_samples"] == 480000
    assert meta["truncated_from"] == pytest.approx(45.0)
    assert meta["prompt"] == "Transcribe."
    assert index["length_policy"] == {
        "max_seconds": 30.0,
        "long_audio": "truncate",
        "min_seconds": 0.1,
    }


def test_librispeech_layout(tmp_path):
    root = tmp_path / "dev-clean"
    for spk, chap, n in [("84", "121123", 2), ("174", "50561", 1)]:
        folder = root / spk / chap
        lines = []
        for i in range(n):
            utt = f"{spk}-{chap}-{i:04d}"
            _write(folder / f"{utt}.flac", 0.5 + 0.1 * i, seed=i)
            lines.append(f"{utt} WORDS OF {utt}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    index = pack([root], PackOptions(out=tmp_path / "out", quiet=True))
    assert index["totals"]["samples"] == 3
    samples = _read_shards(tmp_path / "out")
    assert list(samples) == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    meta = json.loads(samples["84-121123-0001"]["json"])
    assert meta["text"] == "WORDS OF 84-121123-0001"
    assert meta["speaker"] == "84" and meta["duration"] == pytest.approx(0.6)
    assert meta["source"] == "84/121123/84-121123-0001.flac"


def _kaldi_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    wav1 = _write(tmp_path / "wav" / "u1.wav", 0.8, seed=1)
    wav2 = _write(tmp_path / "wav" / "u2.wav", 0.9, seed=2)
    (data / "wav.scp").write_text(f"u1 {wav1}\nu2 {wav2}\n")
    (data / "text").write_text("u1 first  utterance\nu2 second\nu3 has no audio\n")
    (data / "utt2spk").write_text("u1 alice\nu2 bob\nu3 carol\n")
    return data


def test_kaldi_data_dir(tmp_path):
    index = pack([_kaldi_dir(tmp_path)], PackOptions(out=tmp_path / "out", quiet=True))
    assert index["report"]["samples_written"] == 2
    assert index["report"]["skipped"]["missing_file"] == 1  # u3: transcript without wav.scp entry
    samples = _read_shards(tmp_path / "out")
    assert json.loads(samples["u1"]["json"])["text"] == "first utterance"
    assert json.loads(samples["u2"]["json"])["speaker"] == "bob"


def test_kaldi_piped_wav_scp_is_refused_naming_the_line(tmp_path):
    data = _kaldi_dir(tmp_path)
    with open(data / "wav.scp", "a") as f:
        f.write("u3 sox in.sph -t wav - |\n")
    with pytest.raises(AudioLLMError, match=r"wav\.scp:3: piped entry"):
        read_inputs([data])


def _int16_clip(seconds: float, seed: int) -> np.ndarray:
    return np.round(_speech_like(seconds, seed=seed) * 32767).astype(np.int16)


def test_kaldi_ark_offsets_are_read_without_running_anything(tmp_path):
    import kaldiio

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    clips = {"u1": _int16_clip(0.8, 1), "u2": _int16_clip(0.9, 2), "u3": _int16_clip(0.7, 3)}
    # u1, u2: whole WAV files in the ark, as `wav-copy` writes them (kaldiio's wav format)
    kaldiio.save_ark(
        str(tmp_path / "wav.ark"),
        {k: (16000, clips[k]) for k in ("u1", "u2")},
        scp=str(tmp_path / "wav_ark.scp"),
    )
    # u3: kaldiio's length-prefixed AUDIO record (FLAC inside)
    kaldiio.save_ark(
        str(tmp_path / "flac.ark"),
        {"u3": (16000, clips["u3"])},
        scp=str(tmp_path / "flac_ark.scp"),
        write_function="soundfile",
        write_kwargs={"format": "flac"},
    )
    # u4: feature matrices are not audio; u5: an "ark" named like a command is opened as a file
    kaldiio.save_ark(str(tmp_path / "feats.ark"), {"u4": np.ones((3, 4), np.float32)})
    marker = tmp_path / "MARKER"
    scp = (tmp_path / "wav_ark.scp").read_text() + (tmp_path / "flac_ark.scp").read_text()
    scp += f"u4 {tmp_path / 'feats.ark'}:3\nu5 touch {marker} |:0\n"
    assert ".ark:" in scp and scp.count("\n") == 5
    (data / "wav.scp").write_text(scp)
    (data / "text").write_text("u1 one\nu2 two\nu3 three\nu4 four\nu5 five\n")

    index = pack([data], PackOptions(out=tmp_path / "out", quiet=True))
    assert index["report"]["samples_written"] == 3
    assert index["report"]["skipped"]["undecodable"] == 1  # u4: features
    assert "not a WAV or kaldiio audio record" in index["report"]["skip_examples"]["undecodable"][0]
    assert index["report"]["skipped"]["missing_file"] == 1  # u5: no such ark file
    assert not marker.exists() and "commands_run" not in index["report"]
    samples = _read_shards(tmp_path / "out")
    for key, clip in clips.items():
        decoded, rate = sf.read(io.BytesIO(samples[key]["flac"]), dtype="int16")
        assert rate == 16000
        np.testing.assert_array_equal(decoded, clip)  # 16-bit in, 16-bit out: exact
        assert json.loads(samples[key]["json"])["source"].startswith(str(tmp_path))


def _piped_kaldi_dir(tmp_path: Path) -> tuple[Path, Path]:
    data = _kaldi_dir(tmp_path)
    wav3 = _write(tmp_path / "wav" / "u3.wav", 0.6, seed=3)
    marker = tmp_path / "MARKER"
    with open(data / "wav.scp", "a") as f:
        f.write(f"u3 touch {marker} && cat {wav3} |\n")
    return data, marker


def test_kaldi_piped_entry_is_refused_without_allow_pipes_and_runs_nothing(tmp_path, capsys):
    data, marker = _piped_kaldi_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["pack", "--input", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "wav.scp:3: piped entry" in err and "'u3'" in err
    assert "--allow-pipes" in err and "wav-copy" in err  # both ways forward are named
    assert not marker.exists()
    assert not (out / "index.json").exists()


def test_commands_never_run_unless_the_settings_allow_them(tmp_path):
    marker = tmp_path / "MARKER"
    utt = Utterance(id="u", audio=None, text="x", source="cmd", command=f"touch {marker} |")
    with pytest.raises(AudioLLMError, match="--allow-pipes"):
        prepare_module.prepare_sample("u", utt, PackSettings("audio"))
    assert not marker.exists()


def test_kaldi_piped_entry_packs_with_allow_pipes_and_the_report_shows_it(tmp_path, capsys):
    data, marker = _piped_kaldi_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["pack", "--input", str(data), "--out", str(out), "--allow-pipes"]) == 0
    captured = capsys.readouterr()
    assert marker.exists()
    command = f"u3: touch {marker} && cat {tmp_path / 'wav' / 'u3.wav'} |"
    assert f"ran 1 wav.scp command(s) (--allow-pipes):\n  {command}" in captured.out
    assert f"ran (--allow-pipes) {command}" in captured.err  # the log names it too
    index = json.loads((out / "index.json").read_text())
    assert index["report"]["commands_run"] == 1
    assert index["report"]["command_examples"] == [command]
    assert index["report"]["samples_written"] == 3
    decoded, _ = sf.read(io.BytesIO(_read_shards(out)["u3"]["flac"]), dtype="float32")
    expected = load_audio(tmp_path / "wav" / "u3.wav")
    np.testing.assert_allclose(decoded, expected, atol=PCM16_STEP)


def test_allowed_pipe_that_fails_is_counted_with_its_exit_status(tmp_path):
    data = _kaldi_dir(tmp_path)
    with open(data / "wav.scp", "a") as f:
        f.write("u3 echo broken >&2; exit 3 |\n")
    index = pack([data], PackOptions(out=tmp_path / "out", allow_pipes=True, quiet=True))
    assert index["report"]["skipped"]["undecodable"] == 1
    detail = index["report"]["skip_examples"]["undecodable"][0]
    assert "exited with status 3: broken" in detail


def test_allowed_pipe_whose_program_is_missing_stops_the_pack(tmp_path, capsys):
    data = _kaldi_dir(tmp_path)
    with open(data / "wav.scp", "a") as f:
        f.write("u3 no-such-program-xyz in.sph |\n")
    out = tmp_path / "out"
    assert main(["pack", "--input", str(data), "--out", str(out), "--allow-pipes", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "u3: command not found running 'no-such-program-xyz in.sph |'" in err
    assert not (out / "index.json").exists()


def test_several_inputs_get_unique_keys(corpus, tmp_path):
    other = _manifest(
        tmp_path / "other.jsonl",
        [
            {
                "audio_filepath": str(corpus.parent / "audio" / "a.wav"),
                "text": "x",
                "id": "audio.stereo",
            }
        ],
    )
    pack([corpus, other], PackOptions(out=tmp_path / "out", quiet=True))
    assert sorted(_read_shards(tmp_path / "out")) == [
        "audio_stereo",
        "audio_stereo_1",
        "spk1_utt_1",
    ]


def test_assign_keys_is_webdataset_safe_and_unique():
    keys = assign_keys(["a.b", "a_b", "__meta__", "x/y z", "a.b"])
    assert keys == ["a_b", "a_b_1", "meta__", "x_y_z", "a_b_2"]


# ----------------------------------------------------------------------------- mel / encoder


def test_mel_mode_matches_features_within_float16(corpus, tmp_path):
    fe_dir = tmp_path / "fe"
    WhisperFeatureExtractor(feature_size=80).save_pretrained(fe_dir)
    index = pack(
        [corpus],
        PackOptions(out=tmp_path / "out", mode="mel", feature_extractor=fe_dir, quiet=True),
    )
    assert index["features"] == {
        "sampling_rate": 16000,
        "n_mels": 80,
        "hop_length": 160,
        "n_fft": 400,
    }
    samples = _read_shards(tmp_path / "out")
    fe = WhisperFeatureExtractor(feature_size=80)
    for key, source in [("spk1_utt_1", "a.wav"), ("audio_stereo", "stereo.flac")]:
        assert set(samples[key]) == {"json", "mel.npy"}
        mel = np.load(io.BytesIO(samples[key]["mel.npy"]), allow_pickle=False)
        expected = log_mel(load_audio(corpus.parent / "audio" / source), fe.mel_filters).numpy()
        assert mel.dtype == np.float16 and mel.shape == expected.shape
        assert json.loads(samples[key]["json"])["frames"] == mel.shape[1]
        # float16 keeps 11 significant bits: |x| < 4 -> error <= 2^-10
        np.testing.assert_allclose(mel.astype(np.float32), expected, atol=2e-3, rtol=0)


def test_encoder_mode_matches_running_the_encoder(corpus, tmp_path, tiny_models):
    whisper_dir = tiny_models["whisper"]
    options = PackOptions(
        out=tmp_path / "out", mode="encoder", encoder=whisper_dir, batch_size=2, quiet=True
    )
    index = pack([corpus], options)
    encoder = AudioEncoder(load_whisper_encoder(whisper_dir))
    # the identity the trainer checks, and the dtype the encoder ran in (for the record)
    assert index["encoder"] == encoder_identity(encoder.whisper, whisper_dir) | {"dtype": "float32"}
    assert index["encoder"]["d_model"] == encoder.d_model and "weights_sha256" in index["encoder"]
    assert index["encoder"]["num_mel_bins"] == index["features"]["n_mels"] == 80
    samples = _read_shards(tmp_path / "out")
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    for key, source in [("spk1_utt_1", "a.wav"), ("audio_stereo", "stereo.flac")]:
        assert set(samples[key]) == {"json", "enc.npy"}
        enc = np.load(io.BytesIO(samples[key]["enc.npy"]), allow_pickle=False)
        mel = log_mel(load_audio(corpus.parent / "audio" / source), fe.mel_filters)
        hidden, lengths = encoder(mel[None], torch.tensor([mel.shape[1]]))
        expected = hidden[0, : int(lengths[0])].numpy()
        assert enc.dtype == np.float16 and enc.shape == expected.shape
        assert json.loads(samples[key]["json"])["frames"] == enc.shape[0]
        np.testing.assert_allclose(enc.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert verify(tmp_path / "out") == []


def test_mel_mode_without_feature_extractor_is_refused(tmp_path):
    with pytest.raises(AudioLLMError, match="--feature-extractor"):
        PackOptions(out=tmp_path, mode="mel")


# ----------------------------------------------------------------------------- shards


def test_identical_input_gives_identical_bytes(corpus, tmp_path):
    first = pack([corpus], PackOptions(out=tmp_path / "a", max_samples=1, quiet=True))
    second = pack([corpus], PackOptions(out=tmp_path / "b", max_samples=1, quiet=True))
    assert len(first["shards"]) == 2
    assert first["shards"] == second["shards"]
    for shard in first["shards"]:
        data = (tmp_path / "a" / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert data == (tmp_path / "b" / shard["name"]).read_bytes()
    assert (tmp_path / "a" / "index.json").read_bytes() != b""


def test_worker_processes_give_the_same_shards(corpus, tmp_path):
    inline = pack([corpus], PackOptions(out=tmp_path / "a", quiet=True))
    pooled = pack([corpus], PackOptions(out=tmp_path / "b", workers=2, quiet=True))
    assert inline["shards"] == pooled["shards"]
    assert inline["report"] == pooled["report"]


def test_shuffle_is_seeded(tmp_path):
    rows = [
        {
            "audio_filepath": str(_write(tmp_path / f"{i}.wav", 0.3, seed=i)),
            "text": f"t{i}",
            "id": f"u{i}",
        }
        for i in range(8)
    ]
    manifest = _manifest(tmp_path / "m.jsonl", rows)
    order = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        pack([manifest], PackOptions(out=tmp_path / name, shuffle=True, seed=seed, quiet=True))
        order[name] = list(_read_shards(tmp_path / name))
    assert order["a"] == order["b"]
    assert order["a"] != order["c"]
    assert order["a"] != sorted(order["a"]) and sorted(order["a"]) == [f"u{i}" for i in range(8)]


def test_shards_roll_over_by_samples_and_bytes(tmp_path):
    rows = [
        {
            "audio_filepath": str(_write(tmp_path / f"{i}.wav", 0.5, seed=i)),
            "text": "t",
            "id": f"u{i}",
        }
        for i in range(5)
    ]
    manifest = _manifest(tmp_path / "m.jsonl", rows)
    by_count = pack([manifest], PackOptions(out=tmp_path / "n", max_samples=2, quiet=True))
    assert [s["samples"] for s in by_count["shards"]] == [2, 2, 1]
    assert [s["name"] for s in by_count["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    one_flac = len(_read_shards(tmp_path / "n")["u0"]["flac"])
    by_bytes = pack([manifest], PackOptions(out=tmp_path / "b", max_bytes=2 * one_flac, quiet=True))
    assert [s["samples"] for s in by_bytes["shards"]] == [1, 1, 1, 1, 1]
    assert by_bytes["totals"]["samples"] == 5


def test_stock_webdataset_and_tar_read_the_shards(corpus, tmp_path):
    out = tmp_path / "out"
    index = pack([corpus], PackOptions(out=out, max_samples=1, quiet=True))
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["audio_stereo", "spk1_utt_1"]
    for sample in samples:
        assert json.loads(sample["json"])["sample_rate"] == 16000
        assert sf.read(io.BytesIO(sample["flac"]))[1] == 16000
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", urls[1]], capture_output=True, text=True, check=True)
        assert listing.stdout.split() == ["spk1_utt_1.json", "spk1_utt_1.flac"]


def test_verify_passes_then_catches_a_tampered_shard(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    pack([corpus], PackOptions(out=out, quiet=True))
    assert verify(out) == []
    assert main(["pack", "--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first FLAC payload
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert any("sha256" in p for p in problems)
    assert main(["pack", "--verify", str(out)]) == 1
    assert "FAIL shard-000000.tar: sha256" in capsys.readouterr().out


def test_verify_catches_a_missing_payload(corpus, tmp_path):
    out = tmp_path / "out"
    index = pack([corpus], PackOptions(out=out, quiet=True))
    shard = out / index["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar if i.name != "audio_stereo.flac"]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    problems = verify(out)
    assert any("audio_stereo: members ['json'], expected json + flac" in p for p in problems)


def _rewrite_shard(shard: Path, edit) -> None:
    """Rewrite a tar shard with `edit(members) -> members`, members as (TarInfo, bytes)."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(shard, "w") as tar:
        for info, data in edit(members):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_verify_names_extra_members_without_a_misleading_seconds_line(corpus, tmp_path):
    out = tmp_path / "out"
    index = pack([corpus], PackOptions(out=out, quiet=True))

    def add_txt(members):
        extra = []
        for info, data in members:
            extra.append((info, data))
            if info.name.endswith(".flac"):
                extra.append((tarfile.TarInfo(info.name.replace(".flac", ".txt")), b"x"))
        return extra

    _rewrite_shard(out / index["shards"][0]["name"], add_txt)
    problems = verify(out)
    assert (
        "shard-000000.tar:spk1_utt_1: extra members ['txt'] beside json + flac (the loader skips "
        "them; re-pack to drop them)"
    ) in problems
    assert sum("extra members" in p for p in problems) == 2
    # the loader trains on these samples, so their audio is checked and counted as usual
    assert not any("s of audio" in p or "rejected" in p for p in problems)


def test_verify_says_rejected_samples_audio_is_not_counted(corpus, tmp_path):
    out = tmp_path / "out"
    index = pack([corpus], PackOptions(out=out, quiet=True))
    entry = index["shards"][0]
    _rewrite_shard(
        out / entry["name"], lambda ms: [m for m in ms if m[0].name != "spk1_utt_1.flac"]
    )
    problems = verify(out)
    assert not any("s of audio, index says" in p for p in problems)
    assert (
        f"{entry['name']}: 1 sample(s) rejected above (missing members or bad json: "
        in (problems[-1])
    )
    assert "so their 1.500 s of audio (per index.json) are not counted" in problems[-1]


def test_verify_reports_tar_files_the_index_does_not_list(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    pack([corpus], PackOptions(out=out, quiet=True))
    shutil.copy(out / "shard-000000.tar", out / "unlisted.tar")
    assert verify(out) == [
        "unlisted.tar: in the folder but not in index.json (not used for training; "
        "delete it or re-pack)"
    ]
    assert main(["pack", "--verify", str(out)]) == 1
    assert "FAIL unlisted.tar: in the folder but not in index.json" in capsys.readouterr().out


# ----------------------------------------------------------------------------- CLI, failures


def test_cli_packs_and_reports(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", "--input", str(corpus), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 of 7 samples" in printed
    assert "missing file 1, undecodable 1, empty text 1, too long 1, too short 1" in printed
    assert json.loads((out / "index.json").read_text())["totals"]["samples"] == 2


def test_cli_skip_lines_name_the_samples(corpus, tmp_path, capsys):
    assert main(["pack", "--input", str(corpus), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "skip (missing file) audio/missing" in err and "skip (too long) audio/long" in err


def test_zero_samples_is_an_error_and_writes_nothing(tmp_path, capsys):
    manifest = _manifest(tmp_path / "m.jsonl", [{"audio_filepath": "nope.wav", "text": "x"}])
    out = tmp_path / "out"
    assert main(["pack", "--input", str(manifest), "--out", str(out), "--quiet"]) == 2
    assert "no samples written" in capsys.readouterr().err
    assert _only_final_files(out) == []


def test_cli_usage_errors_are_nonzero(tmp_path, capsys):
    assert main(["pack", "--out", str(tmp_path)]) == 2
    assert main(["pack", "--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert main(["pack", "--verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs --input" in err and "not found" in err and "no index.json" in err


def test_bad_manifest_line_is_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_filepath": "a.wav", "text": "ok"}\n{"audio_filepath": "b.wav"}\n')
    with pytest.raises(AudioLLMError, match=r"m\.jsonl:2: no 'text' field"):
        read_inputs([manifest])


def test_existing_output_needs_overwrite_and_stale_shards_go(corpus, tmp_path):
    out = tmp_path / "out"
    pack([corpus], PackOptions(out=out, max_samples=1, quiet=True))
    # one input per block: the two written samples are inputs 3 and 6 in id order
    assert _only_final_files(out) == ["index.json", "shard-000003.tar", "shard-000006.tar"]
    with pytest.raises(AudioLLMError, match="--overwrite"):
        pack([corpus], PackOptions(out=out, quiet=True))
    (out / ".shard-000000.tar.abc123.tmp").write_bytes(b"left by a killed run")
    pack([corpus], PackOptions(out=out, overwrite=True, quiet=True))
    assert _only_final_files(out) == ["index.json", "shard-000000.tar"]
    assert verify(out) == []


def test_crash_leaves_no_temp_file_and_no_index(corpus, tmp_path, monkeypatch):
    calls = []

    def failing_encode(audio):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_encode(audio)

    real_encode = prepare_module.encode_flac
    monkeypatch.setattr(prepare_module, "encode_flac", failing_encode)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack([corpus], PackOptions(out=out, quiet=True))
    # the shard being written is dropped; no final name was ever given to a partial shard
    assert _only_final_files(out) == []


def test_help_documents_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pack", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--input", "--mode", "--long-audio", "--max-bytes", "--verify", "--workers"]:
        assert flag in text
    assert "KEY.enc.npy" in text


def test_sample_shards_in_the_repo_verify():
    sample = Path(__file__).resolve().parents[2] / "shards" / "sample" / "audio"
    assert verify(sample) == []
    index = json.loads((sample / "index.json").read_text())
    assert index["mode"] == "audio" and index["totals"]["samples"] == 24


def test_skip_log_is_rate_limited_and_summarised(tmp_path, capsys):
    _write(tmp_path / "ok.wav", 0.5)
    rows = [{"audio_filepath": "ok.wav", "text": "fine"}]
    rows += [{"audio_filepath": f"gone{i}.wav", "text": "x"} for i in range(13)]
    manifest = _manifest(tmp_path / "m.jsonl", rows)
    assert main(["pack", "--input", str(manifest), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("skip (missing file)") == 10
    assert "(skips not named individually: 3 missing file)" in captured.out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["report"]["skipped"]["missing_file"] == 13


def test_encoder_batches_run_shortest_first_and_come_back_in_input_order(tiny_models):
    """The batcher runs a window of clips in batches of similar length (less padding) and returns
    them in the order they came; each clip's output is what the encoder gives it alone."""
    from audio_llm.pack.prepare import EncoderBatcher, Prepared

    batcher = EncoderBatcher(tiny_models["whisper"], 2, "cpu", "float32", varlen=True)
    assert batcher.window == 16  # 8 batches of 2
    frames = [300, 40, 220, 60, 100, 80, 260]
    rng = np.random.default_rng(0)
    mels = [rng.standard_normal((80, n)).astype(np.float32) for n in frames]
    ran = []
    encode = batcher._encode
    batcher._encode = lambda batch: (ran.append([s.mel.shape[1] for s in batch]), encode(batch))
    added = [Prepared(f"k{i}", {"id": f"u{i}"}, None, mel=m) for i, m in enumerate(mels)]
    assert all(batcher.add(s) == [] for s in added)  # fewer than a window: nothing runs yet
    out = batcher.flush()
    assert [s.key for s in out] == [f"k{i}" for i in range(len(frames))]
    assert ran == [[40, 60], [80, 100], [220, 260], [300]]
    encoder = AudioEncoder(load_whisper_encoder(tiny_models["whisper"]), varlen=True)
    for sample, mel in zip(out, mels, strict=True):
        alone, _ = encoder(torch.from_numpy(mel)[None], torch.tensor([mel.shape[1]]))
        got = np.load(io.BytesIO(sample.payload), allow_pickle=False).astype(np.float32)
        np.testing.assert_allclose(got, alone[0].numpy(), atol=2e-3, rtol=2e-3)
