"""experiments/recall-weight/lambada_dev.py: a LAMBADA sample for tuning recipes that the downstream table never scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from conftest import tiny_base, tiny_tokenizer

from balcony import BalconyModel
from balcony.evaluation.documents import subsample

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "recall-weight" / "lambada_dev.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("lambada_dev", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dev_documents_are_real_and_never_in_the_tables_sample():
    recipe = _recipe()
    docs = recipe.documents()
    assert len(docs) == 5153 and all(context and word and " " not in word for context, word in docs[:50])
    dev = recipe.dev_indices(500, len(docs))
    table = subsample({"lambada_openai": len(docs)}, ["lambada_openai"], {"lambada_openai": 200})["lambada_openai"]
    assert len(set(dev)) == 500 and not set(dev) & set(table)
    assert dev == recipe.dev_indices(500, len(docs))  # seeded: every run scores the same documents


def test_a_word_counts_only_when_every_one_of_its_tokens_is_the_greedy_choice():
    """score() against each exit's own forward (the path `generate` takes), on words that do and do not count."""
    recipe = _recipe()
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random", tokenizer=tiny_tokenizer())
    tok, context = model.tokenizer, "the cat sat on the"
    prefix = tok(context, add_special_tokens=False)["input_ids"]
    # the full model's own greedy continuation (from " "): a "word" it must score as found
    ids = tok(context + " ", add_special_tokens=False)["input_ids"]
    for _ in range(3):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = tok.decode(ids[len(prefix) + 1:])
    results = []
    for word in ("mat", "dog", greedy):
        target = tok(f"{context} {word}", add_special_tokens=False)["input_ids"]
        x = torch.tensor([target])
        expected = {}
        for name, depth in (("2", 2), ("4", 4), ("full", None)):
            logits = model(x, exit_layer=depth).logits[0, len(prefix) - 1 : -1]
            first = logits[0].sort(descending=True).indices.tolist().index(int(x[0, len(prefix)]))
            expected[name] = (bool((logits.argmax(-1) == x[0, len(prefix):]).all()), first)
        found = recipe.score(model, context, word)
        assert found == expected, word
        assert all((rank == 0) >= ok for ok, rank in found.values())  # a found word's first token is the top one
        results.append(found["full"][0])
    first_is_space = int(model(torch.tensor([prefix])).logits[0, -1].argmax()) == ids[len(prefix)]
    assert results[-1] == first_is_space  # the greedy word counts whenever the space before it is greedy too
