import pytest

from audio_llm.cli import main
from audio_llm.config import DEFAULT_LORA_REGEX
from audio_llm.errors import AudioLLMError
from audio_llm.model.lora import (
    ENCODER,
    LLM_LAYERS,
    LLM_OTHER,
    PROJECTOR,
    VISION,
    check_targets,
    meta_model,
    target_report,
)

SEVEN = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return meta_model(str(tiny_models["whisper"]), str(tiny_models["qwen2vl"]))


def test_default_regex_hits_all_seven_projections_of_every_llm_layer_only(tiny):
    report = check_targets(tiny, DEFAULT_LORA_REGEX)
    for component in (ENCODER, PROJECTOR, VISION, LLM_OTHER):
        assert report.matched.get(component, []) == []
    names = report.matched[LLM_LAYERS]
    assert len(names) == 7 * report.num_llm_layers
    for layer in range(report.num_llm_layers):
        prefix = f"llm.model.language_model.layers.{layer}."
        assert {n[len(prefix) :] for n in names if n.startswith(prefix)} == SEVEN


@pytest.mark.parametrize("spec", [["q_proj", "v_proj"], r".*(q_proj|v_proj)", r".*_proj"])
def test_generic_specs_hit_whisper_and_are_refused(tiny, spec):
    report = target_report(tiny, spec)
    assert "encoder.whisper.layers.0.self_attn.q_proj" in report.matched[ENCODER]
    with pytest.raises(AudioLLMError, match="outside the LLM's layers: encoder.whisper"):
        check_targets(tiny, spec)


def test_vision_tower_hits_are_refused(tiny):
    with pytest.raises(AudioLLMError, match=r"llm\.model\.visual"):
        check_targets(tiny, r".*(attn\.qkv|self_attn\.q_proj)")


def test_seed_regex_matches_nothing_in_transformers_5_naming(tiny):
    seed_regex = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    with pytest.raises(AudioLLMError, match="match no LLM projection"):
        check_targets(tiny, seed_regex)


def test_missing_layers_are_named(tiny):
    with pytest.raises(AudioLLMError, match=r"miss LLM layers \[1\]"):
        check_targets(tiny, r".*language_model\.layers\.0\.self_attn\.q_proj")


def test_wrapper_only_names_are_refused_because_peft_sees_llm_names(tiny):
    with pytest.raises(AudioLLMError, match="select different modules inside the LLM"):
        check_targets(tiny, r"llm\.model\.language_model\.layers\.\d+\.mlp\.up_proj")


@pytest.mark.parametrize(("llm", "layers"), [("qwen2-vl-2b", 28), ("qwen2-vl-7b", 28)])
def test_guard_on_the_real_architectures(llm, layers):
    model = meta_model("whisper-large-v3", llm)
    assert len(model.encoder.whisper.layers) == 32
    report = check_targets(model, DEFAULT_LORA_REGEX)
    assert len(report.matched[LLM_LAYERS]) == 7 * layers == 196
    assert report.matched.get(ENCODER, []) == [] and report.matched.get(VISION, []) == []
    generic = target_report(model, ["q_proj", "v_proj"])
    assert len(generic.matched[ENCODER]) == 64  # 32 Whisper layers x (q, v)


def test_cli_counts_and_exit_codes(tiny_models, capsys):
    args = [
        "lora-targets",
        "--encoder",
        str(tiny_models["whisper"]),
        "--llm",
        str(tiny_models["qwen2vl"]),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LLM layers hit: 2/2, modules per layer: [7]" in out
    assert "llm.model.language_model.layers.1.mlp.down_proj" in out
    assert main([*args, "--regex", r".*(q_proj|v_proj)"]) == 2
    assert "encoder.whisper.layers.0.self_attn" in capsys.readouterr().err
    assert main([*args, "--names", "q_proj,v_proj", "--quiet"]) == 2


def test_cli_on_published_configs(capsys):
    assert (
        main(["lora-targets", "--encoder", "whisper-large-v3", "--llm", "qwen2-vl-2b", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "LLM layers hit: 28/28, modules per layer: [7]" in out
    assert main(["lora-targets", "--encoder", "nope", "--llm", "qwen2-vl-2b"]) == 2
