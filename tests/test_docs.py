"""The docs stand alone: every relative link resolves to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    ROOT / "SECURITY.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "charts" / "body-based-routing" / "README.md",
]
# [text](target "title"), ![alt](target), and reference definitions `[name]: target`.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def links(text: str) -> list[str]:
    text = _FENCE.sub("", text)  # code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) for pattern in (_INLINE, _REFERENCE, _HTML) for m in pattern.finditer(text)]


def test_the_docs_exist() -> None:
    for doc in DOCS:
        assert doc.is_file(), doc
    assert (ROOT / "docs" / "reference.md").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    bad: list[str] = []
    for target in links(doc.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not resolved.exists():
            bad.append(f"{target}: no such file")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_link_finder_finds_links() -> None:
    """Guard against a finder that finds nothing (and so can never fail)."""
    found = links('See [a](../x.md), ![p](img.png "t"), <img src="y.png">\n\n[r]: docs/z.md\n')
    assert found == ["../x.md", "img.png", "docs/z.md", "y.png"]
    readme = links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/reference.md" in readme


@pytest.mark.parametrize("doc", ["README.md", "docs/reference.md"])
def test_request_tables_say_what_the_code_does(doc: str) -> None:
    """`identity` is no encoding and application/*+json is JSON: the code reads both
    (tests/test_decision.py), so the request tables must say so."""
    rows = [
        line
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines()
        if line.startswith("| ")
    ]
    encoding = [r for r in rows if "`content-encoding: gzip`" in r]
    assert encoding and "`identity`" in encoding[0], encoding
    assert any("`application/*+json`" in r and "400" in r for r in rows)
    assert any("an empty body however it comes" in r and "pass" in r for r in rows)


def test_the_module_map_names_every_module() -> None:
    """README's Development map names every module of bbr/ and bbr/sources/ and the
    top-level folders, so a new maintainer finds each one."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Development") :]
    section = section[: section.index("```", section.index("```") + 3)]
    missing = [
        path.stem
        for folder in (ROOT / "bbr", ROOT / "bbr" / "sources")
        for path in folder.glob("*.py")
        if not path.stem.startswith("_") and not re.search(rf"\b{path.stem}(\.py)?\b", section)
    ]
    missing += [
        folder
        for folder in ("bench/", "harness/", "demo/", "tests/", "charts/", "protos/")
        if folder not in section
    ]
    assert not missing, missing
