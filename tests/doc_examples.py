"""The shell examples of the docs, run against a real TorchServe (see tests/test_docs_examples.py).

Every ```bash block of a document is split into commands (continuation lines joined, trailing comments kept
apart). A command that talks to a server (curl, `python -m serving predict|models|rollout|...`, variable
assignments) runs, in document order, in one bash process against the test server, with the demo's names
mapped onto it (ports, the model name, .runtime/, reports/samples/). A command that builds, trains, starts or
stops something (`make`, `python -m training`, `python -m serving archive|serve|stop`) is checked without
running it: the make target exists, the CLI parses its arguments, the script is there.

Expectations: exit status 0; for curl, HTTP 200 unless the command's comment starts with another status
(`# 415 ...`). A ```json block right after a bash block is the output of that block's last command and must
match it line by line, with values of labels, models, hosts and numbers free and a `...` line standing for any
number of lines; a ```text block right after one lists lines that output must contain (grep output, any order).
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSED_SERVING = {"archive", "serve", "stop",  # build or start/stop a server: parsed, not run
                  "predict-video"}  # needs a segmentation model: run for real in tests/test_video_serving.py
PY = re.compile(r"^(?:\.venv/bin/)?python3?$")


@dataclass
class Command:
    source: str       # file:line
    text: str         # the command as documented (comment stripped)
    comment: str = ""
    kind: str = "run"  # run | parse

    @property
    def expected_status(self) -> int | None:
        m = re.match(r"(\d{3})\b", self.comment)
        return int(m.group(1)) if m else None


@dataclass
class Block:
    commands: list[Command] = field(default_factory=list)
    output: str | None = None  # the ```json or ```text block that follows, if any
    output_kind: str = ""      # json | text
    output_source: str = ""


def split_comment(line: str) -> tuple[str, str]:
    """`cmd  # comment` -> (cmd, comment); a # inside quotes or $(...) is not a comment."""
    quote, depth = None, 0
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def read_blocks(path: Path) -> list[Block]:
    """The bash blocks of a markdown file, each with the json block that directly follows it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i, name, bash_end = 0, path.relative_to(ROOT) if path.is_relative_to(ROOT) else path, -10
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            start, i = i + 1, i + 1
            while not lines[i].strip().startswith("```"):
                i += 1
            body = lines[start:i]
            if fence == "```bash":
                blocks.append(Block(_commands(body, str(name), start)))
                bash_end = i
            elif fence in ("```json", "```text") and blocks and not "".join(lines[bash_end + 1:start - 1]).strip():
                blocks[-1].output, blocks[-1].output_source = "\n".join(body), f"{name}:{start}"
                blocks[-1].output_kind = fence[3:]
        i += 1
    return blocks


def _commands(body: list[str], name: str, first: int) -> list[Command]:
    out, pending, at = [], "", first
    for n, raw in enumerate(body):
        text, comment = split_comment(raw)
        if not pending:
            at = first + n + 1
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text:
            cmd = Command(f"{name}:{at}", text, comment)
            cmd.kind = classify(cmd.text)
            out.append(cmd)
    return out


def classify(text: str) -> str:
    kinds = {_part_kind(part) for part in re.split(r"\s&&\s", text)}
    if len(kinds) > 1:
        raise ValueError(f"mixes commands that run and commands that build/start things: {text}")
    return kinds.pop()


def _part_kind(part: str) -> str:
    words = shlex.split(part.split("|")[0])
    while words and re.match(r"^[A-Za-z_]+=", words[0]) and len(words) > 1:
        words = words[1:]  # VAR=value cmd
    head = words[0] if words else ""
    if head == "make" or head.endswith("/tensorboard"):
        return "parse"
    if head.endswith("/torchrun"):  # torchrun [launcher flags] -m training ...: the training CLI, parsed
        return "parse" if words[words.index("-m") + 1:][:1] == ["training"] else "run"
    if PY.match(head) and len(words) > 1:
        if words[1] == "-m" and words[2] == "training":
            return "parse"
        if words[1] == "-m" and words[2] == "serving":
            return "parse" if len(words) < 4 or words[3] in PARSED_SERVING else "run"
        if words[1].endswith(".py"):
            return "parse"
    return "run"


def check_parsed(cmd: Command, make_targets: set[str]) -> None:
    """Raise AssertionError when a build/start command would not even start (unknown target, flag, file)."""
    import serving.cli
    import training.cli

    for part in re.split(r"\s&&\s", cmd.text):
        words = shlex.split(part)
        if words[0] == "make":
            targets = [w for w in words[1:] if "=" not in w]
            assert targets and set(targets) <= make_targets, f"{cmd.source}: unknown make target in: {part}"
        elif words[0].endswith("/tensorboard"):
            assert (ROOT / words[0]).is_file(), f"{cmd.source}: {words[0]} is not installed"
        elif words[0].endswith("/torchrun"):
            assert (ROOT / words[0]).is_file(), f"{cmd.source}: {words[0]} is not installed"
            try:
                training.cli.build_parser().parse_args(words[words.index("-m") + 2:])
            except SystemExit:
                raise AssertionError(f"{cmd.source}: the CLI refuses the arguments of: {part}") from None
        elif words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{cmd.source}: no script {words[1]}"
        else:
            parser = (training.cli if words[2] == "training" else serving.cli).build_parser()
            try:
                parser.parse_args(words[3:])
            except SystemExit:
                raise AssertionError(f"{cmd.source}: the CLI refuses the arguments of: {part}") from None


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


# -- running against a server --------------------------------------------------------------------------------
def substitute(text: str, names: dict[str, str], python: str, runtime_dir: Path, store: Path) -> str:
    """The documented command, aimed at the test server (`names`: demo text -> test text)."""
    for old, new in names.items():
        text = text.replace(old, new)
    text = re.sub(r"(?:\.venv/bin/)?python -m serving (\S+)",
                  lambda m: f"@PY@ -m serving {m.group(1)} --runtime-dir {runtime_dir} --store {store}", text)
    text = text.replace(".venv/bin/python", "@PY@").replace("@PY@", python)
    if text.startswith("curl "):  # the status on a line of its own, after the body
        text = "curl -sS -w '\\n@@@ http %{http_code}\\n' " + text[5:]
    return text


def run_commands(commands: list[str], cwd: Path, timeout: float = 300) -> list[tuple[int, int | None, str]]:
    """Run the commands in one bash (variables carry over); per command: (exit status, HTTP status, output)."""
    script = []
    for i, c in enumerate(commands):
        script.append(f"printf '@@@ begin {i}\\n'\n{c}\nprintf '\\n@@@ rc %d\\n' $?")
    p = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    results = []
    for chunk in p.stdout.split("@@@ begin ")[1:]:
        _, _, body = chunk.partition("\n")
        rc = int(re.findall(r"@@@ rc (\d+)", body)[-1])
        http = re.findall(r"@@@ http (\d+)", body)
        text = re.sub(r"\n?@@@ (rc|http) \d+\n?", "", body).strip("\n")
        results.append((rc, int(http[-1]) if http else None, text))
    if len(results) != len(commands):
        raise AssertionError(f"the example script stopped early: {p.stderr[-2000:]}")
    return results


_VALUES = [(re.compile(r'("(?:label|model)": )"[^"]*"'), r'\1"*"'), (re.compile(r'(Hostname=)"[^"]*"'), r'\1"*"'),
           (re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?"), "0")]


def _normal(line: str) -> str:
    for pattern, repl in _VALUES:
        line = pattern.sub(repl, line)
    return line.rstrip()


def output_matches(documented: str, actual: str, kind: str = "json") -> bool:
    """json: line by line with free values, a documented line `...` standing for any number of actual lines.
    text: every documented line is one of the actual lines (values free)."""
    doc = [_normal(x) for x in documented.splitlines()]
    act = [_normal(x) for x in actual.splitlines()]
    if kind == "text":
        return set(doc) <= set(act)

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(doc):
            return j == len(act)
        if doc[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(act) + 1))
        return j < len(act) and doc[i] == act[j] and match(i + 1, j + 1)

    return match(0, 0)
