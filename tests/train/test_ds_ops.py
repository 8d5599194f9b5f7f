import logging

import pytest

from audio_llm.train.ds_ops import ENV, normalize_cuda_arch_list, normalized_arch_list


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9.0a", "9.0"),  # the GPU image's setting (H100/H200)
        ("10.0a", "10.0"),  # Blackwell
        ("10.0f", "10.0"),  # CUDA 12.9+ family-specific
        ("9.0a+PTX", "9.0+PTX"),
        ("8.0;9.0a", "8.0;9.0"),
        ("8.0 9.0a 10.0a+PTX", "8.0;9.0;10.0+PTX"),
        ("9.0;9.0a", "9.0"),  # duplicates after the fix are dropped, first kept
        ("9.0a;Hopper", "9.0;Hopper"),  # named arches are not ours to rewrite
    ],
)
def test_suffixed_entries_become_what_deepspeed_parses(value, expected):
    assert normalized_arch_list(value) == expected


def test_environment_is_fixed_in_place_with_one_log_line(caplog):
    env = {ENV: "9.0a"}
    with caplog.at_level(logging.WARNING, logger="audio_llm.train.ds_ops"):
        assert normalize_cuda_arch_list(env) == "9.0"
    assert env[ENV] == "9.0"
    assert len(caplog.records) == 1 and "'9.0a' -> '9.0'" in caplog.text


@pytest.mark.parametrize(
    "env", [{}, {ENV: ""}, {ENV: "9.0"}, {ENV: "8.0 9.0+PTX"}, {ENV: "8.6;8.6"}]
)
def test_unset_or_parsable_lists_are_left_alone(env, caplog):
    before = dict(env)
    with caplog.at_level(logging.WARNING, logger="audio_llm.train.ds_ops"):
        assert normalize_cuda_arch_list(env) is None
    assert env == before and not caplog.records


def test_fixed_list_passes_deepspeeds_own_parser(monkeypatch):
    """DeepSpeed's CUDA op builder (the code that raised on '9.0a') accepts the result."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    class Probe(CUDAOpBuilder):
        NAME = "probe"

        def absolute_name(self):
            return "probe"

        def sources(self):
            return []

    builder = Probe("probe")
    builder.jit_mode = False  # cross-compile path: reads the variable, needs no GPU
    monkeypatch.setenv(ENV, "9.0a")
    with pytest.raises(ValueError, match="0a"):
        builder.compute_capability_args()
    monkeypatch.setenv(ENV, "9.0a")
    normalize_cuda_arch_list()
    flags = builder.compute_capability_args()
    assert "-gencode=arch=compute_90,code=sm_90" in flags
