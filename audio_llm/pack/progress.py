"""Progress of `audio-llm pack`: clips done, clips/s and an ETA, as a tqdm bar in a terminal and
as one plain line every `interval` seconds when stderr is a file or a pipe (a SLURM log, `make
demo`'s log), where a bar's carriage returns would pile up into one unreadable line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 10.0  # non-terminal output: one line this often at most


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PackProgress:
    """Counts clips (input utterances) done out of `total`; `done` at start is what a resumed
    pack kept, shown as done but left out of the rate (it took no time now)."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        label: str = "pack",
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label = total, done, label
        self.interval, self.clock = interval, clock
        self._kept = done
        self._start = self._last_line = clock()
        self._bar: tqdm | None = None
        self._lines = not quiet and not self.stream.isatty()
        if not quiet and self.stream.isatty():
            self._bar = tqdm(total=total, initial=done, unit="clip", desc=label, file=self.stream)

    def update(self, clips: int = 1) -> None:
        """`clips` more are done (written or skipped)."""
        self.done += clips
        if self._bar is not None:
            self._bar.update(clips)
        elif self._lines and self.clock() - self._last_line >= self.interval:
            self._line()

    def line(self) -> str:
        """`pack: 1200/5000 clips (24.0%), 31.5 clips/s, ETA 2:01`."""
        elapsed = self.clock() - self._start
        fresh = self.done - self._kept
        rate = fresh / elapsed if elapsed > 0 else 0.0
        share = 100.0 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.label}: {self.done}/{self.total} clips ({share:.1f}%), "
            f"{rate:.1f} clips/s, ETA {eta}"
        )

    def _line(self) -> None:
        self._last_line = self.clock()
        print(self.line(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self._bar is not None:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar, or print the last line (so a log ends with the final count)."""
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line()
