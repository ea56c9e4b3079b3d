"""recipes/gpu-pack.sh: the GGUF's parts fit beside the working tree in one device call, and join back."""

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1] / "recipes" / "gpu-pack.sh"
pytestmark = pytest.mark.skipif(not (shutil.which("xz") and shutil.which("git")), reason="needs xz and git")


def _tree(tmp_path: Path, tracked_bytes: int) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".gitignore").write_text("/runs/\n")
    (repo / "tracked.bin").write_bytes(os.urandom(tracked_bytes))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    return repo


def _pack(repo: Path, gguf: Path, limit: int):
    env = dict(os.environ, GGUF=str(gguf), LIMIT=str(limit), MARGIN="10000", SMALLEST="100000")
    return subprocess.run(["bash", str(PACK), "runs/carry"], cwd=repo, env=env, capture_output=True, text=True)


def test_parts_fit_beside_the_tree_and_join_back(tmp_path):
    repo = _tree(tmp_path, 600_000)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(1_500_000))  # random: xz cannot shrink it, so several parts
    done = _pack(repo, gguf, limit=1_400_000)
    assert done.returncode == 0, done.stderr
    carry = repo / "runs" / "carry"
    parts = sorted(carry.glob("smollm2.gguf.xz.part-*"))
    reader = (carry / "gguf.tar.gz").stat().st_size
    tree = sum(f.stat().st_size for f in repo.iterdir() if f.is_file())
    assert len(parts) >= 3
    assert all(tree + reader + part.stat().st_size <= 1_400_000 for part in parts)
    assert lzma.decompress(b"".join(part.read_bytes() for part in parts)) == gguf.read_bytes()
    assert done.stdout.count("run(carry=") == len(parts) and "gpu-run.sh" in done.stdout.splitlines()[-1]


def test_a_tree_too_large_for_a_call_is_refused_clearly(tmp_path):
    repo = _tree(tmp_path, 1_300_000)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(100_000))
    done = _pack(repo, gguf, limit=1_400_000)
    assert done.returncode == 1 and "make the tree smaller" in done.stderr
    assert not list((repo / "runs" / "carry").glob("smollm2.gguf.xz.part-*"))
