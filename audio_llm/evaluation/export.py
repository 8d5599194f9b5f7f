"""Write the trained parts where other tools can use them: projector safetensors + PEFT adapter.

The folder is built under a temporary name and renamed into place, so a crash never leaves a
half-written export under the final name.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import yaml
from safetensors.torch import load_file
from torch import nn

from audio_llm.errors import AudioLLMError
from audio_llm.files import staged_dir
from audio_llm.model.build import AUX_HEAD_KINDS, attach_exported_heads
from audio_llm.model.lora import save_adapter

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
MANIFEST_FILE = "export.json"


def export_weights(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """`out_dir/projector.safetensors`, `out_dir/adapter/` (if LoRA) and `out_dir/export.json`."""
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        model.projector.save(tmp / PROJECTOR_FILE)
        # each trained auxiliary head's files: the next stage continues from them (build)
        heads = {kind.file_key: None for kind in AUX_HEAD_KINDS}
        for head in model.loss_heads().values():
            heads.update(head.export(model, tmp))
        has_lora = hasattr(model.llm, "peft_config")
        if has_lora:
            save_adapter(model, tmp / ADAPTER_DIR)
        # Under ZeRO-3 an ungathered parameter saves as a 0-element tensor: refuse, loudly.
        for path in tmp.rglob("*.safetensors"):
            empty = [k for k, v in load_file(path).items() if v.numel() == 0]
            if empty:
                raise AudioLLMError(
                    f"{path.name}: {len(empty)} empty tensors (e.g. {empty[0]}); the weights "
                    "were not gathered from the ZeRO-3 partitions"
                )
        manifest = {
            "projector": PROJECTOR_FILE,
            "adapter": ADAPTER_DIR if has_lora else None,
            **heads,
            "audio_token_id": model.audio_token_id,
            **(extra or {}),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


# -- a self-contained inference folder ---------------------------------------------------------
BUNDLE_FILE = "audio_llm.json"
SCANNED_SHARDS = 32  # shards read for the clip-length range: enough to see its longest clips
BUNDLE_FORMAT = 1
# Runs and bundles from before model.system_prompt existed trained with the chat template's own
# system turn: read without the key, they keep it (the key's default now leaves it out).
LEGACY_SYSTEM_PROMPT = None


def _run_model_config(run_dir: Path):
    from audio_llm.config import load_config

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise AudioLLMError(f"{run_dir}: no config.yaml (is it a training run folder?)")
    cfg = load_config(config)
    if "system_prompt" not in (yaml.safe_load(config.read_text()).get("model") or {}):
        cfg.model.system_prompt = LEGACY_SYSTEM_PROMPT
    weights = run_dir / "export"
    if not (weights / PROJECTOR_FILE).is_file():
        raise AudioLLMError(f"{run_dir}: no export/{PROJECTOR_FILE}; has the run saved a step?")
    return cfg, weights


def load_for_inference(
    run: str | Path | None = None,
    export: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> nn.Module:
    """An AudioLLM ready to transcribe, from a training run folder or a bundle from `export`."""
    from peft import PeftModel

    from audio_llm.model.build import build_audio_llm

    if (run is None) == (export is None):
        raise AudioLLMError("give exactly one of --run RUN_DIR or --export DIR")
    if run is not None:
        cfg, weights = _run_model_config(Path(run))
        model_cfg = cfg.model
        model_cfg.projector_init = str(weights / PROJECTOR_FILE)
        adapter = weights / ADAPTER_DIR if (weights / ADAPTER_DIR).is_dir() else None
        heads, listed = weights, None
    else:
        from audio_llm.config import ModelConfig

        folder = Path(export)
        bundle_path = folder / BUNDLE_FILE
        if not bundle_path.is_file():
            raise AudioLLMError(f"{folder}: no {BUNDLE_FILE}; make one with `audio-llm export`")
        bundle = json.loads(bundle_path.read_text())
        fields = {"system_prompt": LEGACY_SYSTEM_PROMPT, **bundle["model"]}
        for key in ("encoder", "llm", "projector_init"):
            if not Path(fields[key]).is_absolute() and (folder / fields[key]).exists():
                fields[key] = str(folder / fields[key])
        model_cfg = ModelConfig(**fields)
        adapter = folder / bundle["adapter"] if bundle.get("adapter") else None
        heads, listed = folder, bundle
    if dtype is not None:
        model_cfg.dtype = dtype
    elif device == "cpu":
        model_cfg.dtype = "float32"
    model = build_audio_llm(model_cfg, None, device=device)
    attach_exported_heads(model, heads, listed)  # for joint decoding (weight 0: no loss)
    if adapter is not None:
        model.llm = PeftModel.from_pretrained(model.llm, str(adapter)).to(device)
    return model.eval()


def training_clip_seconds(
    run: str | Path | None = None, export: str | Path | None = None
) -> tuple[float, float] | None:
    """(shortest, longest) training clip in seconds of a run (read from the `.json` members of
    up to `SCANNED_SHARDS` of its local training shards) or of an export bundle (recorded by
    `audio-llm export`; older bundles ask their source run). None when it cannot be known."""
    from audio_llm.config import load_config
    from audio_llm.data.shards import ShardSet

    if export is not None:
        bundle_path = Path(export) / BUNDLE_FILE
        if not bundle_path.is_file():
            return None
        bundle = json.loads(bundle_path.read_text())
        if bundle.get("trained_seconds"):
            low, high = bundle["trained_seconds"]
            return float(low), float(high)
        source = bundle.get("source_run")
        return training_clip_seconds(run=source) if source and Path(source).is_dir() else None
    config = Path(run) / "config.yaml"
    if not config.is_file():
        return None
    data = load_config(config).data
    try:
        shards = [s for src in data.sources() for s in ShardSet.open(src.shards, src.index).shards]
    except AudioLLMError:
        return None  # no shards named, or moved since training
    local = [s.url for s in shards if Path(s.url).is_file()]
    step = max(1, len(local) / SCANNED_SHARDS)
    durations = []
    for path in (local[int(i * step)] for i in range(min(len(local), SCANNED_SHARDS))):
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if member.isreg() and member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
                        durations.append(float(meta["duration"]))
        except (tarfile.TarError, OSError, ValueError, KeyError, TypeError):
            continue  # a damaged shard: the others still tell the range
    return (min(durations), max(durations)) if durations else None


def export_bundle(run_dir: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """`audio-llm export`: encoder + feature extractor, projector, adapter (or merged LLM),
    tokenizer and config in one folder, written under a temporary name and renamed."""
    run_dir, out = Path(run_dir), Path(out_dir)
    model = load_for_inference(run=run_dir)
    cfg, weights = _run_model_config(run_dir)
    with staged_dir(out) as tmp:
        model.encoder.whisper.save_pretrained(tmp / "encoder")
        model.feature_extractor.save_pretrained(tmp / "encoder")
        shutil.copy2(weights / PROJECTOR_FILE, tmp / PROJECTOR_FILE)
        heads = {}  # the auxiliary heads' files the run exported, e.g. the CTC blank
        for kind in AUX_HEAD_KINDS:
            found = (weights / kind.file).is_file()
            if found:
                shutil.copy2(weights / kind.file, tmp / kind.file)
            heads[kind.file_key] = kind.file if found else None
        fields = dict(cfg.model.__dict__)
        fields.update(encoder="encoder", projector_init=PROJECTOR_FILE, dtype=cfg.model.dtype)
        adapter = None
        if merge and hasattr(model.llm, "peft_config"):
            model.llm.merge_and_unload().save_pretrained(tmp / "llm")
            model.tokenizer.save_pretrained(tmp / "llm")
            fields["llm"] = "llm"
        elif hasattr(model.llm, "peft_config"):
            shutil.copytree(weights / ADAPTER_DIR, tmp / ADAPTER_DIR)
            adapter = ADAPTER_DIR
        bundle = {
            "format": BUNDLE_FORMAT,
            "model": fields,
            "adapter": adapter,
            **heads,
            "merged": fields["llm"] == "llm",
            "source_run": str(run_dir),
            "trained": json.loads((weights / MANIFEST_FILE).read_text()),
            # [shortest, longest] training clip: transcribe cuts long audio to fit (None: unknown)
            "trained_seconds": training_clip_seconds(run=run_dir),
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2) + "\n")
    return out
