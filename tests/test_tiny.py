import hashlib

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from audio_llm.cli import main
from audio_llm.tiny import QWEN2VL_SPECIAL_TOKENS, vocabulary, write_tiny_models


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
    from audio_llm.encoder import AudioEncoder, load_whisper_encoder

    whisper = load_whisper_encoder(tiny_models["whisper"])
    torch.manual_seed(0)
    mel = torch.randn(1, whisper.config.num_mel_bins, 400) * 0.5
    with torch.no_grad():
        conv = torch.nn.functional.gelu(whisper.conv1(mel))
        conv = torch.nn.functional.gelu(whisper.conv2(conv)).transpose(1, 2)
        out, _ = AudioEncoder(whisper, varlen=True)(mel, torch.tensor([400]))
    ref = torch.nn.functional.layer_norm(conv, conv.shape[-1:])
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean() > 0.8
