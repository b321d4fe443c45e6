"""The numbers of README.md and of every docs/*.md page come from committed commands: every results
block equals its file in experiments/results/, and every number of a results table or an example output
equals one that a results file holds. A hand-edited number fails (shown on modified copies of each page)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
RESULTS = REPO / "experiments" / "results"
# the pages whose numbers are checked: the README and every page of docs/ (experiments/embed_results.py fills them)
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(REPO)) for page in PAGES]
BLOCK = re.compile(r"<!-- results: ([A-Za-z0-9_-]+) -->\n(.*?)<!-- /results -->", re.DOTALL)
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
# tables outside the blocks that list options, files, presets or the package's layers (not measurements),
# by first header cell ("#": the numbered layers of docs/architecture.md)
REFERENCE_TABLES = {"key", "file", "preset", "results file", "#"}
PACKAGES = ("python", "tensorflow", "keras", "numpy", "mlflow")


def numbers(text: str) -> set[str]:
    """Every number written in `text`, thousands separators dropped ('601,643' -> '601643')."""
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def table_rows(text: str) -> list[str]:
    """The data rows of every markdown table in `text` (no header or rule rows)."""
    rows = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("|"):
            continue
        is_rule = set(stripped) <= set("|-: ")
        next_is_rule = i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: ") and "-" in lines[i + 1]
        if not is_rule and not next_is_rule:
            rows.append(stripped)
    return rows


def tables_outside(text: str) -> list[tuple[str, list[str]]]:
    """Markdown tables outside the blocks: (first header cell, data rows)."""
    tables, current, header = [], [], None
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("|"):
            if header is None:
                header = stripped.strip("|").split("|")[0].strip().strip("`").lower()
            elif not set(stripped) <= set("|-: "):
                current.append(stripped)
        elif header is not None:
            tables.append((header, current))
            current, header = [], None
    return tables


def json_numbers(value) -> list:
    """Every number a results .json holds (numeric leaves, and numbers written inside its strings)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    return [float(n.replace(",", "")) for n in NUMBER.findall(str(value))]


def _fixed(value, digits: int) -> str:
    text = f"{float(value):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def json_written(value) -> set[str]:
    """The numbers written inside the strings of a results .json, as written (a date's '07' stays '07')."""
    if isinstance(value, dict):
        return set().union(*(json_written(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(json_written(v) for v in value)) if value else set()
    return numbers(value) if isinstance(value, str) else set()


def md_numbers_not_in_json(md_text: str, data) -> list[str]:
    """Numbers of the .md file's tables that no value of its .json gives at the precision written, and that
    none of its strings (a quoted header, a command's output line) writes as they are."""
    held = json_numbers(data)
    written = json_written(data)
    by_digits: dict[int, set[str]] = {}
    missing = []
    for row in table_rows(md_text):
        for n in numbers(row):
            if n in written:
                continue
            digits = len(n.split(".")[1]) if "." in n else 0
            if digits not in by_digits:
                by_digits[digits] = {_fixed(v, digits) for v in held}
            if n not in by_digits[digits]:
                missing.append(f"{n} in {row!r}")
    return missing


def readme_problems(readme_text: str, results_dir: Path = RESULTS, require_block: bool = True) -> list[str]:
    """What is wrong between a page's text (the README or a docs page) and the results files (empty:
    nothing). The README must hold a results block; a docs page may hold none."""
    problems = []
    blocks = BLOCK.findall(readme_text)
    if not blocks and require_block:
        return ["the README has no results block"]
    all_numbers: set[str] = set()
    for path in sorted(results_dir.glob("*.md")):
        all_numbers |= numbers(path.read_text())
    for name, body in blocks:
        path = results_dir / f"{name}.md"
        if not path.is_file():
            problems.append(f"block {name!r}: experiments/results/{name}.md is missing")
            continue
        text = path.read_text()
        if body != text:
            problems.append(f"block {name!r} differs from experiments/results/{name}.md "
                            "(python experiments/embed_results.py rewrites it)")
        js = results_dir / f"{name}.json"
        if not js.is_file():
            problems.append(f"block {name!r}: experiments/results/{name}.json is missing")
        else:
            for what in md_numbers_not_in_json(text, json.loads(js.read_text())):
                problems.append(f"block {name!r}: {what} is no value of experiments/results/{name}.json")
        have = numbers(text)
        for row in table_rows(body):
            for n in sorted(numbers(row) - have):
                problems.append(f"block {name!r}: {n} in table row {row!r} is not in experiments/results/{name}.md")
    outside = BLOCK.sub("", readme_text)
    for header, rows in tables_outside(outside):
        if header in REFERENCE_TABLES:
            continue
        for row in rows:
            for n in sorted(numbers(row) - all_numbers):
                problems.append(f"table outside the blocks: {n} in {row!r} is in no results file")
    for language, body in FENCE.findall(outside):
        if language.strip():  # commands (```bash), not outputs
            continue
        for line in body.splitlines():
            for n in sorted(numbers(line) - all_numbers):
                problems.append(f"example output outside the blocks: {n} in {line.strip()!r} is in no results file")
    return problems


def _embed_results():
    spec = importlib.util.spec_from_file_location("embed_results", REPO / "experiments" / "embed_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_pages_are_the_readme_and_every_docs_page():
    assert PAGES[0] == README and len(PAGES) > 1
    assert [p.resolve() for p in _embed_results().pages()] == [p.resolve() for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_blocks_and_numbers_match_the_results_files(page):
    text = page.read_text()
    names = [name for name, _ in BLOCK.findall(text)]
    assert len(names) == len(set(names)), f"a results file is embedded twice in {page.name}"
    assert readme_problems(text, require_block=page == README) == []


def test_every_results_file_is_embedded_in_exactly_one_page():
    where: dict[str, list[str]] = {}
    for page, page_id in zip(PAGES, PAGE_IDS):
        for name, _ in BLOCK.findall(page.read_text()):
            where.setdefault(name, []).append(page_id)
    assert {"csaw_extracts", "fine_pruning_seeds", "benchmark", "leaderboard"} <= set(where), where
    assert set(where) == {md.stem for md in RESULTS.glob("*.md")}, where
    assert {name: pages for name, pages in where.items() if len(pages) > 1} == {}
    assert "leaderboard" in [name for name, _ in BLOCK.findall(README.read_text())]


def test_embed_results_check_finds_nothing_to_rewrite(capsys):
    assert _embed_results().main(["--check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(md.stem for md in RESULTS.glob("*.md")))
def test_results_files_say_which_command_machine_and_versions_made_them(name):
    md = RESULTS / f"{name}.md"
    js = RESULTS / f"{name}.json"
    assert md.is_file() and js.is_file(), f"run python experiments/{name}.py (it writes both files)"
    data = json.loads(js.read_text())
    command = data["command"]
    script = command.split()[1]
    assert command.startswith("python experiments/") and (REPO / script).is_file(), command
    assert f"`{command}`" in md.read_text().splitlines()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", data["date"]), data["date"]
    assert int(data["machine"]["cores"]) >= 1
    assert data["machine"]["device"].startswith(("CPU", "GPU"))
    for package in PACKAGES:
        assert data["versions"][package] and data["versions"][package] in md.read_text()


def _edit_first_table_number(text: str, start: int, end: int | None = None) -> tuple[str, str, str]:
    """`text` with the first decimal number of a table row between `start` and `end` changed to 987.65 (a
    percentage, channel count or DER cannot be that); returns (text, old, new)."""
    for row in table_rows(text[start:end]):
        for found in NUMBER.finditer(row):
            if "." in found.group():
                old, new = found.group(), "987.65"
                pos = text.index(row, start) + found.start()
                return text[:pos] + new + text[pos + len(old):], old, new
    raise AssertionError("no table row with a decimal number")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_a_hand_edited_number_fails(page, tmp_path):
    text = page.read_text()
    assert readme_problems(text, require_block=page == README) == []
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)

    for block in BLOCK.finditer(text):
        name = block.group(1)
        # a number of the block's table changed by hand in the page: the block no longer equals its file
        edited, old, new = _edit_first_table_number(text, block.start(), block.end())
        assert any(name in p and "differs" in p for p in readme_problems(edited, require_block=False))

        # the same edit made in the results .md too (a copy of experiments/results/): the .json, written by
        # the same command, holds no such value
        md = copy / f"{name}.md"
        original = md.read_text()
        md.write_text(_edit_first_table_number(original, 0)[0])
        problems = readme_problems(edited, copy, require_block=False)
        assert not any("differs" in p for p in problems), problems
        assert any(name in p and f"{new} in" in p and ".json" in p for p in problems), problems
        md.write_text(original)

    # a results table outside the blocks with a number that no results file holds
    outside = text + "\n| network | clean acc (%) |\n|---|---:|\n| B | 12.34 |\n"
    assert any("12.34" in p for p in readme_problems(outside, require_block=False))

    # an example output outside the blocks with a number no results file holds
    fake_output = text + "\n```\nClean Classification accuracy: 99.50 %\n```\n"
    assert any("99.50" in p for p in readme_problems(fake_output, require_block=False))
    if "Clean Classification accuracy: 99.00 %" in text:  # the evaluate example of docs/guide.md, edited in place
        fake_output = text.replace("Clean Classification accuracy: 99.00 %", "Clean Classification accuracy: 99.50 %", 1)
        assert any("99.50" in p for p in readme_problems(fake_output, require_block=False))

    # a block whose file is missing
    first = BLOCK.search(text)
    if first is not None:
        missing = text.replace(f"<!-- results: {first.group(1)} -->", "<!-- results: no_such_study -->", 1)
        assert any("no_such_study" in p and "missing" in p for p in readme_problems(missing, require_block=False))

    # the README without its blocks
    if page == README:
        assert readme_problems(BLOCK.sub("", text)) == ["the README has no results block"]


def test_the_evaluate_example_output_is_checked():
    """The example output that the original README test edited lives in docs/guide.md now."""
    assert any("Clean Classification accuracy: 99.00 %" in page.read_text() for page in PAGES)


def test_numbers_are_read_as_written():
    assert numbers("| 2 | 601,643 -> 407,593 | 96.50 ± 0.40 | -1.5 | x2 |") == {
        "2", "601643", "407593", "96.50", "0.40", "-1.5"}
    rows = table_rows("| a | b |\n|---|---:|\n| 1 | 2.5 |\n\ntext 3\n| c |\n|---|\n| 4 |\n")
    assert rows == ["| 1 | 2.5 |", "| 4 |"]
