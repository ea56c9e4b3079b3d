"""A corpus run survives SIGKILL between shards, inside a shard write and between a shard and the
manifest: the next call keeps every finished shard, the manifest matches the shards, nothing is
duplicated or lost, and the finished corpus is byte for byte the one an uninterrupted run makes."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import kill_when_hanging

from balcony.cli import main
from balcony.training.corpus import Corpus
from balcony.training.corpus.store import MANIFEST, doc_key

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Runs `balcony corpus`, hanging (for the parent to SIGKILL) in the FAULT_AT-th atomic write
# (odd: a shard, even: the manifest after it): before it ("before") or with half the bytes
# written to its temporary file ("half"), after writing FAULT_MARKER.
HANG = """
import os, sys, time
from pathlib import Path
import balcony.training.corpus.store as store
how, at, marker = os.environ["FAULT_HOW"], int(os.environ["FAULT_AT"]), Path(os.environ["FAULT_MARKER"])
calls, original = [0], store.atomic_write
def atomic_write(path, data):
    calls[0] += 1
    if calls[0] == at:
        if how == "half":
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        marker.write_text(how)
        time.sleep(120)
    return original(path, data)
store.atomic_write = atomic_write
from balcony.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _book(folder: Path, pages: int = 40) -> Path:
    folder.mkdir()
    for i in range(pages):
        words = " ".join(f"page{i} word{j} about tables and rows" for j in range(10))
        (folder / f"p{i:02d}.html").write_text(f"<html><body><h1>Chapter {i}</h1><p>{words}</p></body></html>")
    return folder


def _args(out: Path, html: Path, model: Path) -> list[str]:
    return ["corpus", str(out), "--source", "books", "--source-path", str(html), "--held-out", "none",
            "--tokens", "100000", "--shard-tokens", "100", "--model", str(model)]


def _consistent(out: Path) -> list[str]:
    """Every shard in the manifest reads (its sha256 checks), no document twice; the shards' sha256s."""
    corpus = Corpus(out)
    keys = [doc_key(text) for shard in corpus.shards for text in corpus.read(shard)]
    assert len(keys) == len(set(keys)), "a document was written twice"
    return [shard.sha256 for shard in corpus.shards]


def test_killed_corpus_runs_keep_their_shards_and_carry_on(tiny_llama_dir, tmp_path):
    html = _book(tmp_path / "book")
    assert main(_args(tmp_path / "whole", html, tiny_llama_dir)) == 0  # uninterrupted, in this process
    expected = _consistent(tmp_path / "whole")
    assert len(expected) >= 4
    out, marker, kept = tmp_path / "c", tmp_path / "hanging", []
    # between shards (before shard 2's write), inside a shard write, between a shard and the manifest
    for how, at in [("before", 3), ("half", 3), ("before", 2), ("half", 4)]:
        kill_when_hanging(HANG, _args(out, html, tiny_llama_dir), {**ENV, "FAULT_HOW": how, "FAULT_AT": str(at), "FAULT_MARKER": str(marker)},
                          marker, f"{how} {at}")
        now = _consistent(out)
        assert now[: len(kept)] == kept and now == expected[: len(now)]  # finished shards kept, the same bytes
        kept = now
    assert len(kept) == 3  # runs 1, 2 and 4 each finished one shard before their fault; run 3 none
    assert main(_args(out, html, tiny_llama_dir)) == 0
    assert _consistent(out) == expected
    listed = {shard.file for shard in Corpus(out).shards}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert on_disk == listed, f"left behind: {sorted(on_disk - listed)}"
