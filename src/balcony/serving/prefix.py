"""Automatic prefix caching: the KV of prompt beginnings that requests share, kept for the next ones.

Chat requests to one model share the chat template's opening (SmolLM2's default system prompt is
24 of a short request's ~95 tokens), few-shot prompts share their examples, and prefill is the
larger part of a loaded server's work. Prompts are cut into blocks of `block` tokens; a block is
known by its exit, its tokens and the block before it (a chain, as vLLM's prefix cache keys its
blocks), so a match is always of a whole prefix and is exact, never a hash that may collide.
A block's KV is kept from the second prompt that starts with it on (one prompt's own tokens are
not worth the memory), within `budget` bytes, least recently used dropped first.

What a block holds is opaque here: the runner gives and takes, per block, one (keys, values) pair
per attention layer that the exit runs, each [heads, block, head_dim].
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Block:
    id: int
    kv: KV | None = None  # None: seen once, not kept yet
    size: int = 0  # bytes


class PrefixCache:
    def __init__(self, budget: int, block: int = 8, max_blocks: int = 65536):
        self.budget, self.block, self.max_blocks = budget, block, max_blocks
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self._ids = 0

    def __len__(self) -> int:
        return sum(1 for b in self.blocks.values() if b.kv is not None)

    def _key(self, parent, ids: list[int], n: int) -> tuple:
        """Block n of `ids`, after the block `parent` (an id; the first block's parent is its exit's root)."""
        return parent, tuple(ids[n * self.block:(n + 1) * self.block])

    def _chain(self, ids: list[int], exit_layer: int | None, count: int):
        """The keys of the first `count` blocks of `ids` that the cache knows, each with its block."""
        parent = ("exit", exit_layer)
        for n in range(count):
            key = self._key(parent, ids, n)
            found = self.blocks.get(key)
            yield key, found
            if found is None:
                return
            parent = found.id

    def match(self, ids: list[int], exit_layer: int | None) -> list[KV]:
        """The kept KV of the longest run of whole blocks `ids` starts with, leaving at least one token
        of `ids` to feed (its logits are the prompt's next-token distribution)."""
        found = []
        for key, block in self._chain(ids, exit_layer, (len(ids) - 1) // self.block):
            if block is None or block.kv is None:
                break
            found.append((key, block))
        for key, _ in reversed(found):  # the first block most recent: a chain is dropped from its end
            self.blocks.move_to_end(key)
        return [block.kv for _, block in found]

    def offer(self, ids: list[int], exit_layer: int | None, skip: int, kv_of: Callable[[int], KV]) -> None:
        """A prompt just prefilled at `exit_layer`: note its whole blocks from block `skip` on (those before
        came from the cache) and keep the KV (`kv_of(n)`, block n's) of those seen before."""
        if self.budget <= 0:
            return
        parent, seen = ("exit", exit_layer), []
        for n in range(len(ids) // self.block):
            key = self._key(parent, ids, n)
            block = self.blocks.get(key)
            if block is None:
                self._ids += 1
                block = self.blocks[key] = Block(self._ids)
            elif block.kv is None and n >= skip:
                kv = [(k.clone(), v.clone()) for k, v in kv_of(n)]
                block.kv, block.size = kv, sum(k.nbytes + v.nbytes for k, v in kv)
                self.bytes += block.size
            seen.append(key)
            parent = block.id
        for key in reversed(seen):
            self.blocks.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self.blocks and (self.bytes > self.budget or len(self.blocks) > self.max_blocks):
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.size
