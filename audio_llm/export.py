"""Write the trained parts where other tools can use them: projector safetensors + PEFT adapter.

The folder is built under a temporary name and renamed into place, so a crash never leaves a
half-written export under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from audio_llm.errors import AudioLLMError
from audio_llm.lora import save_adapter

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
MANIFEST_FILE = "export.json"


def export_weights(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """`out_dir/projector.safetensors`, `out_dir/adapter/` (if LoRA) and `out_dir/export.json`."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.projector.save(tmp / PROJECTOR_FILE)
        has_lora = hasattr(model.llm, "peft_config")
        if has_lora:
            save_adapter(model, tmp / ADAPTER_DIR)
            for path in (tmp / ADAPTER_DIR).glob("*.safetensors"):
                if path.stat().st_size == 0:
                    raise AudioLLMError(f"{path.name} is empty: the adapter was not gathered")
        manifest = {
            "projector": PROJECTOR_FILE,
            "adapter": ADAPTER_DIR if has_lora else None,
            "audio_token_id": model.audio_token_id,
            **(extra or {}),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
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
    return out
