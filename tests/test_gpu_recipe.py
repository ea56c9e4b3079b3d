"""The GPU recipe (recipes/gpu_recipe.py) end to end on the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import write_corpus

from balcony import BalconyModel

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpu_recipe.py"


def test_gpu_recipe_samples_trains_on_time_and_writes_the_artifact(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import tiny_tokenizer

    from balcony.training import corpus as corpus_mod
    from balcony.training.corpus import Context, grow

    # a corpus folder of two sources, of which the recipe mixes in one
    for name in ("kept", "left"):
        source = corpus_mod.Source(name, False, lambda paths, name=name: list(range(3)),
                                   lambda batch, ctx, name=name: [f"{name} doc {i} " * 30 for i in batch])
        monkeypatch.setitem(corpus_mod.SOURCES, name, source)
        grow(tmp_path / "corpus", name, Context(None, tiny_tokenizer()), tokens=10_000, tokenizer_name="tiny",
             progress=False)
    spec = importlib.util.spec_from_file_location("gpu_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    text = write_corpus(tmp_path / "extra.txt", documents=30).read_text().split("\n\n")
    (tmp_path / "extra.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text))
    out = tmp_path / "gpu"
    report = recipe.main(["--base", str(tiny_llama_dir), "--exits", "2,4", "--out", str(out), "--device", "cpu",
                          "--data", str(tmp_path / "extra.jsonl"),
                          "--corpus", str(tmp_path / "corpus"), "--corpus-sources", "kept", "--sample-seconds", "2", "--sample-tokens", "600",
                          "--sample-batch", "8", "--sample-new-tokens", "16", "--sample-precision", "bf16", "--train-seconds", "4",
                          "--calibration-steps", "1", "--batch-size", "4", "--seq-len", "32", "--val-sequences", "4"])
    assert 0 < report["corpus"]["self_tokens"] == report["corpus"]["self_tokens_new"]
    assert report["corpus"]["sample_precision"] == "bf16"  # sampled under bf16 autocast
    assert report["corpus"]["sample_seconds"] < 30 and report["corpus"]["corpus"]["documents"] == 3
    mixed = (out / "corpus.jsonl").read_text()
    assert "kept doc 2" in mixed and "left doc" not in mixed
    assert report["training"]["steps"] >= 1 and report["training"]["tokens_trained"] > 0
    assert json.loads((out / "recipe.json").read_text())["training"] == report["training"]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == report["training"]["steps"]
    model = BalconyModel.from_pretrained(out / "artifact", base=str(tiny_llama_dir))
    assert model.exits == [2, 4]
    assert not list((out / "run").glob("*.safetensors"))  # only the bf16 artifact comes back

    # a second run in the same folder, from the first's artifact, sampling nothing: it reads the
    # first run's samples again (recipes/default/make.sh runs the recipe twice this way)
    (out / "artifact").rename(out / "artifact-1")
    again = recipe.main(["--base", str(tiny_llama_dir), "--init-from", str(out / "artifact-1"), "--out", str(out),
                         "--device", "cpu", "--sample-seconds", "0", "--train-seconds", "2", "--calibration-steps", "1",
                         "--batch-size", "4", "--seq-len", "32", "--val-sequences", "4"])
    assert again["corpus"]["self_tokens_new"] == 0
    assert again["corpus"]["self_documents"] == report["corpus"]["self_documents"]
    assert BalconyModel.from_pretrained(out / "artifact", base=str(tiny_llama_dir)).exits == [2, 4]
