"""The report of `audio-llm pack`: what happened to every input utterance (written, truncated,
or skipped for a named reason), kept per block while packing and summed by the merge.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from audio_llm.pack.manifests import Utterance
from audio_llm.pack.prepare import MAX_SECONDS, SKIP_REASONS, Skipped

SKIP_LOG_LIMIT = 10  # skipped samples named per reason before the log only counts them


@dataclass
class PackReport:
    """What happened to every input utterance."""

    inputs: int = 0
    samples: int = 0
    seconds: float = 0.0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    commands: int = 0  # wav.scp commands run (--allow-pipes)
    command_examples: list[str] = field(default_factory=list)

    def skip(self, item: Skipped, log: Callable[[str], None] | None) -> None:
        self.skipped[item.reason] += 1
        if len(self.examples[item.reason]) < SKIP_LOG_LIMIT:
            self.examples[item.reason].append(f"{item.utt_id}: {item.detail}")
            if log is not None:
                log(f"skip ({item.reason.replace('_', ' ')}) {item.utt_id}: {item.detail}")

    def ran_command(self, utt: Utterance, log: Callable[[str], None] | None) -> None:
        self.commands += 1
        if len(self.command_examples) < SKIP_LOG_LIMIT:
            self.command_examples.append(f"{utt.id}: {utt.command}")
            if log is not None:
                log(f"ran (--allow-pipes) {self.command_examples[-1]}")

    def to_state(self) -> dict:
        """Everything `absorb` needs to add this report to another, exactly (a block record)."""
        return {
            "inputs": self.inputs,
            "samples": self.samples,
            "seconds": self.seconds,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "examples": {r: list(e) for r, e in self.examples.items() if e},
            "commands": self.commands,
            "command_examples": self.command_examples,
        }

    def absorb(self, state: dict) -> None:
        """Add a block's `to_state()`; blocks absorbed in order keep the first examples, as one
        pass over all blocks would."""
        self.inputs += state["inputs"]
        self.samples += state["samples"]
        self.seconds += state["seconds"]
        self.truncated += state["truncated"]
        self.skipped.update(state["skipped"])
        for reason, examples in state["examples"].items():
            room = SKIP_LOG_LIMIT - len(self.examples[reason])
            self.examples[reason].extend(examples[: max(room, 0)])
        self.commands += state["commands"]
        room = SKIP_LOG_LIMIT - len(self.command_examples)
        self.command_examples.extend(state["command_examples"][: max(room, 0)])

    def to_dict(self) -> dict:
        report = {
            "inputs": self.inputs,
            "samples_written": self.samples,
            "hours_written": round(self.seconds / 3600, 6),
            "truncated": self.truncated,
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS},
            "skipped_total": sum(self.skipped.values()),
            "skip_examples": {r: self.examples[r] for r in SKIP_REASONS if self.examples[r]},
        }
        if self.commands:  # only with --allow-pipes: what ran, for the record
            report["commands_run"] = self.commands
            report["command_examples"] = self.command_examples
        return report


def report_summary(report: dict) -> str:
    """The human-readable report of `PackReport.to_dict()` (as stored in index.json)."""
    skipped = report["skipped"]
    counts = ", ".join(f"{r.replace('_', ' ')} {skipped[r]}" for r in SKIP_REASONS)
    lines = [
        f"wrote {report['samples_written']} of {report['inputs']} samples "
        f"({report['hours_written']:.3f} h)",
        f"skipped {report['skipped_total']}: {counts}",
        f"truncated to {MAX_SECONDS:g} s: {report['truncated']}",
    ]
    unnamed = {r: n - SKIP_LOG_LIMIT for r, n in skipped.items() if n > SKIP_LOG_LIMIT}
    if unnamed:
        more = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in unnamed.items())
        lines.append(f"(skips not named individually: {more})")
    if report.get("commands_run"):
        examples = report["command_examples"]
        lines.append(f"ran {report['commands_run']} wav.scp command(s) (--allow-pipes):")
        lines += [f"  {command}" for command in examples]
        if report["commands_run"] > len(examples):
            lines.append(f"  ... and {report['commands_run'] - len(examples)} more like these")
    return "\n".join(lines)
