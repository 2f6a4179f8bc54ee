"""Replace one "## <heading>" section of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, section: str, path: Path = RESULTS) -> None:
    """``section`` starts with ``## {heading}``; an existing section of that name is replaced."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(f"## {heading}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end == -1 else text[end:])
    path.write_text(text.rstrip("\n") + "\n")
