import pytest
import torch

from audio_llm.errors import AudioLLMError
from audio_llm.model.projector import AudioProjector


@pytest.mark.parametrize(("stack", "kind"), [(1, "linear"), (4, "linear"), (3, "mlp")])
def test_stacking_shapes_and_lengths(stack, kind):
    proj = AudioProjector(8, 16, stack=stack, kind=kind)
    out, lengths = proj(torch.randn(2, 10, 8), torch.tensor([10, 5]))
    assert out.shape == (2, -(-10 // stack), 16)
    assert lengths.tolist() == [-(-10 // stack), -(-5 // stack)]


def test_frames_past_the_end_never_leak_into_valid_positions():
    proj = AudioProjector(4, 6, stack=4)
    frames = torch.randn(1, 8, 4)
    noisy = frames.clone()
    noisy[:, 6:] = 1e6  # padding beyond length 6
    a, _ = proj(frames, torch.tensor([6]))
    b, _ = proj(noisy, torch.tensor([6]))
    torch.testing.assert_close(a[:, :2], b[:, :2])


def test_stack_concatenates_consecutive_frames():
    proj = AudioProjector(2, 3, stack=2)
    frames = torch.arange(8.0).reshape(1, 4, 2)
    stacked_input = torch.tensor([[[0.0, 1, 2, 3], [4, 5, 6, 7]]])
    out, _ = proj(frames, torch.tensor([4]))
    torch.testing.assert_close(out, proj.net(stacked_input))


def test_wrong_width_is_refused():
    with pytest.raises(AudioLLMError, match="width 5 but the projector expects 8"):
        AudioProjector(8, 16)(torch.randn(1, 3, 5), torch.tensor([3]))


def test_save_load_round_trip_and_shape_check(tmp_path):
    proj = AudioProjector(8, 16, stack=2, kind="mlp")
    proj.save(tmp_path / "p.safetensors")
    again = AudioProjector(8, 16, stack=2, kind="mlp")
    again.load(tmp_path / "p.safetensors")
    for key, value in proj.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    with pytest.raises(AudioLLMError, match="needs .* check model"):
        AudioProjector(8, 32, stack=2, kind="mlp").load(tmp_path / "p.safetensors")
    with pytest.raises(AudioLLMError, match="do not exist"):
        again.load(tmp_path / "missing.safetensors")


def test_conv_context_output_does_not_depend_on_batch_padding():
    torch.manual_seed(0)
    proj = AudioProjector(8, 16, stack=4, kind="mlp", context="conv").eval()
    clip = torch.randn(1, 37, 8)
    alone, _ = proj(clip, torch.tensor([37]))
    batch = torch.randn(2, 90, 8) * 100  # garbage past the clip's end, and a longer neighbour
    batch[0, :37] = clip[0]
    together, lengths = proj(batch, torch.tensor([37, 90]))
    assert lengths.tolist() == [10, 23]
    torch.testing.assert_close(together[0, :10], alone[0], rtol=1e-5, atol=1e-5)


def test_conv_context_sees_neighbouring_frames():
    torch.manual_seed(0)
    proj = AudioProjector(8, 16, stack=1, kind="linear", context="conv").eval()
    frames = torch.randn(1, 200, 8)
    a, _ = proj(frames, torch.tensor([200]))
    changed = frames.clone()
    changed[0, 100] += torch.randn(8)  # not a constant shift, which LayerNorm would remove
    b, _ = proj(changed, torch.tensor([200]))
    moved = (a - b).abs().sum(-1)[0] > 1e-6
    # kernel 5 at dilations 1, 2, 4, 8: +-30 frames, and nothing beyond
    assert moved[70:131].all() and not moved[:70].any() and not moved[131:].any()


def test_context_kind_is_part_of_the_saved_shape(tmp_path):
    proj = AudioProjector(8, 16, stack=2, kind="mlp", context="conv")
    proj.save(tmp_path / "p.safetensors")
    again = AudioProjector(8, 16, stack=2, kind="mlp", context="conv")
    again.load(tmp_path / "p.safetensors")
    for key, value in proj.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    with pytest.raises(AudioLLMError, match="context=none"):
        AudioProjector(8, 16, stack=2, kind="mlp").load(tmp_path / "p.safetensors")
    with pytest.raises(AudioLLMError, match="projector_context must be"):
        AudioProjector(8, 16, context="gru")


def test_a_narrow_context_stack_runs_at_its_width_and_returns_the_frames_width(tmp_path):
    torch.manual_seed(0)
    proj = AudioProjector(24, 16, stack=2, kind="mlp", context="conv", context_width=8).eval()
    convs = [tuple(c.weight.shape) for c in proj.context.convs]
    assert convs == [(8, 8, 5)] * 4  # the convolutions are 8 wide, not 24
    assert tuple(proj.context.inp.weight.shape) == (8, 24)
    assert tuple(proj.context.out.weight.shape) == (24, 8)
    out, lengths = proj(torch.randn(1, 11, 24), torch.tensor([11]))
    assert tuple(out.shape) == (1, 6, 16) and lengths.tolist() == [6]
    proj.save(tmp_path / "p.safetensors")
    with pytest.raises(AudioLLMError, match="context width 24"):
        AudioProjector(24, 16, stack=2, kind="mlp", context="conv").load(tmp_path / "p.safetensors")
