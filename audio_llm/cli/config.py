"""`audio-llm config`: the resolved training config (file + overrides), or every field's help."""

from __future__ import annotations

import argparse

import yaml

from audio_llm.config import explain, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the resolved training config (file + overrides)",
        description="Resolve --config FILE plus section.key=value overrides, validate, print YAML.",
    )
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--explain", action="store_true", help="list every field with its help text")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.explain:
        print("\n".join(explain()))
        return 0
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
