"""Rewrite the results blocks of README.md and docs/*.md from experiments/results/<name>.md.

    python experiments/embed_results.py                    # rewrite README.md and every docs/*.md in place
    python experiments/embed_results.py docs/results.md    # only the files named
    python experiments/embed_results.py --check            # exit 1 if a block differs from its file (CI)

A block is everything between `<!-- results: <name> -->` and the next `<!-- /results -->`; its text
becomes exactly the content of experiments/results/<name>.md (written by the command named in that
file's first line). tests/test_readme_numbers.py checks README.md and every docs/*.md against the same
files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
BLOCK = re.compile(r"(<!-- results: ([A-Za-z0-9_-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def pages(repo: Path = REPO) -> list[Path]:
    """The files whose blocks are filled by default: README.md, then every docs/*.md."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def embed(text: str, results_dir: Path = RESULTS) -> tuple[str, list[str]]:
    """The text with every block filled from its file; and the names whose file is missing."""
    missing = []

    def fill(match: re.Match) -> str:
        name = match.group(2)
        path = results_dir / f"{name}.md"
        if not path.is_file():
            missing.append(name)
            return match.group(0)
        return match.group(1) + path.read_text() + match.group(4)

    return BLOCK.sub(fill, text), missing


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="the Markdown files to fill (default: README.md and every docs/*.md)")
    parser.add_argument("--readme", action="append", default=[], metavar="FILE",
                        help="a file to fill, like a positional FILE (may be given several times)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args(argv)
    files = [Path(f) for f in [*args.files, *args.readme]] or pages()
    status = 0
    for path in files:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            status = 1
            continue
        text = path.read_text()
        new, missing = embed(text)
        names = [m.group(2) for m in BLOCK.finditer(text)]
        for name in missing:
            print(f"error: {_shown(path)}: experiments/results/{name}.md is missing: run its command in "
                  f"experiments/ (e.g. python experiments/{name}.py), then this again", file=sys.stderr)
            status = 1
        if args.check:
            if new != text:
                print(f"error: {_shown(path)}: blocks differ from experiments/results/: "
                      "run python experiments/embed_results.py", file=sys.stderr)
                status = 1
            continue
        if new != text:
            path.write_text(new)
        if names:
            print(f"{len(names)} block(s) in {_shown(path)}: {', '.join(names)}"
                  + (" (updated)" if new != text else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
