"""The mixed-exit runner: rows at different exits in one batch, joining and leaving at any step,
give each row the tokens `generate` gives alone at its exit."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from conftest import NUM_LAYERS, count_compiled_steps, tiny_base

from balcony import BalconyModel
from balcony.core.exits import can_join_rows
from balcony.serving.runner import MixedRunner, Prefill

PROMPTS = [[5, 9, 13, 4, 22, 31], [7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48], [11, 12, 13, 14]]
EXITS = [2, None, 4, 2]


def _model(arch="llama"):
    return BalconyModel.from_base(tiny_base(arch), exits=[2, 4], init="random")


def _greedy(runner, rows, logits, n):
    """n greedy tokens per row of `rows`, from the logits of its last prefill."""
    got = [[] for _ in range(len(rows))]
    for _ in range(n):
        tokens = logits.argmax(-1)
        for r, t in enumerate(tokens.tolist()):
            got[r].append(t)
        logits = runner.step(rows, tokens)
    return got


def _alone(model, prompt, exit_layer, n):
    out = model.generate(torch.tensor([prompt]), exit_layer=exit_layer, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2"])
def test_rows_at_different_exits_in_one_batch_equal_each_exit_alone(arch):
    model = _model(arch)
    runner = MixedRunner(model)
    rows, logits = runner.prefill(PROMPTS, EXITS, pad=0)
    got = _greedy(runner, rows, logits, 8)
    for prompt, exit_layer, tokens in zip(PROMPTS, EXITS, got):
        assert tokens == _alone(model, prompt, exit_layer, 8), (exit_layer, prompt)


def test_rows_join_and_leave_at_any_step():
    model = _model()
    _join_and_leave(model, MixedRunner(model), EXITS)


def test_a_batch_that_empties_starts_the_next_rows_from_their_own_columns():
    """Once every row has left, nothing is left to pad a newcomer with: one request after another, each
    decodes on exactly its own columns (a server's steps must not slow down with the requests it served)."""
    model = _model()
    runner, batch = MixedRunner(model), None
    for round_ in range(3):
        batch = batch or runner.empty()
        new, logits = runner.prefill([PROMPTS[1]], [None], pad=0)
        runner.join(batch, new)
        assert batch.mask.shape == (1, len(PROMPTS[1])), round_
        assert _greedy(runner, batch, logits, 5) == [_alone(model, PROMPTS[1], None, 5)]
        assert batch.mask.shape == (1, len(PROMPTS[1]) + 5)
        runner.keep(batch, [])
        assert batch.mask.shape == (0, 0) and all(cache is None for cache in batch.trunk)


def test_compiled_full_depth_steps_give_what_eager_steps_give(traced_compile, monkeypatch):
    """`compile=True`: a decode step whose rows all run at full depth, at most GRAPH_ROWS of them, goes
    through the compiled decoder (one graph for a lone row, one for every larger batch, each for every
    length) and gives what the spans give; a step with a row at an exit, or past GRAPH_ROWS rows, or a
    prompt's pass (even of one token) runs the spans."""
    from balcony.serving import runner as runner_module

    model = _model()
    runner = MixedRunner(model, compile=True)
    calls = count_compiled_steps(runner)
    _join_and_leave(model, runner, [None] * len(PROMPTS))
    assert set(calls) == {1, 2, 3, 4}  # the batch grows to 4 rows and shrinks to 1
    assert counters["stats"]["unique_graphs"] == 2
    calls.clear()
    _join_and_leave(model, runner, EXITS)  # a row at an exit in every step: the spans run them all
    assert not calls
    calls.clear()
    monkeypatch.setattr(runner_module, "GRAPH_ROWS", 2)
    _join_and_leave(model, runner, [None] * len(PROMPTS))
    assert set(calls) == {1, 2}  # the steps of 3 and 4 rows ran the spans
    calls.clear()
    eager = MixedRunner(model)
    rows, logits = runner.prefill([PROMPTS[0], PROMPTS[2]], [None, None], pad=0)
    rows_eager, _ = eager.prefill([PROMPTS[0], PROMPTS[2]], [None, None], pad=0)
    tokens = logits.argmax(-1)
    for _ in range(3):
        got, want = runner.step(rows, tokens), eager.step(rows_eager, tokens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = want.argmax(-1)
    assert calls == [2, 2, 2]
    calls.clear()
    one, logits = runner.prefill([[17]], [None], pad=0)  # a one-token prompt: no cache yet to feed the graph
    assert not calls and _greedy(runner, one, logits, 3) == [_alone(model, [17], None, 3)]
    assert calls == [1, 1, 1]


def test_compiled_steps_freeze_the_weights_into_the_graph():
    """The compiled decoder is called with inductor's `freezing` and C++ wrapper on, so inductor packs
    the weights once and calls its kernels without Python between them (passed as torch.compile's
    options, freezing never reached inductor, and the products ran unpacked); a lone row's graph also
    times inductor's GEMM template against the packed products, a batch's does not. The plain decoder
    stands in for the compiled one: the settings at the call are what counts."""
    from torch._inductor import config as inductor

    from balcony.core.exits import decoder_of

    model = _model()
    runner = MixedRunner(model, compile=True)
    decoder, seen = decoder_of(model.base, model.parts), []

    def recording(**kwargs):
        seen.append((len(kwargs["input_ids"]), inductor.freezing, inductor.cpp_wrapper, inductor.max_autotune_gemm,
                     inductor.max_autotune_gemm_backends))
        return decoder(**kwargs)

    runner.full = recording
    rows, logits = runner.prefill([PROMPTS[0]], [None], pad=0)
    _greedy(runner, rows, logits, 2)
    rows, logits = runner.prefill(PROMPTS[:2], [None, None], pad=0)
    _greedy(runner, rows, logits, 1)
    backends = inductor.max_autotune_gemm_backends
    assert seen == [(1, True, True, True, "CPP,ATEN")] * 2 + [(2, True, True, False, backends)]
    assert not (inductor.freezing or inductor.cpp_wrapper or inductor.max_autotune_gemm) and backends != "CPP,ATEN"


def _join_and_leave(model, runner, exits):
    n = 10
    expected = [_alone(model, p, e, n) for p, e in zip(PROMPTS, exits)]
    batch = runner.empty()
    owners: list[int] = []  # the prompt each batch row belongs to
    got = {i: [] for i in range(len(PROMPTS))}
    pending = torch.zeros(0, dtype=torch.long)
    arrivals = {0: [0, 1], 3: [2], 5: [3]}  # step -> prompts that arrive
    for step in range(40):
        if step in arrivals:
            new, logits = runner.prefill([PROMPTS[i] for i in arrivals[step]], [exits[i] for i in arrivals[step]], pad=0)
            first = logits.argmax(-1)
            for i, t in zip(arrivals[step], first.tolist()):
                got[i].append(t)
            runner.join(batch, new)
            owners += arrivals[step]
            pending = torch.cat([pending, first])
        if not owners:
            continue
        logits = runner.step(batch, pending)
        pending = logits.argmax(-1)
        for i, t in zip(owners, pending.tolist()):
            got[i].append(t)
        done = [j for j, i in enumerate(owners) if len(got[i]) >= n]
        if done:
            alive = [j for j in range(len(owners)) if j not in done]
            runner.keep(batch, alive)
            owners = [owners[j] for j in alive]
            pending = pending[alive]
    for i in range(len(PROMPTS)):
        assert got[i][:n] == expected[i], i
    assert not owners and len(batch) == 0


def test_a_row_uses_only_the_layers_of_its_exit():
    model = _model()
    runner = MixedRunner(model)
    rows, _ = runner.prefill([PROMPTS[0]], [2], pad=0)
    assert rows.trunk[0] is not None and rows.trunk[1] is None and rows.trunk[2] is None
    assert set(rows.balconies) == {2}
    full, _ = runner.prefill([PROMPTS[1]], [None], pad=0)
    assert all(c is not None for c in full.trunk) and not full.balconies


def test_sliding_window_bases_are_served_in_per_exit_batches_instead():
    from conftest import tiny_config

    assert not can_join_rows(tiny_config("mistral")) and not can_join_rows(tiny_config("gemma2"))
    assert can_join_rows(tiny_config("llama")) and NUM_LAYERS == 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("columns", [1, 3, 4])
def test_a_prefill_fed_in_chunks_gives_what_one_pass_gives(arch, columns):
    model = _model(arch)
    runner = MixedRunner(model)
    _, whole = runner.prefill(PROMPTS, EXITS, pad=0)
    filling = Prefill(runner, PROMPTS, EXITS, pad=0, columns=columns)
    chunks = 0
    while (logits := filling.advance()) is None:
        chunks += 1
    assert chunks + 1 == -(-max(map(len, PROMPTS)) // columns) and filling.done
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)
    got = _greedy(runner, filling.rows, logits, 6)
    for prompt, exit_layer, tokens in zip(PROMPTS, EXITS, got):
        assert tokens == _alone(model, prompt, exit_layer, 6), (exit_layer, prompt)
