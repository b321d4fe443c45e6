"""experiments/docs_commands.py finds the commands of a page as a reader would type them, and checks an output
block against what a command printed."""

from __future__ import annotations

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("docs_commands", REPO / "experiments" / "docs_commands.py")
docs_commands = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_commands)

PAGE = """# A page

```bash
# a comment line
python -m defense.evaluate model=lab3 \\
    split=all
python -m defense.run -m prune.criterion=activation,l1      # a sweep
```

```
Clean Classification accuracy: 99.00 %
```

Some prose.

```bash
mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db
python experiments/leaderboard.py --seeds 1
python -m defense.run -m experiment=leaderboard
```

text

```text
not an output of the block above: prose stands between
```
"""


def test_commands_are_joined_stripped_of_comments_and_given_their_output_block():
    found = docs_commands.commands_of("page.md", PAGE)
    assert [c["command"] for c in found] == [
        "python -m defense.evaluate model=lab3 split=all",
        "python -m defense.run -m prune.criterion=activation,l1",
        "mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db",
        "python experiments/leaderboard.py --seeds 1",
        "python -m defense.run -m experiment=leaderboard",
    ]
    assert [c["line"] for c in found] == [5, 7, 17, 18, 19]
    assert found[1]["expect"] == ["Clean Classification accuracy: 99.00 %"]
    assert all(not c["expect"] for c in found if c is not found[1])
    assert [docs_commands.kind_of(c["command"]) for c in found] == ["run", "run", "server", "study", "reduced"]
    # the pages' own line for this script is never started again from within it (with or without a results file)
    assert docs_commands.kind_of("python experiments/docs_commands.py") == "self"


def test_an_output_block_matches_with_placeholders_and_names_what_is_missing():
    printed = "TF noise\n  Clean Classification accuracy: 99.00 %\ndone in 12.5 s: results in outputs/run/x\n"
    assert docs_commands.expected_found(["Clean Classification accuracy: 99.00 %",
                                         "done in <seconds> s: results in <run folder>"], printed) == []
    assert docs_commands.expected_found(["Attack Success Rate: 100.00 %"], printed) == ["Attack Success Rate: 100.00 %"]
    assert docs_commands.expected_found(["Clean Classification accuracy: 98.00 %"], printed) != []


def test_a_study_line_quotes_the_results_file_its_own_command_wrote():
    """A study command with options quotes the header of the file that very command wrote (the prune_aware variant
    of the ablation study writes its own file), and a page command with fewer options than the header's (a rerun
    with --report-again) falls back to the script's own file."""
    results = REPO / "experiments" / "results"
    variant = (results / "finetune_ablation_seeds_prune_aware.md").read_text().splitlines()[0]
    plain = (results / "finetune_ablation_seeds.md").read_text().splitlines()[0]
    assert variant != plain
    assert docs_commands.study_header("python experiments/finetune_ablation_seeds.py --attack prune_aware") == variant
    assert docs_commands.study_header("python experiments/finetune_ablation_seeds.py") == plain
    leaderboard = (results / "leaderboard.md").read_text().splitlines()[0]
    assert docs_commands.study_header("python experiments/leaderboard.py") == leaderboard
    # another network's board: the file whose header names the command with more options, not DeepID's
    preact = (results / "leaderboard_preact_resnet.md").read_text().splitlines()[0]
    assert preact.startswith("Written by `python experiments/leaderboard.py --arch preact_resnet --seeds 1 --out ")
    assert docs_commands.study_header("python experiments/leaderboard.py --arch preact_resnet --seeds 1") == preact
    # the line a run's note quotes: its last printed stdout line, not stderr's progress bars
    assert docs_commands.last_line("footer line\n\n") == "footer line"
