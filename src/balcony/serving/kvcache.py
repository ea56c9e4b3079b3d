"""KV cache layers that take a decode step's new column in place.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies the
whole cache every step: at 32 rows of ~130 columns on the default model that is ~190 MB read and
written per step, for one new column. A `RoomLayer` keeps its keys and values as views of a store
with free columns past their end and writes the new ones there; only when the store is full, or
after an operation that left the views (rows joined, columns dropped), is the cache copied into a
new store, with `SPARE` free columns again.

A compiled decode step (`runner.MixedRunner` with `compile=True`) cannot trace that bookkeeping, so
`GraphCache` does it before the call: it reserves the step's column in every layer, hands the graph
the stores themselves (`ColumnLayer`: write column `width - 1`, attend to the first `width`, where
`width` is the mask's), and points the layers at their new views after.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

SPARE = 32  # free columns a store gets when it is (re)allocated: one copy per 32 decode steps


def _views(tensor: torch.Tensor, store: torch.Tensor) -> bool:
    """Whether `tensor` is the leading columns of `store` (what `RoomLayer` keeps)."""
    return (tensor.data_ptr() == store.data_ptr() and tensor.stride() == store.stride()
            and tensor.shape[:2] == store.shape[:2] and tensor.shape[3] == store.shape[3])


class RoomLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first columns of stores with room to grow."""

    store: tuple[torch.Tensor, torch.Tensor] | None = None

    def free(self) -> int:
        """Columns the stores hold past the keys' end (0 without stores the keys are a view of)."""
        store = self.store
        if store is not None and not (self.is_initialized and _views(self.keys, store[0])
                                      and _views(self.values, store[1])):
            self.store = store = None  # the keys moved (rows joined, columns dropped): let it go
        return 0 if store is None else store[0].shape[2] - self.keys.shape[2]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` new columns (moving the cache, with `SPARE` more, if needed)."""
        if self.free() < columns:
            self.move(self.keys.shape[2] + columns + SPARE)

    def move(self, size: int) -> None:
        """Copy the cache into new stores of `size` columns."""
        keys, values = self.keys, self.values
        width = keys.shape[2]
        self.store = (keys.new_empty(*keys.shape[:2], size, keys.shape[3]),
                      values.new_empty(*values.shape[:2], size, values.shape[3]))
        self.store[0][:, :, :width].copy_(keys)
        self.store[1][:, :, :width].copy_(values)
        self.view(width)

    def view(self, width: int) -> None:
        """Point the keys and values at the stores' first `width` columns."""
        self.keys, self.values = self.store[0][:, :, :width], self.store[1][:, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:  # the first columns: no copy to save
            return super().update(key_states, value_states, *args, **kwargs)
        width, new = self.keys.shape[2], key_states.shape[2]
        self.reserve(new)
        self.store[0][:, :, width:width + new].copy_(key_states)
        self.store[1][:, :, width:width + new].copy_(value_states)
        self.view(width + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.free():
            return super().batch_select_indices(indices)
        width = self.keys.shape[2]  # the kept rows keep their free columns (the same one copy)
        self.store = (self.store[0][indices], self.store[1][indices])
        self.view(width)


def with_room(cache: DynamicCache) -> DynamicCache:
    """`cache` with its plain dynamic layers replaced by `RoomLayer`s (sliding ones are left)."""
    cache.layers = [RoomLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class ColumnLayer(DynamicLayer):
    """A layer inside a compiled step: writes the step's column into the store in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.mask, self.is_initialized = keys, values, mask, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        width = self.mask.shape[1]  # columns after this step: the mask covers the new one
        self.keys[:, :, width - 1:width].copy_(key_states)
        self.values[:, :, width - 1:width].copy_(value_states)
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_seq_length(self) -> int:
        return self.mask.shape[1] - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.mask.shape[1] - 1 + query_length, 0


class GraphCache(DynamicCache):
    """The trunk spans' `RoomLayer`s in stack order, seen by a compiled one-column step as one cache.

    Every store is given one free column and the same number of columns (so the graph's symbolic
    sizes stay equal across layers and it is not compiled again); `settle` after the call points the
    layers at their stores' first `mask.shape[1]` columns, the step's column included."""

    def __init__(self, caches: list, mask: torch.Tensor):
        self.rooms = [layer for cache in caches for layer in cache.layers]
        sizes = {layer.store[0].shape[2] if layer.free() >= 1 else 0 for layer in self.rooms}
        if len(sizes) > 1 or 0 in sizes:  # one has no room: every one moves, to the same size
            size = max(layer.keys.shape[2] for layer in self.rooms) + 1 + SPARE
            for layer in self.rooms:
                layer.move(size)
        Cache.__init__(self, layers=[ColumnLayer(*layer.store, mask) for layer in self.rooms])

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.keys, layer.values)]

    def settle(self, width: int) -> None:
        for layer in self.rooms:
            layer.view(width)
