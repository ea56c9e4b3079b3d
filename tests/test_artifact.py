"""save_pretrained / from_pretrained: only balconies are written, and bad artifacts fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_base

from balcony import ArtifactError, BalconyModel, BaseMismatchError, ExitError
from balcony.core.config import CONFIG_NAME, WEIGHTS_NAME


def trained_like(arch="llama"):
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 4], init="random")
    return model


def test_round_trip_gives_identical_logits(arch, tmp_path):
    model = trained_like(arch)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])  # + the card
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["exits"] == [2, 4] and config["init"] == "random" and config["base_fingerprint"]
    assert config["balcony_version"] and config["num_layers"] == 6
    loaded = BalconyModel.from_pretrained(tmp_path, base=tiny_base(arch))
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for e in (2, 4, None):
        assert torch.equal(loaded(ids, exit_layer=e).logits, model(ids, exit_layer=e).logits)


def test_artifact_holds_only_the_balconies(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.split(".")[0] in ("2", "4") for k in keys)
    size = sum(p.numel() for p in model.balconies.parameters())
    assert sum(f.numel() for f in map(model.balconies.state_dict().get, keys)) == size
    # the weights are as readable as the config beside them (safetensors alone writes mode 0600)
    assert (tmp_path / WEIGHTS_NAME).stat().st_mode == (tmp_path / "balcony_config.json").stat().st_mode


def test_recorded_base_path_is_loaded_by_default(tiny_llama_dir, tmp_path):
    model = BalconyModel.from_base(str(tiny_llama_dir), exits=[3])
    model.save_pretrained(tmp_path)
    loaded = BalconyModel.from_pretrained(tmp_path)
    assert loaded.balcony_config.base_model == str(tiny_llama_dir)
    assert loaded.tokenizer is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded(ids, exit_layer=3).logits, model(ids, exit_layer=3).logits)


def test_other_weights_are_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama", seed=1))
    # the caller may override when they know the base is compatible
    BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama", seed=1), verify_base=False)


def test_other_shapes_are_refused(tmp_path):
    trained_like("llama").save_pretrained(tmp_path)
    with pytest.raises(BaseMismatchError, match="model_type"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("qwen3"), verify_base=False)


def test_truncated_weights_are_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))


def test_missing_or_broken_files_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not a balcony artifact"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))
    trained_like().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["exits"] = [2, 3]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not match"):
        BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))


def test_exits_of_a_loaded_artifact_are_checked(tmp_path):
    trained_like().save_pretrained(tmp_path)
    model = BalconyModel.from_pretrained(tmp_path, base=tiny_base("llama"))
    ids = torch.tensor([[5, 6, 7]])
    for bad, message in [(0, "out of range"), (7, "out of range"), (3, "has no balcony")]:
        with pytest.raises(ExitError, match=message):
            model(ids, exit_layer=bad)
    assert torch.equal(model(ids, exit_layer=6).logits, model(ids).logits)  # exit L is the full model


def test_bf16_artifact_is_half_the_size_and_loads_into_fp32(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    small, big = ((tmp_path / d / WEIGHTS_NAME).stat().st_size for d in ("bf16", "fp32"))
    assert small < 0.55 * big
    loaded = BalconyModel.from_pretrained(tmp_path / "bf16", base=tiny_base("llama"))
    for key, value in loaded.balconies.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, model.balconies.state_dict()[key].to(torch.bfloat16).float())
def test_default_names_the_shipped_artifact_and_its_profile_goes_to_the_cache(tmp_path, monkeypatch):
    from balcony.default import DEFAULT_ARTIFACT, artifact_path
    from balcony.core.artifact import PROFILE_NAME, speed_profile_path

    assert artifact_path("default") == DEFAULT_ARTIFACT
    assert artifact_path("./default") != DEFAULT_ARTIFACT and artifact_path(tmp_path) == tmp_path
    assert (DEFAULT_ARTIFACT / CONFIG_NAME).is_file() and (DEFAULT_ARTIFACT / WEIGHTS_NAME).is_file()
    assert (DEFAULT_ARTIFACT / WEIGHTS_NAME).stat().st_size <= 32 * 2**20  # the size the package may carry
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path))
    # bench on `default` must not write into the installed package
    assert speed_profile_path("default").is_relative_to(tmp_path)
    assert speed_profile_path("default", for_writing=False) == DEFAULT_ARTIFACT / PROFILE_NAME
    speed_profile_path("default").parent.mkdir(parents=True)
    speed_profile_path("default").write_text("{}")
    assert speed_profile_path("default", for_writing=False).is_relative_to(tmp_path)
    assert speed_profile_path(tmp_path / "art") == tmp_path / "art" / PROFILE_NAME
