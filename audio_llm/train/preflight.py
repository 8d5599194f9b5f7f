"""Checks before anything loads: every path a run reads, named in one error on every rank.

`check_start` runs first in `run.train`, before the process group, the models or DeepSpeed, so
that a wrong path costs a second, not minutes of model loading.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlparse

from audio_llm.config import Config
from audio_llm.data import ShardSet
from audio_llm.errors import AudioLLMError
from audio_llm.train.checkpoint import resolve_resume
from audio_llm.train.ds_config import missing_ds_config_message, resolve_ds_config

log = logging.getLogger(__name__)


def check_start(cfg: Config, ds_config: str | Path, resume: str = "auto") -> Path:
    """Problems any rank can see before building anything: fail all ranks at once, early.

    Every path the run reads (the DeepSpeed config, model folders, the projector to start from,
    shards and their indexes, a resume folder) is checked here, before minutes of model loading,
    and all problems are named in one error. Returns the DeepSpeed config's path
    (`ds_config.resolve_ds_config`: a relative one may live under the repository top).
    """
    problems = []
    ds_path = resolve_ds_config(ds_config)
    if ds_path is None:
        problems.append(missing_ds_config_message(ds_config))
    # Local checkpoint folders only (this package never downloads): the files from_pretrained
    # needs first, so that a wrong path fails here and not after the other model has loaded.
    for key, folder, files in (
        ("model.encoder", cfg.model.encoder, ("config.json", "preprocessor_config.json")),
        ("model.llm", cfg.model.llm, ("config.json",)),
    ):
        if not folder:
            problems.append(f"{key} is not set: name a local checkpoint folder (or a hub id)")
        elif not Path(folder).is_dir():
            if _hub_id(folder):  # from_pretrained finds it in the local Hugging Face cache
                continue
            problems.append(f"{key} {folder!r}: no such folder (a local checkpoint folder)")
        elif missing := [f for f in files if not Path(folder, f).is_file()]:
            problems.append(f"{key} {folder!r}: no {' or '.join(missing)} in it")
    if cfg.train.stage == 2 and not cfg.model.projector_init:
        problems.append(
            "stage 2 starts from a stage-1 projector: set model.projector_init to "
            "STAGE1_RUN/export/projector.safetensors"
        )
    elif cfg.model.projector_init and not Path(cfg.model.projector_init).is_file():
        problems.append(f"model.projector_init {cfg.model.projector_init!r}: no such file")
    shard_sets = [
        (
            f"data.train_shards[{i}] ({s.name})" if cfg.data.mixed else "data.train_shards",
            s.shards,
            s.index,
        )
        for i, s in enumerate(cfg.data.sources())
    ]
    if cfg.data.eval_shards:
        shard_sets.append(("data.eval_shards", cfg.data.eval_shards, cfg.data.eval_index))
    train_modes = {}  # a mixture's sources must hold one kind of payload
    for key, spec, index in shard_sets:
        try:
            shards = ShardSet.open(spec, index)  # the index exists and lists every shard
        except AudioLLMError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if key.startswith("data.train_shards"):
            train_modes[key] = shards.mode
        # URL specs are only matched against the index; local ones must exist too.
        local = [s.url for s in shards.shards if not urlparse(s.url).scheme]
        absent = [url for url in local if not Path(url).is_file()]
        if absent:
            problems.append(f"{key}: {len(absent)} shard(s) do not exist, e.g. {absent[0]}")
    if len(set(train_modes.values())) > 1:
        problems.append(
            f"data.train_shards mixes packing modes {train_modes}: repack to one --mode"
        )
    try:
        resolve_resume(resume, cfg.train.out_dir)
    except AudioLLMError as exc:
        problems.append(f"--resume: {exc}")
    if problems:
        raise AudioLLMError(
            f"{len(problems)} problem(s) with the paths this run reads (nothing was loaded):\n  - "
            + "\n  - ".join(problems)
            + f"\nRelative paths are read from the working directory ({Path.cwd()}): fix them "
            "in --config FILE or as section.key=value overrides, or run from the folder they are "
            "relative to."
        )
    if ds_path != Path(ds_config):
        log.info("DeepSpeed config %s: reading %s", ds_config, ds_path)
    return ds_path


def _hub_id(name: str) -> bool:
    """`org/name`, as a Hugging Face hub id is written (not a relative path that is missing)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")
