"""Damaged files on disk: each is refused with an error naming the file and the fix (caches are
rebuilt), never loaded as a silently different model."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_base

from balcony import BalconyError, BalconyModel
from balcony.core.artifact import load_profile, write_profile
from balcony.core.config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig
from balcony.training.corpus import Corpus
from balcony.training.distill import TeacherTop
from balcony.training.teacher_cache import TeacherCache


def flip(path: Path, position: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def artifact(tmp_path):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    model.save_pretrained(tmp_path / "art")
    return model, tmp_path / "art"


def _load(model, directory):
    return BalconyModel.from_pretrained(directory, base=model.base)


@pytest.mark.parametrize("where", ["header", "middle", "last byte"])
def test_a_flipped_bit_in_the_weights_is_refused(artifact, where):
    model, directory = artifact
    path = directory / WEIGHTS_NAME
    size = path.stat().st_size
    flip(path, {"header": 20, "middle": size // 2, "last byte": size - 1}[where], bit=3)
    with pytest.raises(BalconyError, match=f"{WEIGHTS_NAME}.*(damaged|corrupt).*save or download"):
        _load(model, directory)


def test_truncated_weights_are_refused(artifact):
    model, directory = artifact
    truncate(directory / WEIGHTS_NAME)
    with pytest.raises(BalconyError, match=f"{WEIGHTS_NAME}.*damaged"):
        _load(model, directory)


def test_a_damaged_config_is_refused_or_changes_nothing(artifact):
    """Every one of 200 single-bit flips of the config JSON either fails, naming the file, or loads the
    very same balconies (a flip inside the version string, say)."""
    model, directory = artifact
    path = directory / CONFIG_NAME
    pristine = path.read_bytes()
    reference = {k: v.clone() for k, v in _load(model, directory).balconies.state_dict().items()}
    rng = random.Random(0)
    refused = 0
    for _ in range(200):
        path.write_bytes(pristine)
        flip(path, rng.randrange(len(pristine)), rng.randrange(8))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = _load(model, directory)
        except BalconyError as err:
            assert CONFIG_NAME in str(err) or WEIGHTS_NAME in str(err) or "base" in str(err), err
            refused += 1
            continue
        state = loaded.balconies.state_dict()
        assert loaded.exits == model.exits and state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert refused > 150  # most flips break the JSON or a recorded value
    path.write_bytes(pristine[: len(pristine) // 2])
    with pytest.raises(BalconyError, match=f"{CONFIG_NAME} is not valid JSON.*save it again"):
        _load(model, directory)


def test_a_damaged_speed_profile_is_set_aside_with_a_warning_naming_it(artifact):
    model, directory = artifact
    path = directory / "bench_profile.json"
    write_profile(path, {"balconies": model.balcony_config.shape(), "ms_per_token": {"2": 3.0, "4": 5.0, "full": 7.0}})
    config = BalconyConfig.load(directory)
    assert load_profile(directory, config)["ms_per_token"]["4"] == 5.0
    text = path.read_text()
    path.write_text(text.replace('"4": 5.0', '"4": 1.0'))  # a changed figure: JSON still valid
    with pytest.warns(UserWarning, match=r"bench_profile.json is damaged.*balcony bench"):
        assert load_profile(directory, config) is None
    path.write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match=r"bench_profile.json is damaged"):
        assert _load(model, directory).policy.profile is None


def test_a_damaged_corpus_shard_is_named(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    shard = corpus.add("chat", ["one document about owls " * 20, "another about bats " * 20], 80, 2, {}, {})
    path = tmp_path / "corpus" / shard.file
    pristine = path.read_bytes()
    for damage in (lambda: flip(path, len(pristine) // 2), lambda: truncate(path)):
        path.write_bytes(pristine)
        damage()
        with pytest.raises(BalconyError, match=f"{shard.file}.*damaged; restore it"):
            Corpus(tmp_path / "corpus").read(shard)
    path.write_bytes(pristine)
    assert len(Corpus(tmp_path / "corpus").read(shard)) == 2


def _teacher(rows: int, seq: int, k: int, seed: int) -> TeacherTop:
    g = torch.Generator().manual_seed(seed)
    n = rows * seq
    return TeacherTop(torch.randn(n, k, generator=g).log_softmax(-1), torch.randint(0, VOCAB, (n, k), generator=g),
                      torch.randint(0, VOCAB, (n, 2), generator=g), torch.rand(n, generator=g))


def test_a_damaged_teacher_cache_row_is_taught_again_and_a_torn_file_rebuilt(tmp_path):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    rows = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))

    def open_cache():
        return TeacherCache(tmp_path, model, rows, k=3, tail_samples=2, precision="fp32", seed=0)

    cache = open_cache()
    cache.put(torch.arange(4), _teacher(4, 6, 3, seed=1))
    cache.flush()
    assert torch.equal(open_cache().get(torch.tensor([1])).logp, _teacher(4, 6, 3, seed=1).logp[6:12])
    logp = cache.dir / "logp.npy"
    header = logp.stat().st_size - 4 * 6 * 3 * 4
    flip(logp, header + 6 * 3 * 4 + 5)  # a bit inside row 1's values
    reopened = open_cache()
    assert reopened.get(torch.tensor([0])) is not None  # the other rows stay
    with pytest.warns(UserWarning, match=r"rows \[1\] are damaged"):
        assert reopened.get(torch.tensor([0, 1])) is None  # the trainer runs the teacher for this batch
    assert reopened.filled == 3
    truncate(cache.dir / "ids.npy")
    with pytest.warns(UserWarning, match="afresh"):
        assert open_cache().filled == 0


def test_every_check_above_names_its_file_in_the_message(artifact):
    """The messages say which file: a user with several artifacts knows which to replace."""
    model, directory = artifact
    truncate(directory / WEIGHTS_NAME)
    with pytest.raises(BalconyError) as err:
        _load(model, directory)
    assert str(directory / WEIGHTS_NAME) in str(err.value)
    assert json.loads((directory / CONFIG_NAME).read_text())["weights_sha256"]
