"""Write the trained parts where other tools can use them: projector safetensors + PEFT adapter.

The folder is built under a temporary name and renamed into place, so a crash never leaves a
half-written export under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from audio_llm.errors import AudioLLMError
from audio_llm.model.audio_llm import CTC_BLANK_FILE
from audio_llm.model.lora import save_adapter

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
MANIFEST_FILE = "export.json"


def export_weights(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """`out_dir/projector.safetensors`, `out_dir/adapter/` (if LoRA) and `out_dir/export.json`."""
    out = Path(out_dir)
    with _staged_dir(out) as tmp:
        model.projector.save(tmp / PROJECTOR_FILE)
        has_ctc = getattr(model, "ctc_weight", 0) > 0
        if has_ctc:  # the next stage's CTC loss starts from it (build_audio_llm)
            blank = model.ctc_blank.detach().contiguous().cpu()
            save_file({"ctc_blank": blank}, str(tmp / CTC_BLANK_FILE))
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
            "ctc_blank": CTC_BLANK_FILE if has_ctc else None,
            "audio_token_id": model.audio_token_id,
            **(extra or {}),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@contextlib.contextmanager
def _staged_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it only if the block finishes: a crash
    never leaves a half-written folder under the final name (and removes the temporary one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; exports are shared
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- a self-contained inference folder ---------------------------------------------------------
BUNDLE_FILE = "audio_llm.json"
BUNDLE_FORMAT = 1


def _run_model_config(run_dir: Path):
    from audio_llm.config import load_config

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise AudioLLMError(f"{run_dir}: no config.yaml (is it a training run folder?)")
    cfg = load_config(config)
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

    from audio_llm.model.audio_llm import build_audio_llm

    if (run is None) == (export is None):
        raise AudioLLMError("give exactly one of --run RUN_DIR or --export DIR")
    if run is not None:
        cfg, weights = _run_model_config(Path(run))
        model_cfg = cfg.model
        model_cfg.projector_init = str(weights / PROJECTOR_FILE)
        adapter = weights / ADAPTER_DIR if (weights / ADAPTER_DIR).is_dir() else None
        blank = weights / CTC_BLANK_FILE
    else:
        from audio_llm.config import ModelConfig

        folder = Path(export)
        bundle_path = folder / BUNDLE_FILE
        if not bundle_path.is_file():
            raise AudioLLMError(f"{folder}: no {BUNDLE_FILE}; make one with `audio-llm export`")
        bundle = json.loads(bundle_path.read_text())
        fields = dict(bundle["model"])
        for key in ("encoder", "llm", "projector_init"):
            if not Path(fields[key]).is_absolute() and (folder / fields[key]).exists():
                fields[key] = str(folder / fields[key])
        model_cfg = ModelConfig(**fields)
        adapter = folder / bundle["adapter"] if bundle.get("adapter") else None
        blank = folder / (bundle.get("ctc_blank") or CTC_BLANK_FILE)
    if dtype is not None:
        model_cfg.dtype = dtype
    elif device == "cpu":
        model_cfg.dtype = "float32"
    model = build_audio_llm(model_cfg, None, device=device)
    if blank.is_file():  # the CTC head, for joint CTC decoding (weight 0: no CTC loss)
        model.enable_ctc(0.0, blank)
    if adapter is not None:
        model.llm = PeftModel.from_pretrained(model.llm, str(adapter)).to(device)
    return model.eval()


def export_bundle(run_dir: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """`audio-llm export`: encoder + feature extractor, projector, adapter (or merged LLM),
    tokenizer and config in one folder, written under a temporary name and renamed."""
    from audio_llm.evaluation.transcribe import training_clip_seconds

    run_dir, out = Path(run_dir), Path(out_dir)
    model = load_for_inference(run=run_dir)
    cfg, weights = _run_model_config(run_dir)
    with _staged_dir(out) as tmp:
        model.encoder.whisper.save_pretrained(tmp / "encoder")
        model.feature_extractor.save_pretrained(tmp / "encoder")
        shutil.copy2(weights / PROJECTOR_FILE, tmp / PROJECTOR_FILE)
        has_ctc = (weights / CTC_BLANK_FILE).is_file()
        if has_ctc:
            shutil.copy2(weights / CTC_BLANK_FILE, tmp / CTC_BLANK_FILE)
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
            "ctc_blank": CTC_BLANK_FILE if has_ctc else None,
            "merged": fields["llm"] == "llm",
            "source_run": str(run_dir),
            "trained": json.loads((weights / MANIFEST_FILE).read_text()),
            # [shortest, longest] training clip: transcribe cuts long audio to fit (None: unknown)
            "trained_seconds": training_clip_seconds(run=run_dir),
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2) + "\n")
    return out


def add_model_source(parser) -> None:
    """--run RUN_DIR | --export DIR, the two ways `eval` and `transcribe` find a model."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="training run folder (its config.yaml and export/); under torchrun write --run-dir, "
        "since torchrun takes --run as an abbreviation of its own --run-path",
    )
    src.add_argument("--export", help="folder written by `audio-llm export`")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="bundle a training run into a folder that transcribe/eval load",
        description=(
            "Write OUT with the encoder + feature extractor, the projector, the LoRA adapter (or, "
            "with --merge, the LLM with LoRA merged in) and the model config, so `audio-llm "
            "transcribe/eval --export OUT` work without the run folder. Without --merge the "
            "base LLM is referenced by its path (model.llm of the run)."
        ),
    )
    p.add_argument("--run", required=True, help="training run folder (train.out_dir)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="merge LoRA into a full LLM copy")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    out = export_bundle(args.run, args.out, args.merge)
    print(f"exported {args.run} -> {out}")
    return 0
