"""bench/RESULTS.md: each benchmark owns one ``## `` section and rewrites only that one."""
from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, section: str, path: Path = RESULTS) -> None:
    """Replace the section headed ``title`` (or append it); other sections stay as they are. Atomic."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = section.rstrip("\n") + "\n\n"           # a blank line before the next section
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, path)


def median_range(values, fmt: str) -> str:
    """``median [min-max]`` of a benchmark's repeated runs, each formatted with ``fmt``."""
    values = list(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def machine_load() -> str:
    """How busy the machine was as a run started (a benchmark's wall times depend on it)."""
    return f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start"


def publish(title: str, text: str, write: bool = True, path: Path = RESULTS) -> None:
    """Print a benchmark's section and, unless told not to, replace it in ``path``."""
    print(text)
    if write:
        write_section(title, text, path)
        print(f"wrote its section of {path}")
