"""The project speaks of itself only: no word of how it was developed (work sessions, tickets,
issue numbers) in any file of the tree but the CHANGELOG, which carries the history a user needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = re.compile(r"\bsessions?\b|\btickets?\b|\bissues? ?#?\d+|\bissue's\b|\bthe (open|quality) issue\b"
                   r"|\b(measured|run|made|trained) in (a|an|the|this|that) (earlier |later )?(try|sitting)\b",
                   re.IGNORECASE)
# pytest's own vocabulary: a fixture's scope is named "session"
ALLOWED = re.compile(r"""scope=["']session["']""")
# not prose: images, weights, archives and data sets (held-out texts hold what their authors wrote)
BINARY = {".jsonl", ".png", ".gz", ".safetensors", ".svg", ".gguf", ".jpg", ".pdf", ".pt", ".npy", ".bin"}
THIS = Path(__file__).name


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / n for n in names if n != "CHANGELOG.md" and Path(n).name != THIS
            and Path(n).suffix not in BINARY and (ROOT / n).is_file()]


def test_no_file_speaks_of_how_the_project_was_developed():
    found = []
    files = tracked_text_files()
    assert len(files) > 50, "git ls-files found almost nothing: run the tests from a clone"
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if WORDS.search(ALLOWED.sub("", line)):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "words about the project's development (history goes in CHANGELOG.md):\n" + "\n".join(found)
