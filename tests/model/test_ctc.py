"""Joint CTC/LLM decoding: exact CTC prefix probabilities, and what they do to a decode."""

import itertools
import json
import math

import pytest
import torch
import yaml

from audio_llm.errors import AudioLLMError
from audio_llm.model.build import build_audio_llm
from audio_llm.model.ctc import CTCPrefixScorer, ctc_decoding
from tests.helpers import generation_batch

TOKENS, BLANK, T = 3, 3, 5  # token classes 0..2, blank last


def _collapse(path: tuple[int, ...]) -> tuple[int, ...]:
    merged = [s for i, s in enumerate(path) if i == 0 or s != path[i - 1]]
    return tuple(s for s in merged if s != BLANK)


def _brute(log_probs: torch.Tensor, prefix: tuple[int, ...], exact: bool) -> float:
    """log P(transcript starts with / equals `prefix`), summed over every alignment path."""
    total = 0.0
    for path in itertools.product(range(TOKENS + 1), repeat=T):
        out = _collapse(path)
        if (out == prefix) if exact else (out[: len(prefix)] == prefix):
            total += math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
    return math.log(total)


@pytest.mark.parametrize("prefix", [(), (1,), (2, 2), (0, 2), (1, 0, 1)])
def test_prefix_and_full_probabilities_match_every_alignment_summed(prefix):
    log_probs = torch.randn(1, T, TOKENS + 1, generator=torch.Generator().manual_seed(3))
    log_probs = log_probs.log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs, torch.tensor([T]), 0.5, eos=[])
    r_nonblank, r_blank, prefix_logp = scorer._state(0, prefix)  # built token by token
    assert prefix_logp == pytest.approx(_brute(log_probs[0], prefix, exact=False), abs=1e-5)
    full = float(torch.logaddexp(r_nonblank[-1], r_blank[-1]))
    assert full == pytest.approx(_brute(log_probs[0], prefix, exact=True), abs=1e-5)
    if prefix:  # and it is the probability torch's CTC loss gives the same transcript
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            torch.tensor([prefix]),
            torch.tensor([T]),
            torch.tensor([len(prefix)]),
            blank=BLANK,
            reduction="sum",
        )
        assert full == pytest.approx(-float(loss), abs=1e-5)


def _peaked(path: list[int], classes: int) -> torch.Tensor:
    """CTC log-probs [1, T, classes] that put 0.9 on `path`'s symbol at each position."""
    probs = torch.full((len(path), classes), 0.1 / (classes - 1))
    probs[torch.arange(len(path)), torch.tensor(path)] = 0.9
    return probs.log()[None]


def _greedy(scorer: CTCPrefixScorer, llm_scores, eos: int, limit: int = 12) -> list[int]:
    ids = torch.zeros(1, 0, dtype=torch.long)
    while ids.shape[1] < limit:
        token = int(scorer(ids, llm_scores(ids)).argmax(-1))
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return ids[0].tolist()


def test_the_ctc_head_stops_an_llm_that_loops():
    # 4 token classes (3 is end-of-sequence, which CTC never emits) + blank (index 4);
    # the audio says "1 2 2" (a blank between the two 2s, as CTC needs)
    blank, eos = 4, 3
    log_probs = _peaked([blank, 1, 1, blank, 2, blank, 2, 2, blank], 5)

    def looping_llm(ids):  # always prefers 2 over everything, never ends
        scores = torch.zeros(1, 4)
        scores[0, 2] = 2.0
        return scores

    joint = CTCPrefixScorer(log_probs, torch.tensor([9]), 0.5, [eos])
    assert _greedy(joint, looping_llm, eos) == [1, 2, 2]
    # with little weight on CTC the loop wins, until 9 positions hold no sixth 2 (five need
    # 9: a blank between each two) and only ending is left
    weak = CTCPrefixScorer(log_probs, torch.tensor([9]), 0.01, [eos])
    assert _greedy(weak, looping_llm, eos) == [2] * 5


def test_a_weight_outside_0_1_is_refused():
    with pytest.raises(AudioLLMError, match=r"\(0, 1\]"):
        CTCPrefixScorer(torch.zeros(1, 2, 3), torch.tensor([2]), 1.5, [0])


@pytest.fixture(scope="module")
def ctc_model(model_config):
    torch.manual_seed(0)
    model = build_audio_llm(model_config, ctc_weight=1.0).eval()
    with torch.no_grad():
        model.ctc_blank.normal_()
    return model


@pytest.mark.parametrize("beams", [1, 3])
def test_joint_decoding_of_a_clip_is_the_same_alone_and_in_a_batch(ctc_model, beams):
    """Rows of a beam search map to their own clip's CTC scores (clip = row // beams)."""
    features = torch.randn(3, 80, 300, generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 5, "num_beams": beams, "decoding": ctc_decoding(0.5)}
    both = ctc_model.generate(**generation_batch(ctc_model, [300, 120, 200], features), **kwargs)
    alone = ctc_model.generate(
        **generation_batch(ctc_model, [120], features[1:2, :, :120]), **kwargs
    )
    assert both[1] == alone[0]
    llm_only = ctc_model.generate(
        **generation_batch(ctc_model, [300, 120, 200], features), max_new_tokens=5
    )
    assert all(isinstance(t, int) for row in both for t in row) and len(llm_only) == 3


def test_joint_decoding_needs_a_ctc_head_and_a_weight_in_0_1(model_config, ctc_model):
    model = build_audio_llm(model_config).eval()
    features = torch.randn(1, 80, 120)
    with pytest.raises(AudioLLMError, match="train.ctc_weight > 0"):
        batch = generation_batch(model, [120], features)
        model.generate(**batch, max_new_tokens=2, decoding=ctc_decoding(0.3))
    assert ctc_decoding(0.0) == ()  # weight 0: the LLM alone
    for weight in (-0.1, 1.5):  # never silently the LLM alone
        with pytest.raises(AudioLLMError, match=r"in \[0, 1\]"):
            ctc_decoding(weight)


def test_cli_decodes_jointly_from_a_run_and_a_bundle(ctc_model, model_config, tmp_path, capsys):
    """`transcribe --ctc-weight` loads the CTC head a run exported; `export` bundles it; a run
    without one is refused with the reason."""
    import numpy as np
    import soundfile as sf

    from audio_llm.cli import main
    from audio_llm.evaluation.export import export_bundle, export_weights, load_for_inference

    run = tmp_path / "run"
    export_weights(ctc_model, run / "export")
    config = {"model": vars(model_config), "train": {"stage": 1, "ctc_weight": 1.0}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t = np.arange(3 * 16000) / 16000
    sf.write(tmp_path / "a.wav", (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    args = ["transcribe", "--run", str(run), str(tmp_path / "a.wav"), "--max-new-tokens", "4"]
    assert main([*args, "--ctc-weight", "0.4", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"], str)
    loaded = load_for_inference(run=run)
    assert torch.equal(loaded.ctc_blank.detach(), ctc_model.ctc_blank.detach())
    assert loaded.aux_heads["ctc"].weight == 0 and not loaded.loss_heads()  # decoding only

    bundle = export_bundle(run, tmp_path / "bundle")
    listed = json.loads((bundle / "audio_llm.json").read_text())["ctc_blank"]
    assert listed == "ctc_blank.safetensors"
    again = load_for_inference(export=bundle)
    assert torch.equal(again.ctc_blank.detach(), ctc_model.ctc_blank.detach())

    (run / "export" / "ctc_blank.safetensors").unlink()
    assert main([*args, "--ctc-weight", "0.4"]) == 2
    assert "train.ctc_weight > 0" in capsys.readouterr().err


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of one tensor element to the host (`int(t)`, `float(t)`, `if t:`): on a GPU
    each makes the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_the_joint_scorer_reads_no_scalar_per_beam_row():
    """A joint CTC step reads its rows' values to the host together, not one element per row
    (beam 4 x 8 clips was ~100 waits for the device per generated token)."""
    g = torch.Generator().manual_seed(0)
    clips, beams, vocab = 8, 4, 12
    log_probs = torch.randn(clips, 6, vocab + 1, generator=g).log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs, torch.full((clips,), 6), 0.5, [vocab - 1], beams)
    input_ids = torch.randint(0, vocab - 1, (clips * beams, 2), generator=g)
    scores = torch.randn(clips * beams, vocab, generator=g)
    scorer(input_ids, scores)  # the first step rebuilds the prefix states: not what is counted
    input_ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], 1)
    with _ScalarReads() as mode:
        out = scorer(input_ids, torch.randn(clips * beams, vocab, generator=g))
    assert mode.reads == 0
    assert torch.isfinite(out).any(dim=1).all()
