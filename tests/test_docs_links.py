"""The README and the pages of docs/ link to files that exist and to headings that exist (GitHub's anchor
rules); the README stays a short front door that links to every page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(REPO)) for page in PAGES]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def prose(text: str) -> str:
    """`text` without fenced code blocks, indented code blocks and code spans (their brackets are no links)."""
    text = FENCE.sub("", text)
    text = "\n".join("" if line.startswith(("    ", "\t")) and not line.lstrip().startswith(("-", "*", "|"))
                     else line for line in text.splitlines())
    return CODE_SPAN.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation other than '-' and '_' dropped, lowercase,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` whose file or #anchor does not exist."""
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif unquote(anchor) not in anchors(dest):
                problems.append(f"{target}: no heading with anchor #{anchor} in {_shown(dest)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "README.md").write_text("# Title\n\n## Quick start (Python 3.11, a fresh machine)\n")
    page.write_text(
        "# Page\n\n## Presets (`experiment=...`)\n\n"
        "[ok](../README.md#quick-start-python-311-a-fresh-machine) [ok](#presets-experiment) [ok](page.md)\n"
        "[gone](missing.md) [bad anchor](../README.md#quick-start) [bad here](#presets)\n"
        "`[not a link](missing-in-code.md)` [web](https://example.org/x.md)\n\n"
        "```\n[not a link](missing-in-fence.md)\n```\n")
    problems = broken_links(page)
    assert [p.split(": ")[0] for p in problems] == ["missing.md", "../README.md#quick-start", "#presets"], problems


def test_github_anchor_rules():
    assert slug("Quick start (Python 3.11, a fresh machine, offline apart from PyPI)") == \
        "quick-start-python-311-a-fresh-machine-offline-apart-from-pypi"
    assert slug("Other attacks on the same digits (`dataset.scenario.attack`)") == \
        "other-attacks-on-the-same-digits-datasetscenarioattack"
    assert slug("The defender's operating point (`select`)") == "the-defenders-operating-point-select"
    assert slug("Leaderboard: attacks x defenses") == "leaderboard-attacks-x-defenses"
    assert slug("G(B, B') as an MLflow model, and serving it") == "gb-b-as-an-mlflow-model-and-serving-it"


def test_the_readme_is_a_short_front_door_linking_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "move the details into a page of docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [str(page.relative_to(REPO)) for page in PAGES[1:] if page.resolve() not in linked]
    assert unlinked == []
