"""WER scoring: hand-worked alignments, normalisers, an independent check, bootstrap and the CLI."""

from __future__ import annotations

import json
import random

import pytest

from audio_llm.cli import main
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.wer import normalize, per_utterance, read_durations, read_texts, score


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word Levenshtein distance, written here independently of jiwer."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------- hand-worked


def test_substitution_and_deletion_hand_worked():
    report = score({"u": "the cat sat on the mat"}, {"u": "the cat sit on mat"}, bootstrap=0)
    assert (report.substitutions, report.deletions, report.insertions) == (1, 1, 0)
    assert report.hits == 4
    assert report.ref_words == 6
    assert report.wer == pytest.approx(2 / 6)


def test_insertions_only():
    report = score({"u": "a b"}, {"u": "a x b y"}, bootstrap=0)
    assert (report.substitutions, report.deletions, report.insertions) == (0, 0, 2)
    assert report.wer == pytest.approx(1.0)


def test_corpus_wer_is_total_errors_over_total_words_not_the_mean():
    refs = {"long": "one two three four", "short": "five"}
    hyps = {"long": "one two three four", "short": "six"}
    report = score(refs, hyps, bootstrap=0)
    assert report.wer == pytest.approx(1 / 5)
    assert report.mean_utterance_wer == pytest.approx((0 + 1) / 2)


def test_empty_hypothesis_is_all_deletions():
    report = score({"u": "a b c"}, {"u": ""}, bootstrap=0)
    assert (report.substitutions, report.deletions, report.insertions) == (0, 3, 0)
    assert report.wer == pytest.approx(1.0)
    assert report.missing_ids == []  # present but empty is not missing


def test_empty_reference_counts_hypothesis_words_as_insertions():
    refs = {"empty": "", "ok": "a b", "silent": "  "}
    hyps = {"empty": "uh oh", "ok": "a b", "silent": ""}
    report = score(refs, hyps, bootstrap=0)
    assert report.insertions == 2
    assert report.wer == pytest.approx(2 / 2)
    assert report.empty_refs == 2
    assert report.empty_ref_insertions == 2
    # Empty references have no WER of their own, so the mean is over "ok" alone.
    assert report.utterances_in_mean == 1
    assert report.mean_utterance_wer == 0.0
    rows = {row["id"]: row for row in report.per_utterance}
    assert rows["empty"]["wer"] is None
    assert rows["empty"]["insertions"] == 2
    assert report.cer["insertions"] == len("uh oh")


def test_only_empty_references_have_no_wer_but_do_not_crash():
    report = score({"a": "", "b": ""}, {"a": "x", "b": ""}, bootstrap=100)
    assert report.wer is None
    assert report.insertions == 1
    assert report.bootstrap is None
    assert "WER n/a" in report.summary()


def test_missing_hypotheses_are_deletions_and_listed():
    refs = {"a": "one two", "b": "three four five", "c": "six"}
    report = score(refs, {"a": "one two"}, bootstrap=0)
    assert report.missing_ids == ["b", "c"]
    assert report.deletions == 4
    assert report.wer == pytest.approx(4 / 6)
    assert [row["missing_hyp"] for row in report.per_utterance] == [False, True, True]
    assert "missing hypotheses: 2" in report.summary()


def test_extra_hypotheses_are_listed_and_do_not_change_the_score():
    refs = {"a": "one two", "b": "three"}
    hyps = {"a": "one too", "b": "three"}
    base = score(refs, hyps, bootstrap=0)
    extra = score(refs, {**hyps, "zz": "noise noise", "yy": "more"}, bootstrap=0)
    assert extra.extra_ids == ["zz", "yy"]
    assert extra.to_dict()["extra_count"] == 2
    assert (extra.wer, extra.insertions, extra.utterances) == (base.wer, base.insertions, 2)


def test_per_utterance_rows_are_normalised_and_consistent():
    rows = per_utterance({"u": "The cat, sat!"}, {"u": "the CAT"}, "basic")
    assert rows == [
        {
            "id": "u",
            "ref": "the cat sat",
            "hyp": "the cat",
            "ref_words": 3,
            "hyp_words": 2,
            "substitutions": 0,
            "deletions": 1,
            "insertions": 0,
            "hits": 2,
            "errors": 1,
            "wer": pytest.approx(1 / 3),
            "missing_hyp": False,
        }
    ]


def test_newlines_separate_words():
    report = score({"u": "a\nb"}, {"u": "a b"}, normalizer="none", bootstrap=0)
    assert report.wer == 0.0


# ----------------------------------------------------------------------------- normalisers


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Hello, World!", "hello world"),
        ("Don't STOP", "don't stop"),
        ("don\u2019t", "don't"),  # typographic apostrophe = ASCII apostrophe
        ("'quoted' words", "quoted words"),
        ("the students' books", "the students books"),
        ("well-known \u2014 fact.", "well known fact"),
        ("\u00c7a va? \u00abOui\u00bb !", "\u00e7a va oui"),
        ("\u00bfQu\u00e9 tal?", "qu\u00e9 tal"),
        ("\u4f60\u597d\u3002\u4e16\u754c", "\u4f60\u597d \u4e16\u754c"),  # CJK full stop
        ("a\r\nb   c\t", "a b c"),
        ("", ""),
    ],
)
def test_basic_normalizer(raw, clean):
    assert normalize(raw, "basic") == clean


def test_none_normalizer_only_fixes_spacing():
    assert normalize("  Hello,   World!\r\n", "none") == "Hello, World!"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Mr. Smith", "mister smith"),
        ("Dr. Jones", "doctor jones"),
        ("twenty five dollars", "$25"),
        ("one oh one", "101"),
        ("The colour of the centre", "the color of the center"),
        ("I'm gonna go", "i am going to go"),
        ("um hello [noise] (laughs)", "hello"),
        ("", ""),
    ],
)
def test_whisper_normalizer(raw, clean):
    assert normalize(raw, "whisper") == clean


def test_whisper_normalizer_forgives_what_basic_counts():
    refs = {"u": "Mr. Smith paid twenty dollars for the colour print"}
    hyps = {"u": "mister smith paid $20 for the color print"}
    assert score(refs, hyps, normalizer="whisper", bootstrap=0).wer == 0.0
    assert score(refs, hyps, normalizer="basic", bootstrap=0).wer > 0.0


def test_unknown_normalizer_is_a_user_error():
    with pytest.raises(AudioLLMError, match="none, basic, whisper"):
        normalize("x", "fancy")
    with pytest.raises(AudioLLMError, match="unknown normalizer"):
        score({"a": "x"}, {"a": "x"}, normalizer="fancy")


# ----------------------------------------------------------------------------- independent check


def _random_pairs(count: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "d", "e"]
    refs, hyps = {}, {}
    for i in range(count):
        # A few empty references and hypotheses on purpose.
        refs[f"u{i}"] = " ".join(rng.choices(vocab, k=rng.choice([0, *range(1, 13)])))
        hyps[f"u{i}"] = " ".join(rng.choices(vocab, k=rng.randint(0, 14)))
    return refs, hyps


def test_agrees_with_independent_edit_distance():
    refs, hyps = _random_pairs(300, seed=1)
    report = score(refs, hyps, normalizer="none", bootstrap=0)
    distances = [_edit_distance(refs[k].split(), hyps[k].split()) for k in refs]
    total_words = sum(len(r.split()) for r in refs.values())
    assert report.errors == sum(distances)
    assert report.wer == pytest.approx(sum(distances) / total_words, abs=1e-9)
    for row, distance in zip(report.per_utterance, distances, strict=True):
        assert row["errors"] == distance, row["id"]
        # The counts must describe a real alignment of both word sequences.
        assert row["hits"] + row["substitutions"] + row["deletions"] == row["ref_words"]
        assert row["hits"] + row["substitutions"] + row["insertions"] == row["hyp_words"]
    assert report.empty_refs > 0  # the draw did exercise empty references


def test_agrees_with_torchmetrics():
    from torchmetrics.functional.text import word_error_rate

    refs, hyps = _random_pairs(300, seed=2)
    report = score(refs, hyps, normalizer="none", bootstrap=0)
    ids = list(refs)
    expected = word_error_rate([hyps[k] for k in ids], [refs[k] for k in ids]).item()
    assert report.wer == pytest.approx(expected, rel=1e-6)  # torchmetrics returns float32


# ----------------------------------------------------------------------------- bootstrap, buckets


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    refs, hyps = _random_pairs(200, seed=3)
    first = score(refs, hyps, bootstrap=500, seed=7)
    again = score(refs, hyps, bootstrap=500, seed=7)
    other = score(refs, hyps, bootstrap=500, seed=8)
    b = first.bootstrap
    assert b["low"] < first.wer < b["high"]
    assert (b["low"], b["high"]) == (again.bootstrap["low"], again.bootstrap["high"])
    assert (b["low"], b["high"]) != (other.bootstrap["low"], other.bootstrap["high"])
    assert b["resamples"] == 500
    assert score(refs, hyps, bootstrap=0).bootstrap is None


def test_bootstrap_of_a_perfect_system_is_zero_width():
    refs = {f"u{i}": "a b c" for i in range(20)}
    report = score(refs, dict(refs), bootstrap=200)
    assert (report.bootstrap["low"], report.bootstrap["high"]) == (0.0, 0.0)


def test_wer_by_duration_bucket():
    refs = {"short": "a b", "mid": "c d e f", "long": "g", "unknown": "h"}
    hyps = {"short": "a x", "mid": "c d e f", "long": "", "unknown": "h"}
    durations = {"short": 2.0, "mid": 5.0, "long": 31.0}  # 5.0 falls in [5,10)
    report = score(refs, hyps, durations=durations, bootstrap=0)
    buckets = {b["bucket"]: b for b in report.by_duration}
    assert buckets["[0,5)"]["wer"] == pytest.approx(1 / 2)
    assert buckets["[5,10)"]["utterances"] == 1
    assert buckets["[5,10)"]["wer"] == 0.0
    assert buckets["[30,inf)"]["wer"] == 1.0
    assert buckets["[10,20)"]["utterances"] == 0
    assert buckets["[10,20)"]["wer"] is None
    assert report.durations_unknown == 1
    assert score(refs, hyps, bootstrap=0).by_duration is None


# ----------------------------------------------------------------------------- reading files


def test_read_kaldi_text_with_empty_transcript(tmp_path):
    path = tmp_path / "text"
    path.write_text("\ufeffutt1 HELLO  there\nutt2\n\nutt3   x\n", encoding="utf-8")
    assert read_texts(path) == {"utt1": "HELLO  there", "utt2": "", "utt3": "x"}


def test_read_jsonl_fields_by_role(tmp_path):
    both = tmp_path / "pairs.txt"  # detected from content, not extension
    both.write_text(
        '{"id": "a", "ref": "the ref", "hyp": "the hyp", "duration": 3.5}\n'
        '{"id": 7, "ref": "", "hyp": "x"}\n'
    )
    assert read_texts(both, role="ref") == {"a": "the ref", "7": ""}
    assert read_texts(both, role="hyp") == {"a": "the hyp", "7": "x"}
    assert read_durations(both) == {"a": 3.5}
    plain = tmp_path / "hyp.jsonl"
    plain.write_text('{"id": "a", "text": "plain"}\n')
    assert read_texts(plain, role="hyp") == {"a": "plain"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a x\na y\n", "already appeared on line 1"),
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', ":2: not valid JSON"),
        ('{"text": "x"}\n', ':1: each JSONL line needs an object with an "id"'),
        ('{"id": "a", "words": "x"}\n', "no transcript field"),
        ('{"id": "a", "text": null}\n', '"text" must be a string'),
    ],
)
def test_bad_transcript_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_text(content)
    with pytest.raises(AudioLLMError, match=message):
        read_texts(path, role="ref")


def test_bad_duration_is_a_user_error(tmp_path):
    path = tmp_path / "dur"
    path.write_text("a 1.5\nb long\n")
    with pytest.raises(AudioLLMError, match=r"dur:2: duration 'long'"):
        read_durations(path)


# ----------------------------------------------------------------------------- command line


def test_cli_kaldi_files_text_and_json(tmp_path, capsys):
    (tmp_path / "ref").write_text("u1 The cat sat on the mat.\nu2 Hello world\n")
    (tmp_path / "hyp").write_text("u1 the cat sit on mat\nu3 stray\n")
    out = tmp_path / "out" / "wer.json"
    files = ["--ref", str(tmp_path / "ref"), "--hyp", str(tmp_path / "hyp")]
    code = main(["wer", *files, "--json", str(out), "--bootstrap", "50", "--seed", "3"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "WER 50.00%" in stdout  # (1 S + 1 D + 2 D for missing u2) / 8
    assert "missing hypotheses: 1" in stdout
    assert "u3" in stdout
    data = json.loads(out.read_text())
    assert data["wer"] == pytest.approx(4 / 8)
    assert data["normalizer"] == "basic"
    assert data["missing_ids"] == ["u2"]
    assert data["extra_ids"] == ["u3"]
    assert data["bootstrap"]["resamples"] == 50
    assert data["bootstrap"]["seed"] == 3
    assert [row["id"] for row in data["per_utterance"]] == ["u1", "u2"]


def test_cli_one_jsonl_as_ref_and_hyp_with_durations(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"id": "a", "ref": "The colour red", "hyp": "the color red", "duration": 4}\n'
        '{"id": "b", "ref": "blue sky", "hyp": "blue", "duration": 12}\n'
    )
    out = tmp_path / "wer.json"
    args = ["wer", "--ref", str(pairs), "--hyp", str(pairs), "--json", str(out)]
    assert main([*args, "--normalizer", "whisper"]) == 0
    data = json.loads(out.read_text())
    assert data["wer"] == pytest.approx(1 / 5)  # colour/color is no error under whisper
    assert data["normalizer"] == "whisper"
    buckets = {b["bucket"]: b["wer"] for b in data["by_duration"]}
    assert buckets["[0,5)"] == 0.0
    assert buckets["[10,20)"] == 0.5
    assert "WER by duration" in capsys.readouterr().out


def test_cli_durations_file_and_custom_buckets(tmp_path):
    (tmp_path / "ref").write_text("a x y\nb z\n")
    (tmp_path / "hyp").write_text("a x y\nb q\n")
    (tmp_path / "dur").write_text("a 1.0\nb 2.5\n")
    out = tmp_path / "wer.json"
    files = ["--ref", str(tmp_path / "ref"), "--hyp", str(tmp_path / "hyp")]
    code = main(
        ["wer", *files, "--durations", str(tmp_path / "dur"), "--buckets", "2", "--json", str(out)]
    )
    assert code == 0
    buckets = {b["bucket"]: b["wer"] for b in json.loads(out.read_text())["by_duration"]}
    assert buckets == {"[0,2)": 0.0, "[2,inf)": 1.0}


def test_cli_exit_codes(tmp_path, capsys):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.write_text("a x\nb y\n")
    hyp.write_text("a x\n")
    base = ["wer", "--ref", str(ref), "--hyp", str(hyp)]
    assert main([*base, "--bootstrap", "0"]) == 0
    assert main([*base, "--strict"]) == 1  # "b" has no hypothesis
    assert main(["wer", "--ref", str(tmp_path / "nope"), "--hyp", str(hyp)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("")
    assert main(["wer", "--ref", str(tmp_path / "empty"), "--hyp", str(hyp)]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*base, "--normalizer", "fancy"])
    assert exc.value.code == 2
