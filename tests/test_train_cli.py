"""`balcony train` end to end: the CLI, Ctrl-C and resume, and 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_corpus
from safetensors.torch import load_file

from balcony import BalconyModel
from balcony.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=80)


def args(model_dir, corpus, out, *extra):
    return ["train", "--model", str(model_dir), "--exits", "2,4", "--data", str(corpus), "--out", str(out),
            "--seq-len", "24", "--lr", "3e-3", *extra]


def test_cli_trains_an_artifact(tiny_llama_dir, corpus, tmp_path, capsys):
    assert main(args(tiny_llama_dir, corpus, tmp_path / "run", "--max-steps", "4", "--eval-every", "2")) == 0
    model = BalconyModel.from_pretrained(tmp_path / "run")
    assert model.exits == [2, 4]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 2, 4]
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["optim"]["max_steps"] == 4 and config["data"]["seq_len"] == 24


def test_each_flag_sets_the_config_field_it_names(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    from balcony.training import trainer

    class Captured(Exception):
        pass

    def capture(config, **kwargs):
        raise Captured(config)

    monkeypatch.setattr(trainer, "Trainer", capture)
    with pytest.raises(Captured) as found:
        main(args(tiny_llama_dir, corpus, tmp_path / "run", "--checkpoint-every", "7", "--keep-checkpoints", "3",
                  "--kl-topk", "4", "--eval-every", "9", "--resume", "--batch-size", "2"))
    config = found.value.args[0]
    assert (config.data.source, config.data.seq_len, config.optim.lr, config.optim.batch_size) == (str(corpus), 24, 3e-3, 2)
    assert (config.checkpoints.every, config.checkpoints.keep, config.checkpoints.resume) == (7, 3, True)
    assert (config.loss.kl_topk, config.logging.eval_every, config.exits) == (4, 9, [2, 4])


def test_init_from_continues_from_trained_balconies(tiny_llama_dir, corpus, tmp_path, capsys):
    assert main(args(tiny_llama_dir, corpus, tmp_path / "first", "--max-steps", "4", "--eval-every", "4")) == 0
    assert main(args(tiny_llama_dir, corpus, tmp_path / "more", "--max-steps", "4", "--eval-every", "4",
                     "--init-from", str(tmp_path / "first"))) == 0
    first, more = ([json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                   for name in ("first", "more"))
    # the continued run starts where the first one ended, not from fresh balconies
    start = next(r for r in more if r["split"] == "val" and r["step"] == 0)
    end = next(r for r in first if r["split"] == "val" and r["step"] == 4)
    for e in (2, 4):
        assert start[f"kl/{e}"] == pytest.approx(end[f"kl/{e}"], rel=1e-4)
    assert start["kl/2"] < first[0]["kl/2"]
    assert main(args(tiny_llama_dir, corpus, tmp_path / "bad", "--max-steps", "1", "--exits", "2,3",
                     "--init-from", str(tmp_path / "first"))) == 2
    assert "has exits [2, 4]" in capsys.readouterr().err
    # --balcony-layers 2 grows the trained one-layer balconies (here only exit 2's) and trains both layers
    assert main(args(tiny_llama_dir, corpus, tmp_path / "grown", "--max-steps", "2", "--eval-every", "2",
                     "--init-from", str(tmp_path / "first"), "--balcony-layers", "2", "--exits", "2")) == 0
    grown = BalconyModel.from_pretrained(tmp_path / "grown")
    assert grown.exits == [2] and grown.balcony_config.balcony_layers == 2 and len(grown.balconies["2"].layers) == 2


def test_cli_rejects_empty_data(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(args(tiny_llama_dir, empty, tmp_path / "run", "--max-steps", "2")) == 2
    assert "0 tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _wait_for_train_steps(metrics, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if metrics.is_file() and sum('"train"' in l for l in metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_resume_continues(tiny_llama_dir, corpus, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "balcony", *args(tiny_llama_dir, corpus, out, "--max-steps", "100000",
                                                   "--checkpoint-every", "100000", "--eval-every", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_train_steps(out / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    first = sorted((out / "checkpoints").iterdir())
    assert len(first) == 1
    stopped_at = json.loads((first[0] / "trainer_state.json").read_text())["step"]
    assert stopped_at >= 3

    proc = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_train_steps(out / "metrics.jsonl", stopped_at + 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    latest = sorted((out / "checkpoints").iterdir())[-1]
    assert json.loads((latest / "trainer_state.json").read_text())["step"] > stopped_at


def test_two_gloo_processes_match_one_process_with_ddp_and_fsdp(tiny_llama_dir, corpus, tmp_path):
    common = ["--max-steps", "3", "--eval-every", "100", "--seed", "5"]
    single = subprocess.run([sys.executable, "-m", "balcony", *args(tiny_llama_dir, corpus, tmp_path / "one", *common,
                                                                   "--batch-size", "4")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "balcony", *args(tiny_llama_dir, corpus, tmp_path / "two", *common, "--batch-size", "2")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stderr
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "balcony", *args(tiny_llama_dir, corpus, tmp_path / "fsdp", *common, "--batch-size", "2",
                                                     "--fsdp")],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "balcony_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "balcony_model.safetensors"))
    fsdp = load_file(str(tmp_path / "fsdp" / "balcony_model.safetensors"))
    start = BalconyModel.from_base(str(tiny_llama_dir), exits=[2, 4]).balconies.state_dict()
    moved = 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0, msg=key)
        torch.testing.assert_close(one[key], fsdp[key], atol=1e-5, rtol=0, msg=key)
        moved += not torch.equal(one[key], start[key])
    assert moved > 0  # training really changed the weights
    # only rank 0 wrote: one metrics file, one set of records
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"train"' in r for r in records) == 3
