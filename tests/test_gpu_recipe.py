"""The GPU recipe (recipes/gpu_recipe.py) end to end on the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import write_corpus

from balcony import BalconyModel

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpu_recipe.py"


def test_gpu_recipe_samples_trains_on_time_and_writes_the_artifact(tiny_llama_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    text = write_corpus(tmp_path / "extra.txt", documents=30).read_text().split("\n\n")
    (tmp_path / "extra.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text))
    out = tmp_path / "gpu"
    report = recipe.main(["--model", str(tiny_llama_dir), "--exits", "2,4", "--out", str(out), "--device", "cpu",
                          "--data", str(tmp_path / "extra.jsonl"), "--sample-seconds", "2", "--sample-tokens", "600",
                          "--sample-batch", "8", "--sample-new-tokens", "16", "--train-seconds", "4",
                          "--calibration-steps", "1", "--batch-size", "4", "--seq-len", "32", "--val-sequences", "4"])
    assert 0 < report["corpus"]["self_tokens"] and report["corpus"]["sample_seconds"] < 30
    assert report["training"]["steps"] >= 1 and report["training"]["tokens_trained"] > 0
    assert json.loads((out / "recipe.json").read_text())["training"] == report["training"]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == report["training"]["steps"]
    model = BalconyModel.from_pretrained(out / "artifact", base=str(tiny_llama_dir))
    assert model.exits == [2, 4]
    assert not list((out / "run").glob("*.safetensors"))  # only the bf16 artifact comes back
