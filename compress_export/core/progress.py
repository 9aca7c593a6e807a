"""A dependency-free progress line: what is done, elapsed and estimated time left."""

from __future__ import annotations

import sys
import time


def _fmt(sec: float) -> str:
    sec = int(max(0, sec))
    return f"{sec // 60:d}:{sec % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.time()
        self.done = 0
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        el = time.time() - self.start
        eta = el / done * (self.total - done) if done else 0.0
        width = 24
        fill = int(width * done / max(1, self.total))
        line = (
            f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
            f"elapsed {_fmt(el)} left {_fmt(eta)} {note}"
        )
        if self._tty:
            self.stream.write("\r" + line.ljust(100))
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.time() - self.start
