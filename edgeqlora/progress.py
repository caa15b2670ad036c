"""Progress off a terminal: one plain line every ``EDGEQLORA_PROGRESS_S`` seconds (default 30)
for a long stage, so that a log (``make demo > log``, CI, a supervisor's journal) shows where a
run is. On a terminal the stages draw rich progress bars instead and this stays silent.

A line reads ``train: step 40/80 (50%), loss 0.8123, 246 tok/s, 1:20 elapsed, ETA 1:20``: the
stage, the count done of the total, the stage's own figures, elapsed time and a linear ETA.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from .config import env_number

DEFAULT_EVERY_S = 30.0


def every_s() -> float:
    """``EDGEQLORA_PROGRESS_S`` (seconds between lines; 0 prints every update), or 30."""
    return env_number("EDGEQLORA_PROGRESS_S", float, 0, DEFAULT_EVERY_S,
                      "a number of seconds")


def off_terminal() -> bool:
    return not sys.stderr.isatty()


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Ticker:
    """Plain progress lines for one stage, at most one every ``every`` seconds (and the last
    update always, when ``done == total``). ``enabled=None``: only off a terminal."""

    def __init__(self, stage: str, total: int, unit: str = "", done: int = 0,
                 enabled: bool | None = None, every: float | None = None,
                 out: Callable[[str], None] | None = None):
        self.stage, self.total, self.unit = stage, int(total), unit
        self.enabled = off_terminal() if enabled is None else enabled
        self.every = every_s() if every is None else every
        self.out = out or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start_done = int(done)
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, **figures: Any) -> str | None:
        """Print (and return) a line if one is due; ``figures`` are shown in order, floats with
        4 significant digits, ``tok_s`` as tokens per second."""
        if not self.enabled:
            return None
        now = time.monotonic()
        final = done >= self.total
        if not final and now - self.last < self.every:
            return None
        self.last = now
        line = self.line(done, now, figures)
        self.out(line)
        return line

    def line(self, done: int, now: float, figures: dict[str, Any]) -> str:
        elapsed = now - self.t0
        what = f"{self.unit} " if self.unit else ""
        parts = [f"{self.stage}: {what}{done}/{self.total}"
                 + (f" ({done / self.total:.0%})" if self.total else "")]
        for key, value in figures.items():
            if value is None:
                continue
            if key == "tok_s":
                parts.append(f"{value:,.0f} tok/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            else:
                parts.append(f"{key} {value}")
        parts.append(f"{clock(elapsed)} elapsed")
        ran = done - self.start_done
        if 0 < ran and done < self.total:
            parts.append(f"ETA {clock(elapsed / ran * (self.total - done))}")
        return ", ".join(parts)
