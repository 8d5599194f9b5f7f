"""`audio-llm lora-targets`: which modules a LoRA regex or name list hits, per component."""

from __future__ import annotations

import argparse

from audio_llm.config import DEFAULT_LORA_REGEX
from audio_llm.errors import AudioLLMError
from audio_llm.model.lora import COMPONENTS, meta_model, target_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lora-targets",
        help="show which modules a LoRA regex hits, per component",
        description=(
            "Build the model on the meta device from configs (no weights loaded), match the LoRA "
            "spec against every module and print per-component counts and the matched names. "
            "Exits 2 if the spec hits anything outside the LLM's layers or misses a layer. "
            "--encoder/--llm take checkpoint folders or the names whisper-large-v3, "
            "qwen2-vl-2b, qwen2-vl-7b."
        ),
    )
    p.add_argument("--encoder", required=True, help="Whisper checkpoint folder or built-in name")
    p.add_argument("--llm", required=True, help="Qwen2-VL checkpoint folder or built-in name")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument(
        "--regex", default=DEFAULT_LORA_REGEX, help="full-match regex (default: ours)"
    )
    spec.add_argument("--names", help="comma-separated PEFT-style name list, e.g. q_proj,v_proj")
    p.add_argument("--quiet", action="store_true", help="counts only, no module names")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    targets = args.names.split(",") if args.names else args.regex
    report = target_report(meta_model(args.encoder, args.llm), targets)
    print(f"targets: {targets!r}")
    for component in COMPONENTS:
        print(f"  {component:<32} {len(report.matched.get(component, [])):>5}")
    hit = report.layers_hit
    per_layer = sorted(set(hit.values()))
    print(f"  LLM layers hit: {len(hit)}/{report.num_llm_layers}, modules per layer: {per_layer}")
    if not args.quiet:
        for component in COMPONENTS:
            for name in report.matched.get(component, []):
                print(f"{component}: {name}")
    problems = report.problems()
    if problems:
        raise AudioLLMError("; ".join(problems))
    print("OK: LoRA hits only the LLM's projections")
    return 0
