"""`balcony bench`: the report, the stored profile and the plot (tiny model; speed itself is not asserted)."""

from __future__ import annotations

import json

import pytest

from balcony import BalconyModel, DepthRequest
from balcony.cli import main


def test_bench_report_profile_and_plots(tiny_llama_dir, tmp_path, capsys):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[2, 4]).save_pretrained(tmp_path / "art")
    eval_json = tmp_path / "eval.json"
    (tmp_path / "text.txt").write_text("Some held out words to read. " * 40)
    assert main(["eval", str(tmp_path / "art"), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
                 "--json", str(eval_json)]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "art"), "--batch-sizes", "1,2", "--new-tokens", "4", "--prompt-len", "8",
                 "--prefill-len", "16", "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "q.png"),
                 "--eval", str(eval_json)]) == 0
    report = json.loads(out.read_text())
    assert [r["exit"] for r in report["rows"]] == ["plain", "full", 2, 4]
    for r in report["rows"]:
        assert r["decode_tokens_per_second"]["1"] > 0 and r["ms_per_token"]["2"] > 0 and r["prefill_tokens_per_second"] > 0
    full = report["rows"][1]
    assert full["speedup"]["1"] == 1.0 and full["ideal_speedup"] == 1.0
    assert report["rows"][2]["ideal_speedup"] > report["rows"][3]["ideal_speedup"] > 1
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert "of ideal" in capsys.readouterr().out
    # the profile is stored beside the artifact and drives latency budgets
    model = BalconyModel.from_pretrained(tmp_path / "art")
    assert set(model.policy.profile["ms_per_token"]) == {"2", "4", "full"}
    slowest = max(model.policy.profile["ms_per_token"].values())
    assert model.policy.resolve(DepthRequest(max_ms_per_token=slowest * 2)) is None
    # a profile of balconies of another shape (here: exit 2 grown to two layers) is set aside
    profile = tmp_path / "art" / "bench_profile.json"
    stale = json.loads(profile.read_text())
    profile.write_text(json.dumps({**{k: v for k, v in stale.items() if k != "sha256"}, "balconies": {"2": 2, "4": 1}}))
    with pytest.warns(UserWarning, match="other balconies"):
        assert BalconyModel.from_pretrained(tmp_path / "art").policy.profile is None
    profile.write_text(json.dumps(stale))
    assert main(["bench", str(tmp_path / "art"), "--batch-sizes", "1", "--new-tokens", "2", "--prompt-len", "4",
                 "--prefill-len", "8", "--repeats", "1", "--no-profile", "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_quickstart_writes_a_report_and_a_plot(tiny_llama_dir, tmp_path, capsys):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[2, 4]).save_pretrained(tmp_path / "art")
    (tmp_path / "text.txt").write_text("Some held out words to read. " * 200)
    assert main(["quickstart", str(tmp_path / "art"), "--data", str(tmp_path / "text.txt"), "--out",
                 str(tmp_path / "report"), "--max-new-tokens", "4"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for heading in ("## Quality per exit", "## Speed per exit", "## Samples"):
        assert heading in report
    assert (tmp_path / "report" / "quality_vs_speed.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "report" / "eval.json").read_text())["exits"][0]["exit"] == 2
    assert "3/3" in capsys.readouterr().out


def test_quickstart_train_trains_briefly_then_reports(tiny_llama_dir, tmp_path):
    (tmp_path / "train.txt").write_text("Words to learn from, over and over again. " * 600)
    (tmp_path / "text.txt").write_text("Some held out words to read. " * 200)
    out = tmp_path / "report"
    assert main(["quickstart", "--model", str(tiny_llama_dir), "--train", "--train-data", str(tmp_path / "train.txt"),
                 "--train-steps", "2", "--data", str(tmp_path / "text.txt"), "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    assert (out / "balconies" / "balcony_model.safetensors").is_file()
    assert (out / "balconies" / "learning_curve.png").stat().st_size > 10_000
    assert "trained" in (out / "report.md").read_text()
    assert main(["quickstart", str(out / "balconies"), "--train", "--out", str(out)]) == 2  # one or the other
