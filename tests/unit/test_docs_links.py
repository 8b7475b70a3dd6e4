"""The repository's pointers into its docs resolve: every ``docs/architecture.md#section``
named in code, tests, tools or docs is a heading of that page (code comments say why in
one line and point there), every ``docs/architecture.md, "Section"`` names one too, and
every relative link in README.md and docs/*.md reaches a file that exists (and, for a
markdown file with ``#anchor``, a heading of it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Where pointers to docs/architecture.md may be written.
SOURCES = ["services", "common", "tests", "loadtest", "docs", "deploy", ".ci", "README.md"]
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ""}

ANCHOR = re.compile(r"architecture\.md#([A-Za-z0-9_-]+)")
QUOTED = re.compile(r'architecture\.md,\s+(?:#\s*)?"([^"]+)"')
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces
    to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # links: their text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> tuple[set[str], set[str]]:
    """(the anchors, the plain heading texts) of a markdown file, outside code fences;
    a repeated heading's later anchors get GitHub's -1, -2 suffixes."""
    anchors: set[str] = set()
    texts: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        texts.add(m.group(1).strip())
        base = slug(m.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors, texts


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if (
                    f.is_file()
                    and f.suffix in SUFFIXES
                    and ".venv" not in f.parts
                    and "__pycache__" not in f.parts
                    and "raw" not in f.relative_to(ROOT).parts[:3]
                    and f != Path(__file__).resolve()  # its docstring shows the forms
                ):
                    files.append(f)
    return files


def pointers() -> list[tuple[str, str, str]]:
    """(file:line, "anchor" or "quoted", the anchor or section) for every pointer."""
    found: list[tuple[str, str, str]] = []
    for path in source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "architecture.md" not in text:
            continue
        # A quoted section may wrap onto the next line of a comment or docstring.
        flat = re.sub(r"\n\s*(?:#\s*)?", " ", text)
        for i, line in enumerate(text.splitlines(), 1):
            for anchor in ANCHOR.findall(line):
                found.append((f"{path.relative_to(ROOT)}:{i}", "anchor", anchor))
        for section in QUOTED.findall(flat):
            found.append((str(path.relative_to(ROOT)), "quoted", section))
    return found


def test_architecture_page_exists() -> None:
    assert ARCHITECTURE.is_file(), "docs/architecture.md is missing"


def test_every_architecture_pointer_names_a_heading() -> None:
    anchors, texts = headings(ARCHITECTURE)
    found = pointers()
    assert found, "no pointer to docs/architecture.md found: the scan is broken"
    broken = [
        f"{where}: {kind} {target!r}"
        for where, kind, target in found
        if (target not in anchors if kind == "anchor" else target not in texts)
    ]
    assert not broken, "pointers to sections docs/architecture.md does not have:\n" + "\n".join(
        broken
    )


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken: list[str] = []
    fenced = False
    for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = page if not path_part else (page.parent / path_part).resolve()
            if not dest.exists():
                broken.append(f"{page.name}:{i}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in headings(dest)[0]:
                broken.append(f"{page.name}:{i}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
