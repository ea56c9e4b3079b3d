"""Model cards: every artifact folder holds a README.md saying what it is, how it was made and how good it is."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_base, write_corpus

from balcony import ArtifactError, BalconyModel
from balcony.cli import main
from balcony.core.artifact import file_sha256
from balcony.core.card import (
    CARD_NAME,
    Training,
    card_folder,
    evaluation_parts,
    is_ours,
    model_card,
    section,
    with_evaluation,
)
from balcony.core.config import CONFIG_NAME, WEIGHTS_NAME
from balcony.default import DEFAULT_ARTIFACT, RESOURCES

SECTIONS = ("base", "exits", "training", "evaluation", "licence", "use")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=80)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, corpus, tmp_path_factory):
    """A tiny `balcony train` run's artifact folder (2 steps, a checkpoint after each)."""
    out = tmp_path_factory.mktemp("card") / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--exits", "2,4", "--data", str(corpus), "--out", str(out),
                 "--seq-len", "24", "--lr", "3e-3", "--max-steps", "3", "--eval-every", "3",
                 "--checkpoint-every", "1", "--keep-checkpoints", "1"]) == 0
    return out


def test_save_pretrained_writes_a_card_with_every_section(tmp_path):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], balcony_layers={"2": 2})
    model.save_pretrained(tmp_path)
    text = (tmp_path / CARD_NAME).read_text()
    assert text.startswith("---\nlibrary_name: balcony\n") and "\ntags:\n- balcony\n" in text
    for name in SECTIONS:
        assert section(text, name), name
    config = model.balcony_config
    assert config.base_fingerprint in section(text, "base")
    exits = section(text, "exits")
    for e, layers in ((2, 2), (4, 1)):
        parameters = sum(p.numel() for p in model.balconies[str(e)].parameters())
        assert f"| {e} | {e / 6:.2f} | {layers} | {parameters:,} |" in exits
        assert f"| {model.costs.relative(e):.2f} |" in exits
    assert "No training run is recorded" in section(text, "training")
    assert "Not measured yet" in section(text, "evaluation")
    assert "see the base model's licence" in section(text, "licence")
    # the same artifact gives the same card, byte for byte
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / CARD_NAME).read_text() == text


def test_an_artifact_loads_with_its_card_beside_it(tmp_path):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    model.save_pretrained(tmp_path)
    assert (tmp_path / CARD_NAME).is_file()
    loaded = BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids, exit_layer=2).logits, model(ids, exit_layer=2).logits)


def test_a_readme_balcony_did_not_write_is_kept(tmp_path):
    (tmp_path / CARD_NAME).write_text("# my own notes\n")
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4])
    with pytest.warns(UserWarning, match="not written by balcony"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / CARD_NAME).read_text() == "# my own notes\n"
    assert (tmp_path / WEIGHTS_NAME).is_file()
    with pytest.raises(ArtifactError, match="not written by balcony"):
        card_folder(tmp_path)


def test_the_licence_comes_from_a_local_base_s_own_card(tmp_path):
    base = save_tiny_model("llama", tmp_path / "base")
    (base / CARD_NAME).write_text("---\nlicense: mit\nlanguage: en\n---\n# a tiny model\n")
    model = BalconyModel.from_base(str(base), exits=[3])
    model.save_pretrained(tmp_path / "artifact")
    text = (tmp_path / "artifact" / CARD_NAME).read_text()
    assert "\nlicense: mit\n" in text and "`mit`" in section(text, "licence")
    assert str(tmp_path) not in text  # a local base is named, not located


def test_training_writes_its_data_tokens_and_loss_into_the_card(trained):
    text = (trained / CARD_NAME).read_text()
    training = section(text, "training")
    assert "- Data: `corpus.txt`" in training
    assert "- Tokens read: 288 (3 steps of 96 tokens)" in training  # batch 4 x 24 tokens
    assert "- Loss: KL(full model || exit) over the whole vocabulary (exact); mean over the exits" in training
    assert "`lr=0.003`" in training and "`seq_len=24`" in training and "`kl_topk=0`" in training
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in metrics if r["split"] == "val"][-1]
    assert f"| 2 | {last['kl/2']:.3f} | {last['agreement/2']:.3f} |" in training
    # checkpoints are no artifacts to publish: no card in them
    (checkpoint,) = (trained / "checkpoints").iterdir()
    assert not (checkpoint / CARD_NAME).exists()


def test_eval_card_adds_the_measured_figures_and_keeps_the_rest(trained, corpus, tmp_path, capsys):
    before = (trained / CARD_NAME).read_text()
    report_path = tmp_path / "eval.json"
    assert main(["eval", str(trained), "--data", str(corpus), "--seq-len", "24", "--max-tokens", "480",
                 "--json", str(report_path), "--card"]) == 0
    text = (trained / CARD_NAME).read_text()
    report = json.loads(report_path.read_text())
    evaluation = section(text, "evaluation")
    assert "### Held-out text: `corpus.txt`" in evaluation and "Not measured yet" not in evaluation
    for row in report["exits"]:
        b = row["balcony"]
        assert f"| {row['exit']} | {row['relative_cost']:.2f} | {b['kl']:.3f} | {b['agreement']:.3f} |" in evaluation
    for name in ("base", "exits", "training", "licence", "use"):
        assert section(text, name) == section(before, name), name
    # a second text adds its own part; the first stays
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    assert main(["eval", str(trained), "--data", str(other), "--seq-len", "24", "--max-tokens", "480", "--card"]) == 0
    evaluation = section((trained / CARD_NAME).read_text(), "evaluation")
    assert evaluation.index("`corpus.txt`") < evaluation.index("`other.txt`")


def test_eval_card_is_refused_for_the_shipped_default_and_fresh_balconies(tiny_llama_dir, corpus, capsys):
    assert main(["eval", "default", "--data", str(corpus), "--card"]) == 2
    assert "`default` is the shipped artifact" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", str(corpus), "--card"]) == 2
    assert "name the artifact folder" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="inside the installed package"):
        card_folder(str(DEFAULT_ARTIFACT))


def test_evaluation_parts_replace_their_own_part_only():
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4])
    text = model_card(model, training=Training(data="`x`", tokens=10, steps=2))
    heldout = {"tokens": 48, "sequences": 2, "seq_len": 24, "full": {"perplexity": 3.0},
               "exits": [{"exit": e, "relative_cost": 0.5, **{f: {"kl": 0.1, "agreement": a, "perplexity": 2.0}
                                                           for f in ("balcony", "early_exit", "truncation")}}
                         for e, a in ((2, 0.25), (4, 0.75))]}
    downstream = {"tasks": ["piqa"], "average_of": ["piqa"], "documents": {"piqa": 9}, "limit": None,
                  "cost_source": "flops", "rows": [{"method": "full", "exit": None, "cost": 1.0,
                                                    "accuracy": {"piqa": 0.6}, "average": 0.6, "kept": 1.0,
                                                    "kept_above_chance": 1.0}]}
    text = with_evaluation(text, evaluation_parts({**heldout, "downstream": downstream}, "data/chat text.jsonl"))
    assert "### Held-out text: `chat text.jsonl`" in text and "| full | full | 1.00 | 60.0 |" in text
    heldout["exits"][0]["balcony"]["agreement"] = 0.5
    again = with_evaluation(text, evaluation_parts(heldout, "data/chat text.jsonl"))
    assert "| 2 | 0.50 | 0.100 | 0.500 |" in again and "| 2 | 0.50 | 0.100 | 0.250 |" not in again
    assert "### Downstream tasks" in again and again.count("### Held-out text") == 1
    assert section(again, "training") == section(text, "training") and is_ours(again)


def test_layerskip_artifacts_have_a_card_too(tmp_path):
    from balcony.training.layerskip import LayerSkipModel

    model = LayerSkipModel(tiny_base("llama"), [2, 4], layer_dropout=0.2, base_model="default")
    model.save_pretrained(tmp_path)
    text = (tmp_path / CARD_NAME).read_text()
    assert text.startswith("---\nlibrary_name: transformers\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "- layerskip\n" in text and "\nlicense: apache-2.0\n" in text
    what = section(text, "what")
    assert "Every parameter" in what and "p_max = 0.2" in what and "shared LM head" in what
    assert "| full | 1.00 | 6 |" in section(text, "exits")
    LayerSkipModel.from_pretrained(tmp_path, base=tiny_base("llama"))  # still loads


def test_the_shipped_default_has_its_card_and_the_package_ships_it():
    text = (DEFAULT_ARTIFACT / CARD_NAME).read_text()
    config = json.loads((DEFAULT_ARTIFACT / CONFIG_NAME).read_text())
    assert text.startswith("---\nlibrary_name: balcony\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "\nlicense: apache-2.0\n" in text and is_ours(text)
    assert config["base_fingerprint"] in section(text, "base")
    assert [line.split("|")[1].strip() for line in section(text, "exits").splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()] == ["15", "20", "25"]
    assert "| 15 | 0.50 | 2 |" in section(text, "exits")
    assert "### Held-out text: `heldout-smollm2.jsonl`" in section(text, "evaluation")
    assert "| balcony | 25 | 0.88 |" in section(text, "evaluation")  # the downstream table
    # the card leaves the artifact as it was: the weights still match the sha256 the config recorded
    assert file_sha256(DEFAULT_ARTIFACT / WEIGHTS_NAME) == config["weights_sha256"]
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    patterns = re.findall(r'"(resources/[^"]+)"', package_data)
    relative = str((DEFAULT_ARTIFACT / CARD_NAME).relative_to(RESOURCES.parent))
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)
