import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from audio_llm.cli import main
from audio_llm.model.tiny import QWEN2VL_SPECIAL_TOKENS, vocabulary, write_tiny_models


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_models):
    again = write_tiny_models(tmp_path / "again", seed=0)
    assert _digest(again["whisper"]) == _digest(tiny_models["whisper"])
    assert _digest(again["qwen2vl"]) == _digest(tiny_models["qwen2vl"])
    other = write_tiny_models(tmp_path / "other", seed=1)
    assert _digest(other["qwen2vl"]) != _digest(tiny_models["qwen2vl"])


def test_round_trip_through_from_pretrained(tiny_models):
    whisper = WhisperForConditionalGeneration.from_pretrained(tiny_models["whisper"])
    fe = WhisperFeatureExtractor.from_pretrained(tiny_models["whisper"])
    assert fe.feature_size == whisper.config.num_mel_bins
    assert whisper.config.max_source_positions == 1500  # the real 30 s window

    llm = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["qwen2vl"])
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])
    text = llm.config.text_config
    assert (
        sum(text.rope_parameters["mrope_section"])
        == text.hidden_size // text.num_attention_heads // 2
    )
    assert len(tok) <= text.vocab_size
    ids = tok("the dog runs", return_tensors="pt")["input_ids"]
    assert torch.isfinite(llm(input_ids=ids).logits).all()
    assert hasattr(llm.model, "language_model") and hasattr(llm.model, "visual")


def test_tokenizer_has_qwen2vl_special_tokens_and_chat_template(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])
    vocab = tok.get_vocab()
    assert all(t in vocab for t in QWEN2VL_SPECIAL_TOKENS)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    assert tok.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_is_subword_not_word_level(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])
    lengths = [len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in vocabulary()]
    assert len(vocabulary()) >= 200
    assert sum(n > 1 for n in lengths) > len(lengths) // 4  # many words split into pieces
    assert (
        tok.decode(tok("zebra quokka 42!")["input_ids"]) == "zebra quokka 42!"
    )  # any text encodes


def test_cli_writes_both_folders(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path), "--seed", "3", "--llm-layers", "1"]) == 0
    assert (tmp_path / "whisper" / "preprocessor_config.json").is_file()
    assert (tmp_path / "qwen2vl" / "tokenizer.json").is_file()
    llm = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "qwen2vl")
    assert llm.config.text_config.num_hidden_layers == 1


def test_frozen_random_whisper_passes_its_conv_features_through(tiny_models):
    """The tiny encoder stands in for a pretrained one, so its random layers must not scramble
    the audio: its output frames stay close to (layer-normed) conv features. At full-scale
    random init (WHISPER_PASSTHROUGH = 1) the mean cosine here is about 0.25."""
    from audio_llm.model.encoder import AudioEncoder, load_whisper_encoder

    whisper = load_whisper_encoder(tiny_models["whisper"])
    torch.manual_seed(0)
    mel = torch.randn(1, whisper.config.num_mel_bins, 400) * 0.5
    with torch.no_grad():
        conv = torch.nn.functional.gelu(whisper.conv1(mel))
        conv = torch.nn.functional.gelu(whisper.conv2(conv)).transpose(1, 2)
        out, _ = AudioEncoder(whisper, varlen=True)(mel, torch.tensor([400]))
    ref = torch.nn.functional.layer_norm(conv, conv.shape[-1:])
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean() > 0.8


def test_like_writes_published_shapes_that_the_training_path_loads_and_runs(tmp_path):
    """`--like` at the real widths/8 and one layer per stack (the CPU can hold that): the
    folders load through build_audio_llm, the shapes are the published ones scaled, and a
    forward + backward runs with LoRA."""
    from audio_llm.config import LoraConfig, ModelConfig
    from audio_llm.model.build import build_audio_llm
    from tests.helpers import training_batch

    like = ["tiny", "--like", "whisper-large-v3,qwen2-vl-2b", "--out", str(tmp_path)]
    assert main([*like, "--layers", "1", "--shrink", "8", "--device", "cpu"]) == 0
    cfg = ModelConfig(
        encoder=str(tmp_path / "whisper"),
        llm=str(tmp_path / "qwen2vl"),
        dtype="float32",
        varlen_encoder=True,
        stack_factor=8,
        projector="mlp",
    )
    model = build_audio_llm(cfg, LoraConfig())
    whisper, text = model.encoder.whisper.config, model.llm.config.text_config
    assert (whisper.num_mel_bins, whisper.d_model, whisper.encoder_layers) == (128, 160, 1)
    assert model.feature_extractor.feature_size == 128
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (151936, 192, 1120)
    assert (text.num_attention_heads, text.num_key_value_heads) == (12, 2)
    assert model.llm.config.tie_word_embeddings and len(model.tokenizer) <= text.vocab_size
    saved = json.loads((tmp_path / "qwen2vl" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    embed = model.llm.get_input_embeddings().weight
    assert 0.015 < float(embed.std()) < 0.025  # drawn at initializer_range, not left empty

    batch = training_batch(model, [300, 170], ["the red fox runs", "hello world"])
    batch["input_features"] = torch.randn(2, 128, 300)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 10 < float(loss.detach()) < 14  # ln(151936) = 11.9: random
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_like_published_sizes_match_the_hub_configs():
    """Full-size configs (no weights): the numbers the hub's config.json files give."""
    from audio_llm.model.tiny import build_tokenizer, like_qwen2vl_config, like_whisper_config

    whisper = like_whisper_config("whisper-large-v3")
    assert (whisper.num_mel_bins, whisper.d_model, whisper.encoder_layers) == (128, 1280, 32)
    tok = build_tokenizer()
    two = like_qwen2vl_config("qwen2-vl-2b", tok).text_config
    seven = like_qwen2vl_config("qwen2-vl-7b", tok)
    assert (two.hidden_size, two.num_hidden_layers, two.intermediate_size) == (1536, 28, 8960)
    assert (two.num_attention_heads, two.num_key_value_heads, two.vocab_size) == (12, 2, 151936)
    text7 = seven.text_config
    assert (text7.hidden_size, text7.intermediate_size, text7.vocab_size) == (3584, 18944, 152064)
    assert (text7.num_attention_heads, text7.num_key_value_heads) == (28, 4)
    assert not seven.tie_word_embeddings
    assert seven.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < 512


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--like", "whisper-large-v3"], "name one encoder"),
        (["--like", "whisper-large-v3,qwen2-vl-3b"], "unknown: qwen2-vl-3b"),
        (["--like", "whisper-large-v3,qwen2-vl-2b", "--shrink", "7"], "not divisible by 7"),
        (["--like", "whisper-large-v3,qwen2-vl-2b", "--llm-layers", "1"], "drop the tiny size"),
        (["--layers", "2"], "go with --like"),
    ],
)
def test_like_bad_arguments_fail_with_a_message(tmp_path, capsys, args, message):
    assert main(["tiny", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "qwen2vl").exists()
