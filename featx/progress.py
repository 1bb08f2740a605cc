"""Progress for long commands, in one place: a tqdm bar on a terminal, plain periodic lines into a file or pipe
(no carriage returns), nothing when disabled."""
from __future__ import annotations

import sys
import time

LINE_INTERVAL_S = 10.0


def plural(unit) -> str:
    """'item' -> 'items', 'batch' -> 'batches'."""
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class LineProgress:
    """tqdm's update / set_postfix / close, written as one plain line at most every `interval` seconds."""

    def __init__(self, total, desc, unit, file, interval=None):
        interval = LINE_INTERVAL_S if interval is None else interval
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n, self.postfix, self.start = 0, "", time.monotonic()
        self.last = self.start

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        # the last step's line is close()'s, with the time taken
        if n and now - self.last >= self.interval and not (self.total and self.n >= self.total):
            self.last = now
            self._line()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, end=""):
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        unit = self.unit if self.total == 1 else plural(self.unit)
        print(f"{self.desc}: {self.n}/{self.total} {unit}{share}{end}{post}", file=self.file, flush=True)

    def close(self):
        if self.n:
            self._line(f" in {time.monotonic() - self.start:.1f} s")
        self.n = 0


class _Off:
    def update(self, n=1):
        pass

    def set_postfix(self, **values):
        pass

    def close(self):
        pass


def progress_bar(total, desc, unit="item", enabled=True, file=None):
    """A progress display for `total` steps: tqdm when `file` (default stderr) is a terminal, else LineProgress."""
    file = sys.stderr if file is None else file
    if not enabled:
        return _Off()
    if hasattr(file, "isatty") and file.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=file)
    return LineProgress(total, desc, unit, file)
