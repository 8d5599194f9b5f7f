"""DeepSpeed op builds that survive real GPU images: `TORCH_CUDA_ARCH_LIST` normalisation.

DeepSpeed (0.19.8, `op_builder/builder.py: CUDAOpBuilder.compute_capability_args`) splits
`TORCH_CUDA_ARCH_LIST` on `;` or spaces and reads each entry as `MAJOR.MINOR` or
`MAJOR.MINOR+PTX` with `int()`. CUDA 12+ images set arch-specific (`9.0a`, Hopper; `10.0a`,
Blackwell) or family (`10.0f`) entries, and the JIT build of FusedAdam then dies with
`ValueError: invalid literal for int() with base 10: '0a'`. Compiling for the plain arch (`9.0`)
runs on the same chips: the suffix only unlocks arch-specific instructions DeepSpeed's ops do not
use. `normalize_cuda_arch_list()` rewrites the variable in place before DeepSpeed builds an op.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

ENV = "TORCH_CUDA_ARCH_LIST"
# What DeepSpeed parses, and what it does not but means the same arch: a letter suffix.
_PARSABLE = re.compile(r"\d+\.\d+(\+PTX)?")
_SUFFIXED = re.compile(r"(\d+\.\d+)[a-z]+(\+PTX)?")


def normalized_arch_list(value: str) -> str:
    """`value` with suffixed entries made plain (`9.0a` -> `9.0`, `10.0a+PTX` -> `10.0+PTX`),
    duplicates dropped (first kept), `;`-separated. Entries of other forms (PyTorch's named
    arches such as `Hopper`) are kept as they are: DeepSpeed reports those itself."""
    entries = [e for e in value.replace(" ", ";").split(";") if e.strip()]
    out: list[str] = []
    for entry in (e.strip() for e in entries):
        suffixed = _SUFFIXED.fullmatch(entry)
        if suffixed:
            entry = suffixed.group(1) + (suffixed.group(2) or "")
        if entry not in out:
            out.append(entry)
    return ";".join(out)


def normalize_cuda_arch_list(environ: os._Environ | dict | None = None) -> str | None:
    """Make `TORCH_CUDA_ARCH_LIST` parsable by DeepSpeed's op builder, in `environ` (default
    `os.environ`); one log line when it changes. Returns the new value, or None when unchanged
    (unset, empty, or already fine). Call before DeepSpeed builds an op (deepspeed.initialize)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if not value or not value.strip():
        return None
    entries = value.replace(" ", ";").split(";")
    if not any(_SUFFIXED.fullmatch(e.strip()) for e in entries):
        return None  # DeepSpeed reads it as it is (spaces and duplicates included)
    fixed = normalized_arch_list(value)
    environ[ENV] = fixed
    unparsed = [e for e in fixed.split(";") if not _PARSABLE.fullmatch(e)]
    log.warning(
        "%s=%r -> %r: DeepSpeed's op builder cannot parse arch suffixes (9.0a, 10.0a)%s",
        ENV,
        value,
        fixed,
        f"; left as they are: {', '.join(unparsed)}" if unparsed else "",
    )
    return fixed
