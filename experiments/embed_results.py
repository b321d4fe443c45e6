"""Rewrite the README's results blocks from experiments/results/<name>.md.

    python experiments/embed_results.py            # rewrite README.md in place
    python experiments/embed_results.py --check    # exit 1 if a block differs from its file (CI)

A block is everything between `<!-- results: <name> -->` and the next `<!-- /results -->`; its text
becomes exactly the content of experiments/results/<name>.md (written by the command named in that
file's first line). tests/test_readme_numbers.py checks the README against the same files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
BLOCK = re.compile(r"(<!-- results: ([A-Za-z0-9_-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def embed(text: str, results_dir: Path = RESULTS) -> tuple[str, list[str]]:
    """The README text with every block filled from its file; and the names whose file is missing."""
    missing = []

    def fill(match: re.Match) -> str:
        name = match.group(2)
        path = results_dir / f"{name}.md"
        if not path.is_file():
            missing.append(name)
            return match.group(0)
        return match.group(1) + path.read_text() + match.group(4)

    return BLOCK.sub(fill, text), missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    new, missing = embed(text)
    names = [m.group(2) for m in BLOCK.finditer(text)]
    for name in missing:
        print(f"error: experiments/results/{name}.md is missing: run its command in experiments/ "
              f"(e.g. python experiments/{name}.py), then this again", file=sys.stderr)
    if args.check:
        if new != text:
            print("error: README.md blocks differ from experiments/results/: run python experiments/embed_results.py",
                  file=sys.stderr)
            return 1
        return 1 if missing else 0
    if new != text:
        readme.write_text(new)
    print(f"{len(names)} block(s) in {readme.name}: {', '.join(names)}" + (" (updated)" if new != text else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
