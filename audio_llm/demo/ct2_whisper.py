"""CTranslate2 Whisper models (`model.bin` + `config.json` + vocabulary) read into transformers
Whisper checkpoints, with our own reader of CTranslate2's binary format.

The layout is the one `ctranslate2.specs.model_spec.ModelSpec._serialize` writes (binary version 6),
all integers little-endian:

    u32 binary version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | u32 x rank shape | u8 dtype id | u32 byte count | bytes
    u32 alias count | per alias: string alias | string name of the variable it repeats

where a string is a u16 length (counting a trailing NUL), the UTF-8 bytes, then the NUL. Variables
are sorted by name; `a/b/c` names a spec's tree. Nothing here imports or runs CTranslate2: the
`ctranslate2` package is a dev dependency, used only by the tests to write models to read back.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import quiet_transformers

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
WHISPER_REVISION = 3
# CTranslate2's DataType enum (include/ctranslate2/types.h), in id order.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# Decoder settings CTranslate2's runtime reads from model.bin: anything but Whisper's own values
# is a model `WhisperForConditionalGeneration` cannot run.
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_STOCK_DECODER = {
    "activation": _GELU,
    "pre_norm": 1,
    "scale_embeddings": 0,
    "alibi": 0,
    "start_from_zero_embedding": 0,
}
# Whisper's special tokens by role; their ids come from the model's own vocabulary.
_SPECIAL = {
    "eos": "<|endoftext|>",
    "start": "<|startoftranscript|>",
    "no_timestamps": "<|notimestamps|>",
    "prev_start": "<|startofprev|>",
    "transcribe": "<|transcribe|>",
    "translate": "<|translate|>",
}
MULTILINGUAL_VOCAB = 51865  # OpenAI's rule: English-only Whisper vocabularies are smaller


@dataclass
class Ct2Model:
    """The variables of a CTranslate2 `model.bin`; an alias maps to the very tensor it repeats."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]


class _Cursor:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.pos = memoryview(data), source, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise AudioLLMError(
                f"{self.source}: truncated (needs {n} bytes at offset {self.pos}, has "
                f"{len(self.data) - self.pos}); fetch the model again"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("<H")))
        if not raw.endswith(b"\0"):
            raise AudioLLMError(f"{self.source}: malformed string at offset {self.pos}")
        return raw[:-1].decode("utf-8")


def read_model_bin(data: bytes, source: str = "model.bin") -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (binary version 6) into tensors."""
    cur = _Cursor(data, source)
    version = cur.uint("<I")
    if version != BINARY_VERSION:
        raise AudioLLMError(
            f"{source}: CTranslate2 binary version {version}, this reader knows version "
            f"{BINARY_VERSION}; convert the model with ctranslate2 4.x"
        )
    spec, revision = cur.string(), cur.uint("<I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(cur.uint("<I")):
        name = cur.string()
        shape = [cur.uint("<I") for _ in range(cur.uint("<B"))]
        type_id, size = cur.uint("<B"), cur.uint("<I")
        if type_id >= len(_DTYPES):
            raise AudioLLMError(f"{source}: variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        # bfloat16 has no numpy dtype: read its bits as uint16 and reinterpret in torch.
        array = np.frombuffer(cur.take(size), dtype="<u2" if dtype == "bfloat16" else dtype)
        if array.size != int(np.prod(shape)):
            raise AudioLLMError(
                f"{source}: variable {name!r} holds {array.size} values, its shape {shape} "
                f"needs {int(np.prod(shape))}"
            )
        tensor = torch.from_numpy(array.copy()).reshape(shape)
        variables[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    aliases = {}
    for _ in range(cur.uint("<I")):
        alias, target = cur.string(), cur.string()
        if target not in variables:
            raise AudioLLMError(f"{source}: alias {alias!r} points at missing {target!r}")
        aliases[alias] = target
        variables[alias] = variables[target]
    if cur.pos != len(data):
        raise AudioLLMError(f"{source}: {len(data) - cur.pos} unexpected bytes after the aliases")
    return Ct2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


@dataclass
class Ct2Whisper:
    """A CTranslate2 Whisper model folder, read: weights, `config.json`, vocabulary (one token per
    id) and, when the folder ships one, the transformers `tokenizer.json` text."""

    model: Ct2Model
    config: dict
    vocabulary: list[str]
    tokenizer_json: str | None
    source: str


def read_ct2_whisper(files: Mapping[str, bytes] | str | Path, source: str = "") -> Ct2Whisper:
    """Read a CTranslate2 Whisper model from a folder or from `{file name: bytes}` (the same files,
    e.g. read out of an archive): `model.bin`, `config.json`, `vocabulary.json` or
    `vocabulary.txt`, and optionally `tokenizer.json`."""
    if not isinstance(files, Mapping):
        folder = Path(files)
        source = source or str(folder)
        names = ("model.bin", "config.json", "vocabulary.json", "vocabulary.txt", "tokenizer.json")
        files = {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}
    source = source or "CTranslate2 model"
    if "model.bin" not in files:
        raise AudioLLMError(f"{source}: no model.bin, not a CTranslate2 model")
    model = read_model_bin(files["model.bin"], f"{source}/model.bin")
    if model.spec != WHISPER_SPEC or model.revision != WHISPER_REVISION:
        raise AudioLLMError(
            f"{source}/model.bin: spec {model.spec} revision {model.revision}, expected "
            f"{WHISPER_SPEC} revision {WHISPER_REVISION} (a CTranslate2 Whisper model)"
        )
    if "vocabulary.json" in files:
        vocabulary = json.loads(files["vocabulary.json"])
    elif "vocabulary.txt" in files:
        # One token per line; CTranslate2 writes a final newline, not an empty last token.
        vocabulary = files["vocabulary.txt"].decode("utf-8").split("\n")
        if vocabulary and vocabulary[-1] == "":
            vocabulary.pop()
    else:
        raise AudioLLMError(f"{source}: no vocabulary.json or vocabulary.txt")
    tokenizer = files.get("tokenizer.json")
    return Ct2Whisper(
        model=model,
        config=json.loads(files.get("config.json", b"{}")),
        vocabulary=vocabulary,
        tokenizer_json=None if tokenizer is None else tokenizer.decode("utf-8"),
        source=source,
    )


class _Variables:
    """A CTranslate2 model's variables taken once each under transformers names: `state` collects
    the renamed tensors, `used` what was taken, so that nothing is left half-converted."""

    def __init__(self, model: Ct2Model, source: str) -> None:
        self.var, self.source = model.variables, source
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.var:
            raise AudioLLMError(f"{self.source}: no variable {name!r}; not a Whisper model")
        self.used.add(name)
        return self.var[name]

    def scalar(self, name: str) -> int:
        return int(self.take(name).item())

    def norm(self, ct2: str, hf: str) -> None:
        self.state[f"{hf}.weight"] = self.take(f"{ct2}/gamma")
        self.state[f"{hf}.bias"] = self.take(f"{ct2}/beta")

    def linear(self, ct2: str, hf: str) -> None:
        self.state[f"{hf}.weight"] = self.take(f"{ct2}/weight")
        self.state[f"{hf}.bias"] = self.take(f"{ct2}/bias")

    def fused(self, ct2: str, hfs: list[str]) -> None:
        """Split a fused linear into equal parts; a part named '*k_proj' has no bias."""
        weights, biases = self.take(f"{ct2}/weight"), self.take(f"{ct2}/bias")
        for hf, weight, bias in zip(
            hfs, weights.chunk(len(hfs)), biases.chunk(len(hfs)), strict=True
        ):
            self.state[f"{hf}.weight"] = weight
            if hf.endswith("k_proj"):
                if bool(bias.any()):
                    raise AudioLLMError(f"{self.source}: {ct2}/bias has a non-zero key bias")
            else:
                self.state[f"{hf}.bias"] = bias

    def layers(self, prefix: str) -> int:
        count = 0
        while f"{prefix}/layer_{count}/ffn/linear_0/weight" in self.var:
            count += 1
        return count


_ENC, _DEC = "model.encoder", "model.decoder"


def whisper_state_dict(model: Ct2Model, source: str = "model.bin") -> tuple[dict, dict]:
    """Map a CTranslate2 Whisper's variables onto `WhisperForConditionalGeneration` names.

    Returns (WhisperConfig keyword arguments for the shapes, state dict). CTranslate2 fuses
    q/k/v of self-attention into one linear and k/v of cross-attention into another, stores
    weights as [out, in] like torch (no transposes) and, since Whisper's k_proj has no bias,
    fills zeros for it in the fused bias; those zeros are checked and dropped. Every weight is
    used once, so a model with anything more or less is refused rather than half-converted.
    """
    v = _Variables(model, source)
    for key, want in _STOCK_DECODER.items():
        name = f"decoder/{key}"
        if name in v.var and v.scalar(name) != want:
            raise AudioLLMError(
                f"{source}: {name} = {int(v.var[name].item())}, transformers' Whisper needs {want}"
            )
    _take_encoder(v)
    _take_decoder(v)
    # Other scalars (alignment heads, ...) only steer CTranslate2's runtime; every tensor must map.
    left = sorted(n for n, t in v.var.items() if n not in v.used and t.dim() > 0)
    if left:
        raise AudioLLMError(f"{source}: {len(left)} variables not understood (first: {left[0]})")
    return _whisper_shapes(v, model.aliases), v.state


def _take_encoder(v: _Variables) -> None:
    """The convolutions, positions and pre-norm self-attention layers of the encoder."""
    for conv in ("conv1", "conv2"):
        v.linear(f"encoder/{conv}", f"{_ENC}.{conv}")
    v.state[f"{_ENC}.embed_positions.weight"] = v.take("encoder/position_encodings/encodings")
    v.norm("encoder/layer_norm", f"{_ENC}.layer_norm")
    for i in range(v.layers("encoder")):
        ct2, hf = f"encoder/layer_{i}", f"{_ENC}.layers.{i}"
        attn = f"{hf}.self_attn"
        v.norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        v.fused(
            f"{ct2}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
        )
        v.linear(f"{ct2}/self_attention/linear_1", f"{attn}.out_proj")
        v.norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        v.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        v.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")


def _take_decoder(v: _Variables) -> None:
    """The embeddings, self- and cross-attention layers and the bias-free output projection."""
    v.state[f"{_DEC}.embed_tokens.weight"] = v.take("decoder/embeddings/weight")
    v.state[f"{_DEC}.embed_positions.weight"] = v.take("decoder/position_encodings/encodings")
    v.norm("decoder/layer_norm", f"{_DEC}.layer_norm")
    for i in range(v.layers("decoder")):
        ct2, hf = f"decoder/layer_{i}", f"{_DEC}.layers.{i}"
        attn, cross = f"{hf}.self_attn", f"{hf}.encoder_attn"
        v.norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        v.fused(
            f"{ct2}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
        )
        v.linear(f"{ct2}/self_attention/linear_1", f"{attn}.out_proj")
        v.norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        v.linear(f"{ct2}/attention/linear_0", f"{cross}.q_proj")
        v.fused(f"{ct2}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"])
        v.linear(f"{ct2}/attention/linear_2", f"{cross}.out_proj")
        v.norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        v.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        v.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    v.state["proj_out.weight"] = v.take("decoder/projection/weight")
    if "decoder/projection/bias" in v.var:
        raise AudioLLMError(
            f"{v.source}: decoder/projection has a bias, Whisper's proj_out has none"
        )


def _whisper_shapes(v: _Variables, aliases: dict[str, str]) -> dict:
    """WhisperConfig keyword arguments read off the mapped weights and the head counts."""
    conv1 = v.state[f"{_ENC}.conv1.weight"]
    return {
        "num_mel_bins": conv1.shape[1],
        "d_model": conv1.shape[0],
        "vocab_size": v.state[f"{_DEC}.embed_tokens.weight"].shape[0],
        "encoder_layers": v.layers("encoder"),
        "decoder_layers": v.layers("decoder"),
        "encoder_attention_heads": v.scalar("encoder/num_heads"),
        "decoder_attention_heads": v.scalar("decoder/num_heads"),
        "encoder_ffn_dim": v.state[f"{_ENC}.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": v.state[f"{_DEC}.layers.0.fc1.weight"].shape[0],
        "max_source_positions": v.state[f"{_ENC}.embed_positions.weight"].shape[0],
        "max_target_positions": v.state[f"{_DEC}.embed_positions.weight"].shape[0],
        # CTranslate2 stores the output projection as an alias when it is the embedding.
        "tie_word_embeddings": aliases.get("decoder/projection/weight")
        == "decoder/embeddings/weight",
    }


def _special_ids(ct2: Ct2Whisper) -> dict[str, int]:
    index = {token: i for i, token in enumerate(ct2.vocabulary)}
    missing = [token for token in _SPECIAL.values() if token not in index]
    if missing:
        raise AudioLLMError(f"{ct2.source}: vocabulary lacks Whisper's {', '.join(missing)}")
    return {role: index[token] for role, token in _SPECIAL.items()}


def whisper_configs(ct2: Ct2Whisper, shapes: dict) -> tuple[WhisperConfig, GenerationConfig]:
    """The model and generation configs: shapes from the weights, special ids from the
    vocabulary, token suppression and alignment heads from CTranslate2's config.json."""
    if len(ct2.vocabulary) != shapes["vocab_size"]:
        raise AudioLLMError(
            f"{ct2.source}: {len(ct2.vocabulary)} vocabulary tokens for {shapes['vocab_size']} "
            "embedding rows"
        )
    ids = _special_ids(ct2)
    tokens = {
        "pad_token_id": ids["eos"],
        "bos_token_id": ids["start"],
        "eos_token_id": ids["eos"],
        "decoder_start_token_id": ids["start"],
    }
    config = WhisperConfig(**shapes, **tokens, scale_embedding=False, begin_suppress_tokens=None)
    multilingual = shapes["vocab_size"] >= MULTILINGUAL_VOCAB
    generation = GenerationConfig(
        **tokens,
        max_length=shapes["max_target_positions"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev_start"],
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,  # 1 s, OpenAI's default
        suppress_tokens=ct2.config.get("suppress_ids") or None,
        begin_suppress_tokens=ct2.config.get("suppress_ids_begin") or None,
        alignment_heads=ct2.config.get("alignment_heads") or None,
    )
    if multilingual:
        lang_ids = ct2.config.get("lang_ids") or []
        generation.lang_to_id = {ct2.vocabulary[i]: i for i in lang_ids}
        generation.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return config, generation


def whisper_tokenizer(ct2: Ct2Whisper) -> WhisperTokenizer:
    """The transformers tokenizer from the shipped `tokenizer.json`, completed with the
    vocabulary's tokens past its end (the timestamps) and checked id by id against the vocabulary
    the model was trained with."""
    if ct2.tokenizer_json is None:
        raise AudioLLMError(f"{ct2.source}: no tokenizer.json to build a tokenizer from")
    from tokenizers import AddedToken

    added = json.loads(ct2.tokenizer_json).get("added_tokens", [])
    eos = _SPECIAL["eos"]
    specials = [t["content"] for t in added if t.get("special") and t["content"] != eos]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(ct2.tokenizer_json, encoding="utf-8")
        tokenizer = WhisperTokenizer(
            tokenizer_file=str(path),
            unk_token=eos,
            bos_token=eos,
            eos_token=eos,
            pad_token=eos,
            extra_special_tokens=specials,
        )
    known = len(tokenizer)
    if known < len(ct2.vocabulary):
        extra = ct2.vocabulary[known:]
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    vocab = tokenizer.get_vocab()
    wrong = [i for i, token in enumerate(ct2.vocabulary) if vocab.get(token) != i]
    if wrong or len(tokenizer) != len(ct2.vocabulary):
        first = f"first: id {wrong[0]} {ct2.vocabulary[wrong[0]]!r}" if wrong else "sizes differ"
        raise AudioLLMError(
            f"{ct2.source}: tokenizer.json ({len(tokenizer)} tokens) disagrees with the "
            f"vocabulary ({len(ct2.vocabulary)}) on {len(wrong)} ids ({first})"
        )
    return tokenizer


def write_whisper_checkpoint(ct2: Ct2Whisper, out_dir: str | Path) -> Path:
    """Write `ct2` as a transformers Whisper checkpoint folder: `WhisperForConditionalGeneration`
    weights (float32) and configs, an 80-bin (or whatever the conv takes) feature extractor, and
    the tokenizer when the model ships a `tokenizer.json`."""
    out = Path(out_dir)
    shapes, state = whisper_state_dict(ct2.model, f"{ct2.source}/model.bin")
    config, generation = whisper_configs(ct2, shapes)
    tokenizer = whisper_tokenizer(ct2) if ct2.tokenizer_json is not None else None
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # A copy each: aliased variables share one tensor, which must not tie unrelated weights.
    state = {name: tensor.to(torch.float32, copy=True) for name, tensor in state.items()}
    expected = set(model.state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise AudioLLMError(f"{ct2.source}: weights do not fit Whisper (first: {odd[0]})")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation
    with quiet_transformers():  # no advice about generation settings living in config.json
        model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=shapes["num_mel_bins"]).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
