"""`pydocs`: the docstrings of this Python's standard library and installed packages, plus the
Python reference topics: millions of tokens of technical English that any machine with the
set-up has, offline. `balcony train --data pydocs` reads them as one JSONL file built once
(`python_docs_corpus`, the shipped default balconies' first data); `balcony corpus --source
pydocs` adds them to a corpus, one document per source file, from `--source-path` folders or
this Python's own (`sysconfig`)."""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

from tqdm.auto import tqdm

from ....default import cache_root
from ..source import Source
from ..store import CorpusError

MIN_DOCSTRING = 200  # shorter ones are mostly "Return x." one-liners
MIN_DOCUMENT = 1500
EVAL_PACKAGES = ("olmo_eval", "lm_eval")  # the offline downstream tasks: kept out (task prompts live in .py files)


def locate() -> list[Path]:
    """This Python's standard library and package folders."""
    return sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})


def docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of `path` of MIN_DOCSTRING characters or more."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING:
                found.append(doc.strip())
    return found


def python_files(roots: list[Path], exclude: list[Path] | None = None) -> list[Path]:
    """The .py files under `roots` in sorted order, test folders, `exclude` and the evaluation packages left out."""
    excluded = [Path(e).resolve() for e in exclude or []]
    excluded += [root / name for root in roots for name in EVAL_PACKAGES if (root / name).is_dir()]
    return [p for root in roots for p in sorted(Path(root).rglob("*.py")) if not {"test", "tests"} & set(p.parts)
            and not any(p.resolve().is_relative_to(e) for e in excluded)]


def python_docs_corpus(out: Path | None = None, *, roots: list[Path] | None = None, seed: int = 0,
                       exclude: list[Path] | None = None) -> Path:
    """Write (once) and return a JSONL corpus: one document per source file of its docstrings.

    Files are read in sorted order, test folders and anything under `exclude` (e.g. packages
    kept for held-out text) skipped, repeated docstrings dropped, and the documents shuffled
    with a fixed seed, so the same installs give the same file.
    """
    version = f"py{sys.version_info[0]}{sys.version_info[1]}"
    out = Path(out) if out is not None else cache_root() / "corpus" / f"pydocs-{version}.jsonl"
    if out.is_file():
        return out
    this_python = roots is None
    roots = roots or locate()
    seen: set[str] = set()
    documents: list[str] = []
    for path in tqdm(python_files(roots, exclude), desc="reading docstrings", unit="file", dynamic_ncols=True):
        texts = [t for t in docstrings(path) if t not in seen]
        seen.update(texts)
        doc = "\n\n".join(texts)
        if len(doc) >= MIN_DOCUMENT:
            documents.append(doc)
    if this_python:  # and the language reference's topics
        documents += reference_topics()
    if not documents:
        raise CorpusError(f"no docstrings of {MIN_DOCUMENT}+ characters under {', '.join(map(str, roots))}")
    random.Random(seed).shuffle(documents)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    tmp.replace(out)  # atomic: an interrupted build leaves no half corpus behind
    return out


def reference_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [text.strip() for _, text in sorted(topics.items()) if len(text) >= MIN_DOCSTRING]


def file_documents(batch: list[str], ctx) -> list[str]:
    docs = ["\n\n".join(dict.fromkeys(docstrings(Path(path)))) for path in batch]
    return [doc for doc in docs if len(doc) >= MIN_DOCUMENT]


SOURCE = Source("pydocs", False, lambda roots: [str(p) for p in python_files(roots)], file_documents, batch=64,
                install="a Python with its standard library's sources (e.g. apt-get install libpython3-stdlib)",
                locate=locate)
