"""Writing a benchmark's results: OUT.json, OUT.png and OUT.md (its BENCHMARKS.md section), or replotting them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable


def write_reports(out: Path, result: dict[str, Any] | None, name: str, plot: Callable[[dict[str, Any], Path], None],
                  markdown: Callable[[dict[str, Any], str], str], default_command: Callable[[dict[str, Any]], str]
                  ) -> int:
    """OUT.json (from ``result``, or re-read when ``result`` is None: replotting), OUT.png and OUT.md; exit code."""
    if result is None:
        if not out.with_suffix(".json").is_file():
            print(f"{name}: no {out.with_suffix('.json')} to replot", file=sys.stderr)
            return 2
        result = json.loads(out.with_suffix(".json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    # A result written before the command was recorded: the equivalent explicit command.
    out.with_suffix(".md").write_text(markdown(result, result.get("command") or default_command(result)))
    print(out.with_suffix(".md").read_text())
    return 0
