"""train.state: the RNG streams a checkpoint saves come back as they were, so a resumed run draws
the same random numbers as one that never stopped."""

import random

import numpy as np
import torch


def test_restored_rng_streams_draw_what_the_saved_ones_would_have():
    from audio_llm.train.state import _rng_state, _set_rng_state

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = _rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # a restarted process's streams
    _set_rng_state(saved)
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == expected[:2]
    assert torch.equal(drawn[2], expected[2])
