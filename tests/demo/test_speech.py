"""The demo corpus: a vocabulary whose words all sound different, and splits drawn so that the
test sets never change with the training set's size."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from dataclasses import asdict

import pytest

from audio_llm.demo.speech import (
    HOMOPHONES,
    SPEC_FILE,
    TRAIN_VOICES,
    UNSEEN_VOICE,
    CorpusSpec,
    _utterances,
    corpus_matches,
    demo_vocabulary,
)
from audio_llm.model.tiny import vocabulary

VOICES = (*TRAIN_VOICES, UNSEEN_VOICE)


def _phonemes(words: list[str], voice: str) -> list[str]:
    """espeak-ng's phonemes of each word, said alone by `voice`."""
    out = subprocess.run(
        ["espeak-ng", "-q", "-x", "-v", voice],
        input="\n".join(words),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    said = [line.strip() for line in out.splitlines() if line.strip()]
    assert len(said) == len(words), f"{voice}: {len(said)} phoneme lines for {len(words)} words"
    return said


def _sound_alike(words: list[str]) -> dict[tuple[str, ...], list[str]]:
    """Groups of words that some voice says with the same phonemes, and the voices that do."""
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for voice in VOICES:
        by_sound: dict[str, list[str]] = defaultdict(list)
        for word, sound in zip(words, _phonemes(words, voice), strict=True):
            by_sound[sound].append(word)
        for same in by_sound.values():
            if len(same) > 1:
                groups[tuple(same)].append(voice)
    return dict(groups)


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


@needs_espeak
def test_no_two_words_of_the_vocabulary_sound_alike_in_any_voice():
    assert _sound_alike(demo_vocabulary(CorpusSpec.words)) == {}


@needs_espeak
def test_every_left_out_word_does_sound_like_a_kept_one():
    # the list holds only real homophones: without it, each of its words collides
    kept = demo_vocabulary(CorpusSpec.words)
    groups = _sound_alike(kept + list(HOMOPHONES))
    collided = {w for group in groups for w in group}
    assert set(HOMOPHONES) <= collided
    assert ("eight", "ate") in groups and len(groups[("eight", "ate")]) == len(VOICES)


def test_the_vocabulary_skips_the_homophones_and_keeps_the_list_order():
    words = demo_vocabulary(240)
    assert len(words) == len(set(words)) == 240
    assert not set(HOMOPHONES) & set(words)
    full = vocabulary()
    assert [w for w in full if w in set(words)] == words  # the embedded order, gaps closed
    assert words[-1] == [w for w in full if w not in HOMOPHONES][239]


def test_test_sets_do_not_depend_on_the_training_set_size():
    small, large = _utterances(CorpusSpec(train=50)), _utterances(CorpusSpec(train=400))
    for split in ("test_seen_voices", "test_unseen_voice"):
        assert small[split] == large[split]
    assert large["train"][:50] == small["train"]  # a larger set only adds rows after


def test_no_test_word_sequence_is_trained_on_and_every_row_is_complete():
    spec = CorpusSpec(train=300, test=40, words=12, min_words=1, max_words=2)  # collisions happen
    splits = _utterances(spec)
    tests = {r["text"] for r in splits["test_seen_voices"] + splits["test_unseen_voice"]}
    assert not tests & {r["text"] for r in splits["train"]}
    assert {r["voice"] for r in splits["test_unseen_voice"]} == {UNSEEN_VOICE}
    assert {r["voice"] for r in splits["train"]} == set(TRAIN_VOICES)
    for name, rows in splits.items():
        assert [r["id"] for r in rows] == [
            f"{name}-{i:0{5 if name == 'train' else 4}d}" for i in range(len(rows))
        ]
        for r in rows:
            assert spec.wpm[0] <= r["wpm"] <= spec.wpm[1]
            assert spec.snr_db[0] <= r["snr_db"] <= spec.snr_db[1]


def test_a_different_seed_gives_other_test_sentences():
    a = _utterances(CorpusSpec(train=10, seed=0))["test_seen_voices"]
    b = _utterances(CorpusSpec(train=10, seed=1))["test_seen_voices"]
    assert [r["text"] for r in a] != [r["text"] for r in b]


def test_a_corpus_of_an_older_version_is_not_reused(tmp_path):
    spec = CorpusSpec(train=10)
    (tmp_path / SPEC_FILE).write_text(json.dumps(asdict(spec)))
    assert corpus_matches(tmp_path, spec)
    old = {k: v for k, v in asdict(spec).items() if k != "version"}  # written before version 2
    (tmp_path / SPEC_FILE).write_text(json.dumps(old))
    assert not corpus_matches(tmp_path, spec)


def test_corpus_progress_shows_clips_rate_and_eta_at_most_every_10_s_and_at_the_end():
    from audio_llm.demo.speech import ClipProgress

    now, lines = [0.0], []
    progress = ClipProgress(100, lines.append, every=10.0, clock=lambda: now[0])
    for _ in range(99):
        now[0] += 0.5  # 2 clips/s
        progress.advance()
    # 49.5 s for 99 clips: a line at 10, 20, 30 and 40 s only
    assert [line.split(" |")[0] for line in lines] == [
        f"clips {n}/100 ({n}.0%)" for n in (20, 40, 60, 80)
    ]
    assert lines[0] == "clips 20/100 (20.0%) | 2.0 clips/s | elapsed 10s | eta 40s"
    now[0] += 0.5
    progress.advance()  # the last clip always shows
    assert lines[-1] == "clips 100/100 (100.0%) | 2.0 clips/s | elapsed 50s | eta 0s"


def test_make_corpus_reports_progress_over_all_splits(tmp_path, monkeypatch):
    from audio_llm.demo import speech

    spoken = []

    def fake_speak(row, folder):
        spoken.append(row["id"])
        return {"audio_filepath": f"{row['id']}.flac", "text": row["text"], "id": row["id"]}

    monkeypatch.setattr(speech, "_speak", fake_speak)
    monkeypatch.setattr(speech.shutil, "which", lambda name: f"/usr/bin/{name}")
    lines = []
    spec = CorpusSpec(train=6, test=2, dev=2)
    speech.make_corpus(tmp_path, spec, progress=lines.append)
    assert len(spoken) == 12 and lines  # 6 + 2 + 2 test sets of 2
    assert lines[-1].startswith("clips 12/12 (100.0%) | ") and "clips/s" in lines[-1]


@needs_espeak
def test_a_clip_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from audio_llm.demo import speech

    row = {"id": "c0", "voice": "en-us", "wpm": 160, "text": "look move break", "gain": 0.8}
    row |= {"snr_db": 30.0, "noise_seed": 1}
    entry = speech._speak(row, tmp_path)
    audio, rate = speech.sf.read(tmp_path / entry["audio_filepath"])
    assert rate == 22050 and len(audio) / rate == pytest.approx(entry["duration"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.flac"]  # no wav, no temp file

    def dies_midway(out, *args, **kwargs):
        out.write(b"fLaC half a clip")
        raise KeyboardInterrupt

    monkeypatch.setattr(speech.sf, "write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        speech._speak({**row, "id": "c1"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.flac"]
