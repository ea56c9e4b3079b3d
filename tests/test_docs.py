"""The documents cannot drift from the code: README.md and every page under docs/.

* Every `balcony ...` command in a fenced code block parses with the real CLI parser (nothing is run).
  A command is a line of a non-Python fenced block that starts with `balcony ` (after an optional
  `$ ` prompt), or that runs `-m balcony VERB` (python, torchrun, accelerate launch), joined
  across trailing backslashes; a trailing `# comment` is dropped as the shell drops it.
* Every ```python block runs, unless its first line starts with `# illustration`. A file's runnable
  blocks run in order in ONE fresh interpreter, sharing one namespace (a later block may use what an
  earlier one defined), in a scratch folder, offline, within RUN_SECONDS.
* mkdocs.yml's nav lists every page under docs/ and nothing else; `mkdocs build --strict` passes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
ILLUSTRATION = "# illustration"
PYTHON = ("python", "py", "python3")
RUN_SECONDS = 300  # per file, on a busy 2-core machine: imports, the default model, a few short generations


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    lines: list[str]

    @property
    def where(self) -> str:
        return f"{_name(self.path)}:{self.line}"


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (also indented ones, as inside list items), dedented."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        lang = (opening["info"].strip().split() or [""])[0].strip("{}.").lower()
        start, body = i, []
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        blocks.append(Block(path, start + 1, lang, body))
    return blocks


_COMMAND = re.compile(r"^(\$\s+)?balcony\s|(^|\s)-m\s+balcony\s")


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """(where, argv after `balcony`) for every balcony command line of a non-Python block."""
    found, i = [], 0
    while i < len(block.lines):
        start, line = i, block.lines[i].strip()
        while line.endswith("\\") and i + 1 < len(block.lines):
            i += 1
            line = line[:-1].rstrip() + " " + block.lines[i].strip()
        i += 1
        if not _COMMAND.search(line):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # unbalanced quotes: reported by the test, not at collection
            words = None
        if words and words[0] == "$":
            words = words[1:]
        if words is None or words[:1] == ["balcony"]:
            argv = words and words[1:]
        else:
            at = next((k for k in range(len(words) - 1) if words[k:k + 2] == ["-m", "balcony"]), None)
            if at is None:
                continue
            argv = words[at + 2:]
        found.append((f"{_name(block.path)}:{block.line + start}", argv))
    return found


def _all_commands() -> list[tuple[str, list[str]]]:
    return [c for path in FILES for block in fenced_blocks(path) if block.lang not in PYTHON for c in commands(block)]


def _python_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.lang in PYTHON]


def _runnable(block: Block) -> bool:
    first = next((line for line in block.lines if line.strip()), "")
    return not first.strip().startswith(ILLUSTRATION)


COMMANDS = _all_commands()
RUNNABLE_FILES = [p for p in FILES if any(_runnable(b) for b in _python_blocks(p))]


# ---------------------------------------------------------------- the extraction itself


def test_extraction_finds_commands_joined_prompted_and_launched(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```bash\n$ balcony info default --json   # a comment\n"
                    "balcony train --exits 15 \\\n    --out runs/x\n"
                    "torchrun --nproc-per-node 2 -m balcony train --out y\n"
                    "pip install balcony\n```\n\n"
                    "- item\n\n    ```console\n    $ balcony generate default --prompt 'a # b'\n    ```\n\n"
                    "```python\n# illustration\nprint('balcony info')\n```\n")
    blocks = fenced_blocks(page)
    assert [b.lang for b in blocks] == ["bash", "console", "python"]
    found = [argv for b in blocks if b.lang not in PYTHON for _, argv in commands(b)]
    assert found == [["info", "default", "--json"], ["train", "--exits", "15", "--out", "runs/x"],
                     ["train", "--out", "y"], ["generate", "default", "--prompt", "a # b"]]
    assert not _runnable(blocks[2])


def test_the_documents_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS
    assert any(w.startswith("README.md") for w, _ in COMMANDS), "README.md shows no balcony command"


# ---------------------------------------------------------------- commands parse


@pytest.fixture(scope="module")
def parser():
    from balcony.cli.parser import build_parser

    return build_parser()


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses(parser, where, argv):
    assert argv is not None, f"{where}: not a shell command line (unbalanced quotes?)"
    if "-h" in argv or "--help" in argv:  # argparse prints and exits; the verb must exist
        verbs = parser._subparsers._group_actions[0].choices
        assert not argv or argv[0].startswith("-") or argv[0] in verbs, f"{where}: no verb {argv[0]!r}"
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `balcony {shlex.join(argv)}` does not parse:\n{err.getvalue()}")


# ---------------------------------------------------------------- Python blocks run


def test_every_python_block_runs_or_is_marked(tmp_path):
    """Run-or-mark is a rule, not a default: a block with no code at all is a mistake either way."""
    for path in FILES:
        for block in _python_blocks(path):
            code = [line for line in block.lines if line.strip() and not line.strip().startswith("#")]
            assert code, f"{block.where}: an empty python block"


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE_FILES])
def test_python_blocks_run(path, tmp_path):
    blocks = [b for b in _python_blocks(path) if _runnable(b)]
    # each block compiled under the document's name, padded so tracebacks give the document's line numbers
    sources = [(str(path.relative_to(ROOT)), "\n" * (b.line - 1) + "\n".join(b.lines) + "\n") for b in blocks]
    script = tmp_path / "run_blocks.py"
    script.write_text(
        "import sys\n"
        f"BLOCKS = {sources!r}\n"
        "namespace = {'__name__': '__main__'}\n"
        "for name, source in BLOCKS:\n"
        "    exec(compile(source, name, 'exec'), namespace)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.relative_to(ROOT)}: its python blocks ran over {RUN_SECONDS} s; mark slow ones "
                    f"`{ILLUSTRATION}` or make them generate fewer tokens")
    assert run.returncode == 0, (
        f"{path.relative_to(ROOT)}: a python block failed (mark blocks that need the network, a server or "
        f"minutes with a first line `{ILLUSTRATION}`):\n{run.stderr[-4000:]}")


# ---------------------------------------------------------------- the site


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, list):
                pages += _nav_pages(value)
            elif isinstance(value, str) and not re.match(r"^[a-z]+://", value):
                pages.append(value)
    return pages


def test_the_nav_lists_every_page_and_only_those():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert (ROOT / config.get("docs_dir", "docs")).resolve() == DOCS
    pages = _nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), f"mkdocs.yml's nav lists a page twice: {pages}"
    on_disk = {str(p.relative_to(DOCS).as_posix()) for p in DOCS.rglob("*.md")}
    assert set(pages) == on_disk, (f"pages missing from mkdocs.yml's nav: {sorted(on_disk - set(pages))}; "
                                   f"listed but not in docs/: {sorted(set(pages) - on_disk)}")


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
