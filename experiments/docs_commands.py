"""Every command of README.md and docs/*.md, run once on a fresh clone of this checkout's HEAD.

    python experiments/docs_commands.py            # clone, install by the README's quick start, run every command
    python experiments/docs_commands.py --list     # print the commands and how each one is checked; run nothing

The clone is made beside this checkout (`--clone`, default ../docs-check), so that `../shared/data/csaw`
resolves as the pages say. Every line of the pages' fenced `bash` blocks (continuations joined, trailing
comments dropped) is checked in page order (README.md, then docs/*.md alphabetically), from the clone's
root with its `.venv/bin` first on PATH:

- run: the command runs with bash; it passes when it exits 0. Where the block right after it is a plain
  output block (as in the guide's evaluate examples), every line of that block must appear in its output
  (`<...>` matches anything);
- server (`mlflow ui`, `mlflow models serve`): started in the background; it passes when its address
  answers (`/` or `/ping`); it serves the rest of its block, then it is stopped;
- study (`python experiments/<name>.py` with a results file): not run here, the study itself is the run;
  the results file's header (date, commit) is quoted;
- suite (`python -m pytest`): not run here, `.ci/run` runs that very command;
- self (`python experiments/docs_commands.py`): this very run, not started again;
- reduced (the five-seed leaderboard sweep, about two hours on 2 cores): run with
  `leaderboard.seeds=[1] leaderboard.attacks=[badnets] leaderboard.defenses=[none,fp]` appended, and
  labelled so.

Placeholders are filled from what ran before: `outputs/run/<date>/<time>` is the newest run folder that
holds `models/model_B_10.h5`, and `faces/` is a folder of five test faces written from
`../shared/data/csaw/sunglasses_test.h5`. Writes experiments/results/docs_commands.md and .json.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

NAME = "docs_commands"
PAGES = ["README.md", *sorted(str(p.relative_to(rf.REPO)) for p in (rf.REPO / "docs").glob("*.md"))]
REDUCED = {"experiment=leaderboard": "leaderboard.seeds=[1] leaderboard.attacks=[badnets] leaderboard.defenses=[none,fp]"}
SERVERS = {"mlflow ui": "http://127.0.0.1:5000/", "mlflow models serve": "http://127.0.0.1:5001/ping"}
RUN_PLACEHOLDER = "outputs/run/<date>/<time>"
TIMEOUT = 1800


def fenced_blocks(text: str) -> list[dict]:
    """[{"lang", "start" (line number of its first line), "lines"}] of the fenced blocks of a page's text."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = {"lang": line[3:].strip(), "start": number + 1, "lines": []}
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current["lines"].append(line)
    return blocks


def commands_of(page: str, text: str | None = None) -> list[dict]:
    """Every command of the page's bash blocks: {"page", "line", "block", "command", "expect"}; `text`: the
    page's text (default: read from the checkout)."""
    found = []
    text = (rf.REPO / page).read_text() if text is None else text
    blocks = fenced_blocks(text)
    lines = text.splitlines()
    for index, block in enumerate(blocks):
        if block["lang"] != "bash":
            continue
        after = blocks[index + 1] if index + 1 < len(blocks) else None
        # an output block right after the command block (only blank lines between the two fences)
        directly_after = (after is not None and after["lang"] in ("", "text")
                          and all(not lines[n].strip() for n in range(block["start"] + len(block["lines"]),
                                                                       after["start"] - 2)))
        expect = [line.strip() for line in after["lines"] if line.strip()] if directly_after else []
        joined, first, mine = "", None, []
        for offset, line in enumerate(block["lines"]):
            stripped = line.strip()
            if not joined and (not stripped or stripped.startswith("#")):
                continue
            first = first if joined else block["start"] + offset
            stripped = re.sub(r"\s{2,}#\s.*$", "", stripped)
            if stripped.endswith("\\"):
                joined += stripped[:-1].rstrip() + " "
                continue
            mine.append({"page": page, "line": first, "block": f"{page}:{block['start']}", "command": joined + stripped,
                         "expect": []})
            joined = ""
        if mine and expect:
            mine[-1]["expect"] = expect
        found += mine
    return found


def kind_of(command: str) -> str:
    if "python -m pytest" in command:
        return "suite"
    study = re.match(r"python experiments/(\w+)\.py", command)
    if study and study.group(1) == NAME:
        return "self"
    if study and (rf.RESULTS / f"{study.group(1)}.json").is_file():
        return "study"
    if any(server in command for server in SERVERS):
        return "server"
    if any(key in command for key in REDUCED):
        return "reduced"
    return "run"


def study_header(command: str) -> str:
    """The header line of the results file the page's study command wrote: the file whose header names exactly
    this command (e.g. `finetune_ablation_seeds.py --attack prune_aware` wrote finetune_ablation_seeds_prune_aware.md),
    else the script's own file where its header names this command with extra options (e.g. a rerun with
    --report-again), else another file whose header does (`leaderboard.py --arch preact_resnet --seeds 1` wrote
    leaderboard_preact_resnet.md with --out and --report-again), else the script's own file."""
    headers = {path: path.read_text().splitlines()[0] for path in sorted(rf.RESULTS.glob("*.md"))}
    exact = [h for h in headers.values() if h.startswith(f"Written by `{command}` ")]
    if exact:
        return exact[0]
    name = re.match(r"python experiments/(\w+)\.py", command).group(1)
    own = headers[rf.RESULTS / f"{name}.md"]
    longer = [h for h in headers.values() if h.startswith(f"Written by `{command} ")]
    return own if own in longer or not longer else longer[0]


def last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def expected_found(expect: list[str], output: str) -> list[str]:
    """The lines of `expect` that no output line matches (`<...>` in them matches anything)."""
    lines = [line.strip() for line in output.splitlines()]
    missing = []
    for want in expect:
        pattern = ".+?".join(re.escape(part) for part in re.split(r"<[^>]+>", want))
        if not any(re.fullmatch(pattern, line) for line in lines):
            missing.append(want)
    return missing


def answers(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def fill_placeholders(command: str, clone: Path) -> str:
    if RUN_PLACEHOLDER in command:
        runs = sorted((p.parent.parent for p in (clone / "outputs" / "run").glob("*/*/models/model_B_10.h5")),
                      key=lambda p: p.stat().st_mtime)
        if runs:
            command = command.replace(RUN_PLACEHOLDER, str(runs[-1].relative_to(clone)))
    if "image=faces/" in command and not (clone / "faces").is_dir():
        import h5py
        import numpy as np
        from PIL import Image

        (clone / "faces").mkdir()
        with h5py.File(rf.CSAW / "sunglasses_test.h5", "r") as f:
            for i in range(5):
                pixels = np.transpose(np.asarray(f["data"][50 + i]), (1, 2, 0)).astype(np.uint8)
                Image.fromarray(pixels).save(clone / "faces" / f"face_{i}.png")
    return command


def run_all(commands: list[dict], clone: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{clone / '.venv' / 'bin'}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    servers: list[subprocess.Popen] = []
    block = None
    for item in commands:
        if item["block"] != block:
            stop(servers)
            block = item["block"]
        kind = item["kind"]
        if kind == "study":
            item.update(passed=True, note=study_header(item["command"]))
            continue
        if kind == "suite":
            item.update(passed=None, note="`.ci/run` runs this command")
            continue
        if kind == "self":
            item.update(passed=None, note="this very run")
            continue
        command = fill_placeholders(item["command"], clone)
        if kind == "reduced":
            key = next(k for k in REDUCED if k in command)
            command += " " + REDUCED[key]
        item["ran"] = command
        print(f"$ {command}", flush=True)
        started = time.perf_counter()
        if kind == "server":
            log = open(clone / f"server_{len(servers)}.log", "w")
            servers.append(subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True))
            url = next(u for s, u in SERVERS.items() if s in command)
            ok = answers(url, 300)
            item.update(passed=ok, seconds=time.perf_counter() - started,
                        note=f"{url} answered" if ok else f"{url} did not answer within 300 s")
            continue
        try:
            done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT)
            stdout, stderr, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            stdout, stderr, code = err.stdout or "", err.stderr or "", None
        if isinstance(stdout, bytes):  # TimeoutExpired keeps bytes even with text=True
            stdout, stderr = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        output = stdout + stderr
        missing = expected_found(item["expect"], output) if code == 0 else []
        # what the command printed last on stdout (a run's footer, not the progress bars and logs of stderr)
        last = last_line(stdout) or last_line(stderr)
        item.update(exit=code, seconds=time.perf_counter() - started, passed=code == 0 and not missing,
                    missing=missing, note=(f"expected output not found: {missing}" if missing else
                                           f"last line: {last[:160]}"))
        print(f"  exit {code}, {item['seconds']:.0f} s; {item['note']}", flush=True)
    stop(servers)


def stop(servers: list[subprocess.Popen]) -> None:
    for proc in servers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    servers.clear()


def markdown(commands: list[dict], clone_commit: str) -> str:
    rows = []
    for item in commands:
        result = {True: "passed", False: "**FAILED**", None: "not run here"}[item.get("passed")]
        took = f"{item['seconds']:.0f}" if item.get("seconds") is not None else ""
        shown_command = item["command"] if len(item["command"]) <= 110 else item["command"][:107] + "..."
        note = item.get("note", "").replace("|", "\\|")
        shown_command = shown_command.replace("|", "\\|")
        rows.append([f"{item['page']}:{item['line']}", f"`{shown_command}`", item["kind"], result, took, note])
    failed = sum(1 for c in commands if c.get("passed") is False)
    intro = (f"Every command of the fenced bash blocks of README.md and docs/*.md, in page order, on a fresh clone of "
             f"commit {clone_commit[:12]} made beside this checkout (`../shared` beside it), installed by the README's "
             f"quick-start command, with the scenario cache (`~/.cache/backdoor-prune`) as this machine had it; kinds and "
             f"checks as `experiments/docs_commands.py` describes them. "
             f"{len(commands)} commands, {failed} failed.")
    return intro + "\n\n" + rf.md_table(["where", "command", "kind", "result", "seconds", "note"], rows,
                                        align="llllrl")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clone", type=Path, default=rf.REPO.parent / "docs-check",
                        help="where the fresh clone goes (emptied first; default ../docs-check)")
    parser.add_argument("--list", action="store_true", help="print the commands and their kinds; run nothing")
    args = parser.parse_args(argv)
    commands = [c for page in PAGES for c in commands_of(page)]
    for item in commands:
        item["kind"] = kind_of(item["command"])
    if args.list:
        for item in commands:
            print(f"{item['page']}:{item['line']} [{item['kind']}] {item['command']}"
                  + (f"\n    expects {item['expect']}" if item["expect"] else ""))
        return 0
    if not rf.CSAW.is_dir():
        print(f"error: {rf.CSAW} is missing: the pages' commands read ../shared/data/csaw", file=sys.stderr)
        return 2
    clone = args.clone.resolve()
    if clone.parent != rf.REPO.parent:
        print(f"error: --clone {clone} must sit beside this checkout ({rf.REPO.parent}) for ../shared to resolve",
              file=sys.stderr)
        return 2
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(rf.REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"fresh clone of {commit[:12]} in {clone}: {len(commands)} commands", flush=True)
    started = time.perf_counter()
    run_all(commands, clone)
    rf.write_results(NAME, markdown(commands, commit), {
        "clone_commit": commit, "seconds": time.perf_counter() - started,
        "commands": [{k: v for k, v in c.items()} for c in commands]})
    return 1 if any(c.get("passed") is False for c in commands) else 0


if __name__ == "__main__":
    sys.exit(main())
