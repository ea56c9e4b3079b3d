"""KV cache layers that take a decode step's columns in place (`serving.kvcache`): what they hold is
always what transformers' `DynamicLayer` would hold, and they copy the cache only when out of room."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from balcony.core.exits import join_rows
from balcony.serving.kvcache import SPARE, ColumnLayer, GraphCache, RoomLayer, with_room
from balcony.serving.runner import MixedRunner
from test_runner import PROMPTS, _model


def _kv(rows: int, columns: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, columns, 4, generator=g), torch.randn(rows, 2, columns, 4, generator=g)


def _same(room: RoomLayer, plain: DynamicLayer) -> None:
    torch.testing.assert_close(room.keys, plain.keys, rtol=0, atol=0)
    torch.testing.assert_close(room.values, plain.values, rtol=0, atol=0)


def test_columns_are_written_in_place_until_the_store_is_full():
    room, plain = RoomLayer(), DynamicLayer()
    for layer in (room, plain):
        layer.update(*_kv(3, 5, 0))
    stores = []
    for step in range(2 * SPARE + 3):
        kv = _kv(3, 1, step + 1)
        got, want = room.update(*kv), plain.update(*kv)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        _same(room, plain)
        stores.append(room.store)  # held, so that no two stores share an address
    # the first step moves the prompt's columns into a store with SPARE more; it fills up twice
    moves = [i for i in range(len(stores)) if i == 0 or stores[i] is not stores[i - 1]]
    assert moves == [0, SPARE + 1, 2 * SPARE + 2]


def test_rows_selected_keep_their_room_and_a_moved_cache_lets_its_store_go():
    room, plain = RoomLayer(), DynamicLayer()
    for layer in (room, plain):
        layer.update(*_kv(4, 6, 0))
        layer.update(*_kv(4, 1, 1))
    for layer in (room, plain):
        layer.batch_select_indices(torch.tensor([0, 2]))
    _same(room, plain)
    assert room.free() == SPARE
    kept = room.store
    for layer in (room, plain):
        layer.update(*_kv(2, 1, 2))
    _same(room, plain)
    assert room.store is kept and room.free() == SPARE - 1  # written in place
    # rows joined from elsewhere: the keys are a new tensor, the old store is dropped, the next step moves
    other = DynamicCache()
    other.update(*_kv(1, 3, 3), 0)
    mine, theirs = DynamicCache(), DynamicCache()
    mine.layers, theirs.layers = [room], [plain]
    join_rows(mine, other), join_rows(theirs, other)
    _same(room, plain)
    assert room.free() == 0 and room.store is None
    for layer in (room, plain):
        layer.update(*_kv(3, 1, 4))
    _same(room, plain)
    assert room.free() == SPARE


def test_a_cropped_cache_writes_over_the_columns_it_dropped():
    room, plain = RoomLayer(), DynamicLayer()
    for layer in (room, plain):
        layer.update(*_kv(2, 4, 0))
        for step in range(3):
            layer.update(*_kv(2, 1, step + 1))
        layer.crop(-2)
        layer.update(*_kv(2, 1, 9))
    _same(room, plain)


def test_the_graphs_cache_gives_every_layer_one_column_of_room_and_the_same_size():
    caches = [with_room(DynamicCache(config=_model().base.config)) for _ in range(2)]
    for cache in caches:
        for i, layer in enumerate(cache.layers):
            assert type(layer) is RoomLayer
            layer.update(*_kv(2, 5, i))
    caches[0].layers[0].update(*_kv(2, 1, 7))  # one layer has room, one column more than the others
    for cache in caches:
        for layer in cache.layers[1 if cache is caches[0] else 0:]:
            layer.update(*_kv(2, 1, 7))
    mask = torch.ones(2, 7)
    graph = GraphCache(caches, mask)
    sizes = {t.shape[2] for t in graph.tensors()}
    assert len(sizes) == 1 and sizes.pop() >= 7
    layer, plain = graph.layers[0], DynamicLayer()
    assert type(layer) is ColumnLayer and graph.get_seq_length() == 6
    plain.update(torch.cat([caches[0].layers[0].keys, torch.zeros(2, 2, 1, 4)], 2),
                 torch.cat([caches[0].layers[0].values, torch.zeros(2, 2, 1, 4)], 2))
    new = _kv(2, 1, 8)
    keys, values = layer.update(*new)
    torch.testing.assert_close(keys[:, :, :6], plain.keys[:, :, :6], rtol=0, atol=0)
    torch.testing.assert_close(keys[:, :, 6:], new[0], rtol=0, atol=0)
    graph.settle(7)
    torch.testing.assert_close(caches[0].layers[0].keys, keys, rtol=0, atol=0)


def test_a_runners_decode_steps_do_not_copy_the_cache():
    model = _model()
    runner = MixedRunner(model)
    rows, logits = runner.prefill(PROMPTS[:2], [None, 2], pad=0)
    tokens = logits.argmax(-1)
    logits = runner.step(rows, tokens)  # the prompt's columns move into stores with room
    layers = [layer for cache in [*rows.trunk, *rows.balconies.values()] if cache is not None for layer in cache.layers]
    stores = [layer.store for layer in layers]
    for _ in range(3):
        logits = runner.step(rows, logits.argmax(-1))
    assert all(layer.store is store and layer.free() == SPARE - 3 for layer, store in zip(layers, stores))
