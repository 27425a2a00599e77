"""Writing a benchmark's results (OUT.json, OUT.png, OUT.md), and BENCHMARKS.md's summary from bench/claims.yaml."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
COLUMNS = ("claim", "figure", "goal", "met", "command", "commit", "date", "machine", "raw file")
REQUIRED = ("id", "claim", "figure", "goal", "command", "commit", "date", "machine", "raw", "section")
# What a registry expression may call: arithmetic over the values, nothing else.
EXPR_NAMES = {"__builtins__": {}, "min": min, "max": max, "sum": sum, "len": len, "all": all, "any": any,
              "abs": abs, "round": round, "zip": zip, "log": math.log, "isfinite": math.isfinite}


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


class ClaimError(Exception):
    """A registry entry that cannot be rendered: one line saying why."""


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def _walk(node: Any, segments: list[str]) -> Any:
    """Follow a JSON path: keys, list indexes, [k=v,...] the first matching item, *[k=v,...] or * every one."""
    if not segments:
        return node
    seg, rest = segments[0], segments[1:]
    if seg[0] not in "*[":
        return _walk(node[int(seg)] if isinstance(node, list) else node[seg], rest)
    want = dict(kv.split("=", 1) for kv in seg.lstrip("*")[1:-1].split(",")) if "[" in seg else {}
    items = node.values() if isinstance(node, dict) else node
    matches = [item for item in items if all(str(item.get(k)) == v for k, v in want.items())]
    if seg[0] == "[":
        if not matches:
            raise KeyError(seg)
        return _walk(matches[0], rest)
    # Nested stars give one flat list (trials.*.exits.*.exit_s: every exit of every trial).
    out: list = []
    for item in matches:
        got = _walk(item, rest)
        out.extend(got) if any(s[0] == "*" for s in rest) else out.append(got)
    return out


def _number(text: str) -> Any:
    """A regex's match as a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _extract(root: Path, file: str, spec: dict[str, Any]) -> Any:
    """One value of one raw file: ``json`` (a path; a .jsonl file is the list of its lines) or ``regex``."""
    path = root / file
    if not path.is_file():
        raise ClaimError(f"raw file {file} is missing")
    text = path.read_text()
    try:
        if "regex" in spec:
            m = re.search(spec["regex"], text)
            if not m:
                raise KeyError(spec["regex"])
            return _number(m.group(1))
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if file.endswith(".jsonl") \
            else json.loads(text)
        got = _walk(data, re.findall(r"\*?\[[^\]]*\]|[^.]+", spec["json"]))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ClaimError(f"{spec.get('regex') or spec.get('json')!r} not found in {file} ({type(e).__name__})")
    if got is None or (isinstance(got, list) and None in got):
        raise ClaimError(f"{spec.get('regex') or spec.get('json')!r} is null in {file}")
    return got


def _read(root: Path, entry: dict[str, Any], spec: Any) -> Any:
    """A literal, or a value read as the spec says (from ``file``, by default the entry's first raw file)."""
    if not isinstance(spec, dict):
        return spec
    files = spec.get("file", _as_list(entry["raw"])[0])
    got = [_extract(root, f, spec) for f in _as_list(files)]
    return got if isinstance(files, list) else got[0]


def _show(value: Any, fmt: str | None) -> str:
    """``format`` is a format spec plus an optional suffix (.2f×); a list shows as a / b / c."""
    if isinstance(value, list):
        return " / ".join(_show(v, fmt) for v in value)
    if not fmt:
        return str(value)
    spec, suffix = re.fullmatch(r"(.*?[bcdeEfFgGnosxX%])(.*)", fmt).groups()
    return format(float(value) if isinstance(value, str) else value, spec) + suffix


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _row(root: Path, entry: dict[str, Any]) -> str:
    """One table row, every figure read from the entry's raw files."""
    missing = [k for k in REQUIRED if k not in entry] + ([] if "goal_check" in entry or "met" in entry else ["met"])
    if missing:
        raise ClaimError(f"missing {', '.join(missing)}")
    for raw in _as_list(entry["raw"]):
        if not (root / raw).is_file():
            raise ClaimError(f"raw file {raw} is missing")
    values: dict[str, Any] = {}
    shown: dict[str, str] = {}
    for name, spec in (entry.get("values") or {}).items():
        try:
            values[name] = eval(spec["expr"], EXPR_NAMES | values) if "expr" in spec else _read(root, entry, spec)
            shown[name] = _show(values[name], spec.get("format"))
        except ClaimError as e:
            raise ClaimError(f"value {name}: {e}")
        except Exception as e:  # an expression or a format that does not fit the value
            raise ClaimError(f"value {name}: {type(e).__name__}: {e}")
    try:
        figure = entry["figure"].format_map(shown)
        met = ("yes" if eval(entry["goal_check"], EXPR_NAMES | values) else "no") if "goal_check" in entry \
            else {True: "yes", False: "no"}.get(entry["met"], entry["met"])  # YAML reads a bare yes/no as a bool
    except Exception as e:
        raise ClaimError(f"figure or goal_check: {type(e).__name__}: {e}")
    try:
        commands = " <br> ".join(f"`{_read(root, entry, c)}`" for c in _as_list(entry["command"]))
        commit = _read(root, entry, entry["commit"])
    except ClaimError as e:
        raise ClaimError(f"command or commit: {e}")
    raws = " <br> ".join(f"[{Path(r).relative_to('bench/results')}]({r})" for r in _as_list(entry["raw"]))
    cells = [f'<a id="claim-{entry["id"]}"></a>[{entry["claim"]}](#{entry["section"]})', figure, entry["goal"], met,
             commands, commit, entry["date"], entry["machine"], raws]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _anchors(benchmarks: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens (code blocks skipped)."""
    out, fenced = set(), False
    for line in benchmarks.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def render_summary(root: Path = REPO) -> tuple[str, list[str]]:
    """The summary block from ROOT/bench/claims.yaml, and one line per entry that could not be rendered."""
    try:
        entries = yaml.safe_load((root / "bench" / "claims.yaml").read_text())
    except yaml.YAMLError as e:
        return "", [f"bench/claims.yaml: {' '.join(str(e).split())}"]
    anchors = _anchors((root / "BENCHMARKS.md").read_text())
    rows, problems, seen = [], [], set()
    for entry in entries:
        name = entry.get("id", "?")
        if name in seen:
            problems.append(f"claim {name}: the id is used twice")
        seen.add(name)
        if entry.get("section") not in anchors:
            problems.append(f"claim {name}: section #{entry.get('section')} is no heading of BENCHMARKS.md")
        try:
            rows.append(_row(root, entry))
        except ClaimError as e:
            problems.append(f"claim {name}: {e}")
    block = "\n".join([
        BEGIN,
        "Rendered by `python bench/report.py --summary` from [bench/claims.yaml](bench/claims.yaml): every figure is "
        "read from the raw file in its row (`--summary --check` tells whether this table is current). Figures that "
        "later results replaced, and claims without a raw file: "
        "[docs/benchmarks-history.md](docs/benchmarks-history.md).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
        *rows,
        END])
    return block, problems


def _current_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN):text.index(END) + len(END)]


def check_summary(root: Path = REPO) -> list[str]:
    """Every problem with the summary: entries that cannot be read, and rows of BENCHMARKS.md that are stale."""
    block, problems = render_summary(root)
    current = _current_block((root / "BENCHMARKS.md").read_text())
    if current is None:
        return problems + [f"BENCHMARKS.md: no {BEGIN} ... {END} block"]
    if current != block:
        new, old = set(block.splitlines()), set(current.splitlines())
        stale = sorted({m for line in new ^ old for m in re.findall(r'<a id="(claim-[^"]+)">', line)})
        problems += [f"BENCHMARKS.md: row {a} differs from the registry's rendering" for a in stale] or \
            ["BENCHMARKS.md: the summary block differs from the registry's rendering"]
    return problems


def write_summary(root: Path = REPO) -> list[str]:
    """Rewrite BENCHMARKS.md's summary block; nothing is written while any entry cannot be rendered."""
    block, problems = render_summary(root)
    path = root / "BENCHMARKS.md"
    text = path.read_text()
    current = _current_block(text)
    if current is None:
        problems.append(f"BENCHMARKS.md: no {BEGIN} ... {END} block to rewrite")
    if not problems:
        path.write_text(text.replace(current, block))
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--summary", action="store_true", help="render bench/claims.yaml into BENCHMARKS.md's summary")
    ap.add_argument("--check", action="store_true",
                    help="with --summary: write nothing; exit 1 with one line per problem (a raw file missing, a "
                         "value that cannot be read, a table that differs from what the registry renders now)")
    args = ap.parse_args(argv)
    if not args.summary:
        ap.error("nothing to do: --summary [--check]")
    problems = check_summary() if args.check else write_summary()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
