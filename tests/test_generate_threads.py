"""One model shared by many threads: every generate call's output, exit and statistics are its own."""

from __future__ import annotations

import threading

import torch
from conftest import VOCAB, tiny_base

from balcony import BalconyGenerateOutput, BalconyModel

EXITS = [2, 4]


def _calls(model) -> dict[str, dict]:
    """Eight different requests: fixed exits, budgets, the full model, and both modes."""
    costs = {e: model.costs.relative(e) for e in EXITS}
    return {
        "exit 2": dict(exit_layer=2),
        "exit 4": dict(exit_layer=4),
        "budget -> 4": dict(budget=costs[4]),
        "budget -> 2": dict(budget=0.01),
        "full": dict(exit_layer="full"),
        "speculative 2": dict(mode="speculative", draft_exit=2),
        "speculative 4": dict(mode="speculative", draft_exit=4, num_draft=2),
        "dynamic": dict(mode="dynamic", threshold=0.02),
    }


def _run(model, ids, request) -> BalconyGenerateOutput:
    return model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          **request)


def test_eight_threads_on_one_model_each_get_their_own_result():
    torch.manual_seed(0)
    model = BalconyModel.from_base(tiny_base("llama"), exits=EXITS, init="random")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    calls = _calls(model)
    alone = {name: _run(model, ids, request) for name, request in calls.items()}
    assert alone["budget -> 4"].exit_layer == 4 and alone["budget -> 2"].exit_layer == 2
    assert alone["full"].exit_layer is None and alone["dynamic"].stats["mode"] == "dynamic"
    assert alone["speculative 2"].stats != alone["speculative 4"].stats  # a mix-up would show
    assert not torch.equal(alone["exit 2"].sequences, alone["exit 4"].sequences)
    assert len({tuple(out.sequences[0].tolist()) for out in alone.values()}) >= 3

    results: dict[str, list[BalconyGenerateOutput]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def worker(name: str) -> None:
        try:
            start.wait()
            results[name] = [_run(model, ids, calls[name]) for _ in range(3)]
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        for out in outs:
            assert torch.equal(out.sequences, alone[name].sequences), name
            assert out.exit_layer == alone[name].exit_layer, name
            assert out.mode == alone[name].mode and out.stats == alone[name].stats, name
    assert not hasattr(model, "last_exit") and not hasattr(model, "last_stats")


def test_generate_returns_transformers_outputs_too():
    model = BalconyModel.from_base(tiny_base("qwen2"), exits=EXITS)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, exit_layer=2, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, BalconyGenerateOutput) and out.exit_layer == 2 and len(out.scores) == 3
    plain = model.generate(ids, exit_layer=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)
