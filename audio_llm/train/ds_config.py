"""DeepSpeed config: a `ds_configs/*.json` file + the run's config -> the dict DeepSpeed gets.

The run's config (`data.batch_size`, `train.grad_accum`, `train.clip_grad`, `train.lr`,
`train.weight_decay`, `model.dtype`) is the single source of truth. DeepSpeed fields may say
`"auto"` (or be left out) and are filled from it; a field given explicitly must agree with it,
otherwise start-up fails with one line naming both sides (rather than DeepSpeed training with a
batch size or lr the config does not show). What is filled:

| DeepSpeed field                  | from                                                  |
|----------------------------------|-------------------------------------------------------|
| train_micro_batch_size_per_gpu   | data.batch_size                                       |
| gradient_accumulation_steps      | train.grad_accum                                      |
| train_batch_size                 | micro x accum x world size                            |
| gradient_clipping                | train.clip_grad (0: off)                              |
| optimizer.params.lr              | train.lr (the schedule scales it: audio_llm.train.schedule) |
| optimizer.params.weight_decay    | train.weight_decay                                    |
| bf16.enabled / fp16.enabled      | model.dtype                                           |

The lr schedule is ours (`schedule.make_scheduler`), so a `"scheduler"` section is an error.

Without CUDA (CPU runs: tests, the demo) the result is adjusted, with a log line for each change:
bf16/fp16 are switched off (the CPU path trains in float32, `model.dtype=float32`), CPU offload is
dropped (the weights already live in CPU memory, and ZeRO-Offload needs DeepSpeedCPUAdam, a JIT
build), and Adam/AdamW use `torch.optim` (`torch_adam: true`) instead of FusedAdam, which needs a
CUDA build.

Where the JSON is read from: the path as given (relative to the working directory); if that does
not exist and the path is relative, the same path under the repository top, where `ds_configs/`
sits. So the default `ds_configs/zero2.json` works from any folder of a checkout (or an editable
install); a file of that name in the working directory still wins.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.errors import AudioLLMError

log = logging.getLogger(__name__)

AUTO = "auto"
# ds_configs/ sits at the repository top, beside the package (a checkout or an editable install).
REPO_ROOT = Path(__file__).resolve().parents[2]


def ds_config_candidates(path: str | Path) -> list[Path]:
    """Where `path` is looked for, in order: as given, then (if relative) under the repo top."""
    path = Path(path)
    if path.is_absolute():
        return [path]
    return [path, REPO_ROOT / path]


def resolve_ds_config(path: str | Path) -> Path | None:
    """The DeepSpeed JSON that `path` names (see the module docstring), or None if none exists."""
    return next((p for p in ds_config_candidates(path) if p.is_file()), None)


def missing_ds_config_message(path: str | Path) -> str:
    """What to say when `resolve_ds_config(path)` is None: where it looked, what to pass."""
    looked = " and ".join(str(p.absolute()) for p in ds_config_candidates(path))
    default = REPO_ROOT / "ds_configs" / "zero2.json"
    hint = (
        f", such as {default}"
        if default.is_file()
        else " (this install has no ds_configs/ folder: copy one from the repository)"
    )
    return (
        f"DeepSpeed config {str(path)!r} does not exist (looked for {looked}); pass "
        f"--deepspeed_config the path of a DeepSpeed JSON{hint}"
    )


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (found as `resolve_ds_config` says); errors name the file."""
    found = resolve_ds_config(path)
    if found is None:
        raise AudioLLMError(missing_ds_config_message(path))
    path = found
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AudioLLMError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AudioLLMError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return False


def _fill(section: dict[str, Any], key: str, value: Any, source: str, where: str) -> None:
    """Set `section[key]` to `value` if missing or "auto"; otherwise insist they agree."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif not _same(current, value):
        raise AudioLLMError(
            f'{where}{key}={current!r} but {source}={value!r}: make them match or use "auto"'
        )


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}{k}.")]
    return [path.rstrip(".")] if node == AUTO else []


def _note(message: str) -> None:
    if dist.is_main():
        log.warning("ds_config: %s", message)


def build_ds_config(
    source: str | Path | dict[str, Any],
    cfg: Config,
    world_size: int | None = None,
    cuda: bool | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (pass it as `deepspeed.initialize(config=...)`).

    `source` is a JSON path or an already-loaded dict (not modified). `world_size` defaults to
    `dist.world_size()`, `cuda` to `torch.cuda.is_available()`.
    """
    where = f"{source}: " if not isinstance(source, dict) else "DeepSpeed config: "
    ds = copy.deepcopy(source) if isinstance(source, dict) else load_ds_json(source)
    world = dist.world_size() if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda

    # Batch arithmetic: DeepSpeed itself checks it only after the model is built.
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size, "data.batch_size", where)
    _fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum, "train.grad_accum", where)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    _fill(
        ds,
        "train_batch_size",
        micro * accum * world,
        f"micro batch {micro} x grad accum {accum} x world size {world}",
        where,
    )
    _fill(ds, "gradient_clipping", cfg.train.clip_grad, "train.clip_grad", where)
    # DeepSpeed's throughput timer synchronises the device twice a micro-batch by default; the
    # trainer times its steps itself (StepTimer). A config that names the timer keeps its say.
    ds.setdefault("timers", {}).setdefault("throughput", {"enabled": False, "synchronized": False})

    if "scheduler" in ds:
        raise AudioLLMError(
            f'{where}remove the "scheduler" section: the lr schedule comes from train.schedule'
        )
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", cfg.train.lr, "train.lr", f"{where}optimizer.params.")
        _fill(
            params,
            "weight_decay",
            cfg.train.weight_decay,
            "train.weight_decay",
            f"{where}optimizer.params.",
        )

    _set_precision(ds, cfg.model.dtype, cuda, where)
    _check_zero(ds, cuda, where)
    if (
        not cuda
        and optimizer is not None
        and optimizer.get("type", "").lower() in ("adam", "adamw")
    ):
        if not optimizer["params"].get("torch_adam", False):
            _note("no CUDA: Adam/AdamW from torch.optim (torch_adam) instead of FusedAdam")
        optimizer["params"]["torch_adam"] = True

    left = _find_auto(ds)
    if left:
        raise AudioLLMError(f'{where}no value to fill "auto" in: {", ".join(left)}')
    return ds


def _set_precision(ds: dict[str, Any], dtype: str, cuda: bool, where: str) -> None:
    bf16 = ds.setdefault("bf16", {"enabled": False})
    fp16 = ds.setdefault("fp16", {"enabled": False})
    for section, wanted in ((bf16, "bfloat16"), (fp16, "float16")):
        if section.get("enabled", False) == AUTO:
            section["enabled"] = dtype == wanted
    if bf16.get("enabled") and fp16.get("enabled"):
        raise AudioLLMError(f"{where}bf16 and fp16 are both enabled: enable one")
    if bf16.get("enabled") and dtype == "float16":
        raise AudioLLMError(f"{where}bf16 is enabled but model.dtype=float16: make them match")
    if fp16.get("enabled") and dtype == "bfloat16":
        raise AudioLLMError(f"{where}fp16 is enabled but model.dtype=bfloat16: make them match")
    if not cuda and (bf16.get("enabled") or fp16.get("enabled")):
        _note("no CUDA: bf16/fp16 switched off, training in float32")
        bf16["enabled"] = fp16["enabled"] = False


def _check_zero(ds: dict[str, Any], cuda: bool, where: str) -> None:
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise AudioLLMError(f"{where}zero_optimization.stage must be 0-3 (got {stage!r})")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if not offload or offload.get("device", "none") == "none":
            continue
        if key == "offload_param" and stage != 3:
            raise AudioLLMError(f"{where}zero_optimization.{key} needs stage 3 (got {stage})")
        if offload.get("device") == "nvme" and not offload.get("nvme_path"):
            raise AudioLLMError(f"{where}zero_optimization.{key}: nvme offload needs nvme_path")
        if not cuda:
            _note(f"no CUDA: dropping zero_optimization.{key} (weights are in CPU memory already)")
            del zero[key]
