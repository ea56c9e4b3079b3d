"""Request packing for the downstream sweep: sequences that share a prefix go into one row.

The choices of one question all follow the same context, and MMLU's prompts share their few-shot
examples; a packed row holds the shared prefix once, then each sequence's remainder, which sees
the prefix and itself only (its own positions, a block mask). Rows then go into batches of about
a fixed number of tokens, longest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.exits import block_mask, takes_block_mask
from ..core.model import BalconyModel


@dataclass
class Row:
    """One model input holding several sequences that share a prefix: the prefix once, then each
    sequence's remainder, which sees the prefix and itself only (own positions, a block mask)."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared prefix; i: the remainder of member i
    members: list[tuple]
    index: list[list[int]]  # member -> the row position of each of its tokens

    @classmethod
    def pack(cls, members: list[tuple]) -> Row:
        shared = _common_prefix_length(members)
        if len(members) == 1:
            shared = len(members[0])
        tokens, positions, segments = list(members[0][:shared]), list(range(shared)), [0] * shared
        index = []
        for m, member in enumerate(members, start=1):
            start = len(tokens)
            tokens.extend(member[shared:])
            positions.extend(range(shared, len(member)))
            segments.extend([m] * (len(member) - shared))
            index.append(list(range(shared)) + list(range(start, start + len(member) - shared)))
        return cls(tokens, positions, segments, members, index)


def group_by_prefix(inputs: list[tuple], row_tokens: int, min_shared: int = 8) -> list[list[tuple]]:
    """Sorted inputs grouped so that each group's common prefix is worth sharing (the choices of one
    question, MMLU's few-shot examples) and a packed group stays within `row_tokens`."""
    groups: list[list[tuple]] = []
    prefix = 0
    for tokens in inputs:
        if groups:
            group = groups[-1]
            shared = _common_prefix_length([group[0], tokens])
            shared = min(shared, prefix) if len(group) > 1 else shared
            packed = shared + sum(len(t) - shared for t in group) + len(tokens) - shared
            if shared >= min_shared and (len(group) == 1 or 2 * shared >= prefix) and packed <= row_tokens:
                group.append(tokens)
                prefix = shared
                continue
        groups.append([tokens])
        prefix = len(tokens)
    return groups


def _common_prefix_length(sequences: list[tuple]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def pack_rows(inputs: list[tuple], *, packing: bool, row_tokens: int) -> list[Row]:
    """The rows that hold `inputs` (packed, or one sequence each), longest first: little padding
    once batched, and a pessimistic ETA."""
    if packing:
        rows = [Row.pack(group) for group in group_by_prefix(sorted(inputs), row_tokens)]
    else:
        rows = [Row.pack([tokens]) for tokens in inputs]
    rows.sort(key=lambda row: len(row.tokens), reverse=True)
    return rows


def batches(rows: list[Row], *, batch_tokens: int, max_batch: int) -> list[list[Row]]:
    """Rows (longest first) in batches of about `batch_tokens` padded tokens, at most `max_batch` rows."""
    out, start = [], 0
    while start < len(rows):
        size = max(1, min(max_batch, batch_tokens // len(rows[start].tokens)))
        out.append(rows[start:start + size])
        start += size
    return out


def packed_mask(batch: list[Row], width: int, config, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, width, width]: causal, and a remainder sees the shared prefix and itself only.
    Padding attends to itself (a row that sees nothing would give NaN); nothing reads it."""
    allowed = torch.zeros((len(batch), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, row in enumerate(batch):
        n = len(row.tokens)
        seg = torch.tensor(row.segments)
        visible = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        allowed[r, 0, :n, :n] = visible & causal[:n, :n]
        allowed[r, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)
    return block_mask(allowed, config, dtype)


def can_pack(model: BalconyModel) -> bool:
    """Whether rows may pack sequences behind a custom mask: not where sliding windows would need
    building into it, and only for attention kinds that take a 4-D mask (sdpa, eager)."""
    return takes_block_mask(model.base.config)
