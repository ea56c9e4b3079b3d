"""Training survives being killed: SIGKILL at seeded moments (some inside a checkpoint write),
`--resume` each time, ends with the balconies of an uninterrupted run; a write that fails (a full
disk) leaves the previous checkpoint whole and stops with an error that says so."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import kill_when_hanging, write_corpus
from safetensors.torch import load_file
from test_train import corpus_data, make_trainer

from balcony import BalconyError
from balcony.cli import main
from balcony.core.config import WEIGHTS_NAME
from balcony.training import checkpoint as checkpoint_module

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 10
# Runs `balcony train`, hanging (for the parent to SIGKILL) on the FAULT_AT-th call of either a
# training step or the optimizer file's write inside a checkpoint, after writing FAULT_MARKER.
HANG = """
import os, sys, time
from pathlib import Path
import balcony.training.checkpoint as checkpoint
import balcony.training.trainer as trainer
kind, at, marker = os.environ["FAULT_KIND"], int(os.environ["FAULT_AT"]), Path(os.environ["FAULT_MARKER"])
calls = [0]
def hang_on_nth(original):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            marker.write_text(kind)
            time.sleep(120)
        return original(*args, **kwargs)
    return wrapped
if kind == "write":
    checkpoint.save_file = hang_on_nth(checkpoint.save_file)
else:
    trainer.Trainer.train_step = hang_on_nth(trainer.Trainer.train_step)
from balcony.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(model_dir, corpus, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--exits", "2,4", "--data", str(corpus), "--out", str(out),
            "--seq-len", "24", "--lr", "3e-3", "--max-steps", str(STEPS), "--checkpoint-every", "1",
            "--keep-checkpoints", "2", "--eval-every", "100", "--kl-topk", "8", "--kl-samples", "16", *extra]


def _every_checkpoint_reads(out: Path) -> list[int]:
    steps = []
    for folder in sorted((out / "checkpoints").glob("step-*")):
        state = json.loads((folder / checkpoint_module.STATE_NAME).read_text())
        load_file(str(folder / WEIGHTS_NAME))
        load_file(str(folder / checkpoint_module.OPTIMIZER_NAME))
        steps.append(state["step"])
    return steps


def _train_here(argv: list[str]) -> int:
    """`balcony train` in this process, on one thread as the killed runs (OMP_NUM_THREADS=1): the
    same sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_killed_at_random_moments_and_resumed_it_ends_where_an_uninterrupted_run_does(tiny_llama_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", documents=60)
    assert _train_here(_args(tiny_llama_dir, corpus, tmp_path / "straight")) == 0  # uninterrupted
    out, marker = tmp_path / "run", tmp_path / "hanging"
    rng = random.Random(0)
    kills = [("write" if i % 2 == 0 else "step", rng.choice([1, 2])) for i in range(5)]  # 3 inside a write
    for kind, at in kills:
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        kill_when_hanging(HANG, _args(tiny_llama_dir, corpus, out, *resume), {**ENV, "FAULT_KIND": kind, "FAULT_AT": str(at), "FAULT_MARKER": str(marker)},
                          marker, f"{kind} {at}")
        steps = _every_checkpoint_reads(out)  # never an unreadable checkpoint, even killed mid-write
        assert steps and steps[-1] < STEPS
    resumed_from = _every_checkpoint_reads(out)[-1]
    assert resumed_from >= 3  # the killed runs made progress between them
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert _train_here(_args(tiny_llama_dir, corpus, out, "--resume")) == 0
    assert not list((out / "checkpoints").glob(".tmp-*"))  # what a killed write left is cleared
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[logged:]]
    trained = [r["step"] for r in records if r["split"] == "train"]
    assert trained and min(trained) > resumed_from  # the last run continued, it did not start over
    got, want = load_file(str(out / WEIGHTS_NAME)), load_file(str(tmp_path / "straight" / WEIGHTS_NAME))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    data = corpus_data(tmp_path)
    trainer = make_trainer(tmp_path, data, max_steps=4, checkpoint_every=1)
    calls = [0]
    original = checkpoint_module.save_file

    def full_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(BalconyError, match=r"could not write the checkpoint .*step-00000003.*No space left.*"
                                           r"step-00000002 is intact.*--resume"):
        trainer.fit()
    out = Path(trainer.config.out)
    assert _every_checkpoint_reads(out) == [1, 2] and not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(checkpoint_module, "save_file", original)
    resumed = make_trainer(tmp_path, data, max_steps=4, checkpoint_every=1, resume=True)
    resumed.fit()
    assert resumed.step == 4
