import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

from audio_llm.config import LoraConfig
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.export import export_weights
from audio_llm.model.build import build_audio_llm
from audio_llm.model.ctc import CTCHead
from audio_llm.model.projector import AudioProjector


@pytest.fixture(scope="module")
def trained(model_config):
    """A stage-2 model whose LoRA weights are non-zero (a fresh adapter is a no-op)."""
    torch.manual_seed(0)
    model = build_audio_llm(model_config, LoraConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def test_stock_peft_loads_the_adapter_onto_a_stock_qwen2vl(trained, model_config, tmp_path):
    out = export_weights(trained, tmp_path / "export")
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    saved = load_file(adapter / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * 2  # A and B for 7 projections x 2 layers
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in saved)

    stock = Qwen2VLForConditionalGeneration.from_pretrained(model_config.llm)
    loaded = PeftModel.from_pretrained(stock, adapter).eval()
    ids = trained.tokenizer("the red fox runs home", return_tensors="pt")["input_ids"]
    ours = trained.llm(input_ids=ids).logits
    theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours)
    plain = Qwen2VLForConditionalGeneration.from_pretrained(model_config.llm)(input_ids=ids).logits
    assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter really changes the model

    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_projector_and_manifest(trained, tmp_path):
    out = export_weights(trained, tmp_path / "export", extra={"step": 3})
    proj = AudioProjector(trained.projector.d_encoder, trained.projector.d_llm)
    proj.load(out / "projector.safetensors")
    for key, value in trained.projector.state_dict().items():
        assert torch.equal(proj.state_dict()[key], value)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["adapter"] == "adapter" and manifest["step"] == 3


def test_re_export_replaces_atomically_and_leaves_no_temp(trained, tmp_path):
    export_weights(trained, tmp_path / "export")
    export_weights(trained, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AudioProjector, "save", boom)
    with pytest.raises(OSError):
        export_weights(trained, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_stage1_export_has_no_adapter(model_config, tmp_path):
    model = build_audio_llm(model_config)
    out = export_weights(model, tmp_path / "export")
    assert not (out / "adapter").exists()
    with pytest.raises(AudioLLMError, match="no LoRA adapter"):
        from audio_llm.model.lora import save_adapter

        save_adapter(model, tmp_path / "x")
    assert json.loads((out / "export.json").read_text())["ctc_blank"] is None


def test_stage2_continues_the_ctc_blank_stage1_exported(model_config, tmp_path):
    """A stage-1 run with train.ctc_weight exports its learned blank beside the projector; a
    model started from that projector starts its CTC head from it, not from zero."""
    import dataclasses

    stage1 = build_audio_llm(model_config, ctc_weight=1.0)
    with torch.no_grad():
        stage1.ctc_blank.normal_()
    out = export_weights(stage1, tmp_path / "export")
    assert json.loads((out / "export.json").read_text())["ctc_blank"] == "ctc_blank.safetensors"
    init = dataclasses.replace(model_config, projector_init=str(out / "projector.safetensors"))
    stage2 = build_audio_llm(init, LoraConfig(), ctc_weight=1.0)
    assert torch.equal(stage2.ctc_blank.detach(), stage1.ctc_blank.detach())
    # a projector without a blank beside it (CTC off in stage 1) starts from zero, as before
    (out / "ctc_blank.safetensors").unlink()
    assert not build_audio_llm(init, ctc_weight=1.0).ctc_blank.detach().any()


def test_a_ctc_blank_of_another_width_is_refused(model_config, tmp_path):
    from safetensors.torch import save_file

    model = build_audio_llm(model_config)
    save_file({"ctc_blank": torch.zeros(7)}, str(tmp_path / "blank.safetensors"))
    with pytest.raises(AudioLLMError, match="ctc_blank of shape"):
        CTCHead.attach(model, 1.0, tmp_path / "blank.safetensors")


@pytest.mark.parametrize(
    "written, read",
    [(None, None), ("", ""), ("Write what is said.", "Write what is said.")],
    ids=["before-the-key", "none", "own-text"],
)
def test_a_run_from_before_system_prompt_keeps_the_templates_turn(tmp_path, written, read):
    """A run's config.yaml without model.system_prompt trained with the chat template's own
    system turn: reading it back must not switch to the key's new default (no turn)."""
    import yaml

    from audio_llm.evaluation.export import PROJECTOR_FILE, _run_model_config

    model = {"encoder": "enc", "llm": "llm"}
    if written is not None:
        model["system_prompt"] = written
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / PROJECTOR_FILE).write_bytes(b"")
    cfg, _ = _run_model_config(tmp_path)
    assert cfg.model.system_prompt == read
