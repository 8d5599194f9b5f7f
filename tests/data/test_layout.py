"""data.layout: the pipeline's one view of the model."""

from audio_llm.data import layout_of


def test_the_layout_counts_audio_positions_as_the_model_does(model):
    """`layout_of` is the pipeline's one view of the model: its audio span for a clip is the
    model's `num_audio_tokens`, from mel frames (audio, mel shards) or encoder frames."""
    layout = layout_of(model)
    assert layout.stack == model.projector.stack
    for mel in (1, 2, 3, 159, 160, 161, 2999, 3000):
        enc = (mel - 1) // 2 + 1
        assert layout.audio_tokens(mel, "audio") == model.num_audio_tokens(mel)
        assert layout.audio_tokens(enc, "encoder") == model.num_audio_tokens(mel)
