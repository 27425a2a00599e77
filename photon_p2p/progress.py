"""Progress: a tqdm bar on a terminal, a plain line every N units in a log file (no carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream: certainly not a terminal
        return False


class Progress:
    """``update``/``set_postfix``/``write``/``close`` like tqdm. Off a terminal (a log file, a pipe, systemd) tqdm
    would write a carriage-return update for every step into the log; there a line is printed every ``every``
    units (and at the end) instead, carrying the latest postfix."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 every: int = 10, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.enabled, self.every = enabled, max(1, int(every))
        self.postfix: dict[str, Any] = {}
        self._t0, self._n0 = time.monotonic(), self.n
        self.bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
                    if enabled and _is_terminal(self.file) else None)

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and (self.n // self.every > before // self.every or self.n == self.total):
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, **fields: Any) -> None:
        self.postfix.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix)

    def write(self, text: str) -> None:
        """A message line (to stdout) that does not tear the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self) -> str:
        rate = (self.n - self._n0) / max(1e-9, time.monotonic() - self._t0)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s{pct}{extra}, {rate:,.1f} {self.unit}/s"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
