"""The model runner: one batch whose rows sit at any exits, sharing the trunk.

The stack is cut at the exits e1 < e2 < ... into trunk spans [0, e1), [e1, e2), ..., [en, L)
(the last one ends in the final norm); each balcony is a span of its own. A row at exit e runs
the trunk spans below e, then balcony e, then the shared head; a full-depth row runs every
trunk span. Each span keeps one KV cache holding exactly the rows that run it, so a layer runs
once per step for all the rows that need it, and a row's cache holds only the layers it uses.

Rows join and leave at any step. Every cache of a batch shares one column layout: a row's
columns are left-padded (masked) to the batch's width, so a newcomer prefilled on its own is
joined by padding, and columns no row attends to any more are dropped when rows leave. This
needs caches without sliding windows (`core.exits.can_join_rows`); the engine serves other
bases in per-exit batches. The caches' layers take each step's column in place (`kvcache.RoomLayer`)
rather than copying the whole cache per step as transformers' dynamic layers do.

With `compile=True`, a decode step whose rows all run at full depth, at most `GRAPH_ROWS` of them, goes
through the base's own decoder compiled by torch.compile (inductor, weights frozen into the graph, dynamic
context length and row count: one graph for a lone row, one for every larger batch), over one cache that
hands it the spans' cache stores in stack order (`kvcache.GraphCache`: it writes the step's column into
them in place), so the rows' caches stay the spans' and rows join and leave as before; the head stays the
packed eager product (inside the graph it was slower here). The graph saves the eager modules' Python and
dispatch and fuses their small operations, freezing lets inductor pack the weights once (for the lone row
into its C++ GEMM template, timed against MKL's packed product per linear at compile time:
`LONE_SETTINGS`; oneDNN's for a batch), its C++ wrapper calls the kernels without Python between them, and
its attention reads the grouped key/value heads in place (`core.kernels.GROUPED_SDPA`; transformers' sdpa
copies them in a compiled graph, which made the graph lose to the eager spans at 32 rows). Prompt chunks,
rows at exits and steps past `GRAPH_ROWS` rows run the spans. The graphs cost minutes of compiling at
start (the engine's calibration runs both) and a frozen copy of the decoder's weights each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import BalconyError
from ..core.exits import decoder_of, drop_columns, join_rows, left_pad, pad_columns, positions_from_mask
from ..core.model import BalconyModel
from .kvcache import GraphCache, with_room
from .prefix import PrefixCache


# dynamic shapes: one graph serves every context length (and one every row count past 1). The guards
# skip the modules' attributes: their weights are constants in the graph, so nothing those guards
# watch can change what it computes, and checking them took ~1.7 ms a step (0.5 without). The
# weights are frozen and the wrapper made C++ at the call (`MixedRunner._through_graph`).
COMPILE = {"dynamic": True, "options": {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}
# inductor's settings while a graph compiles (torch.compile's `options` do not reach these two):
# freezing makes the weights constants it packs once; the C++ wrapper calls the graph's ~400
# kernels and products without a Python line between them
GRAPH_SETTINGS = {"freezing": True, "cpp_wrapper": True}
# a lone row's graph also has inductor time its C++ GEMM template against MKL's packed product for
# each linear and keep the faster: for one row the template won every linear of the default model,
# and its steps went from 48.4 to 32.3 ms on one thread (the same tokens). A batch's graph does not
# (at 32 rows oneDNN won every linear, so it would only compile longer), nor a template timed
# for a few rows then run for 32.
LONE_SETTINGS = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN",
                 "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
GRAPH_ROWS = 32  # the most rows a compiled step takes (measured faster up to 32 on 2 cores)


@dataclass
class Rows:
    """A group of sequences with their KV caches: the running batch, or newcomers being prefilled."""

    exits: list[int | None]  # per row: its exit (None: the full model)
    mask: torch.Tensor  # [rows, columns] 1 for real tokens, 0 for padding
    positions: torch.Tensor  # [rows] the position of each row's next token
    trunk: list = field(default_factory=list)  # per trunk span: its cache (None while no row runs it)
    balconies: dict = field(default_factory=dict)  # exit -> its balcony's cache

    def __len__(self) -> int:
        return len(self.exits)


class MixedRunner:
    """Runs `Rows` through the spans: prefill of newcomers, decode steps, joins and leaves."""

    def __init__(self, model: BalconyModel, compile: bool = False, prefix_cache_bytes: int = 0):
        self.model = model
        self.bounds = [0, *model.exits, model.num_layers]
        self.trunk = [model.trunk_span(a, b) for a, b in zip(self.bounds, self.bounds[1:])]
        self.span_layers = [len(span.new_cache().layers) for span in self.trunk]
        self.balcony = {e: model.balcony_span(e) for e in model.exits}
        if prefix_cache_bytes < 0:
            raise BalconyError(f"the prefix cache's budget must be at least 0 bytes (0 turns it off), "
                               f"not {prefix_cache_bytes}")
        # prompt beginnings' KV that newcomers start from (`prefix.py`); None: every prompt in full
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.full = None  # the compiled full-depth decoder (decode steps of up to GRAPH_ROWS full-depth rows)
        if compile:
            self.full = torch.compile(decoder_of(model.base, model.parts), **COMPILE)

    def _runs(self, exit_layer: int | None, k: int) -> bool:
        """Whether a row at `exit_layer` runs trunk span k (its depth lies past the span's start)."""
        depth = self.model.num_layers if exit_layer is None else exit_layer
        return depth > self.bounds[k]

    def empty(self) -> Rows:
        device = self.model.device
        return Rows([], torch.zeros(0, 0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device),
                    [None] * len(self.trunk), {})

    @torch.no_grad()
    def forward(self, rows: Rows, ids: torch.Tensor, positions: torch.Tensor, head: bool = True) -> torch.Tensor | None:
        """Feed `ids` [rows, q] at `positions` [rows, q] (rows.mask already covers them); returns each
        row's logits at its last position, [rows, vocab], each from its own exit (None without `head`:
        a prefill chunk that is not the last only fills the caches)."""
        if (self.full is not None and head and ids.shape[1] == 1 and len(rows) <= GRAPH_ROWS
                and all(e is None for e in rows.exits) and all(c is not None for c in rows.trunk)):
            return self._through_graph(rows, ids, positions)
        device = ids.device
        logits = [None] * len(rows)
        members = list(range(len(rows)))  # rows still going deeper, in batch order
        hidden = None
        for k, span in enumerate(self.trunk):
            stop = self.bounds[k + 1]
            members_here = [i for i in members if self._runs(rows.exits[i], k)]
            if not members_here:
                break
            if hidden is not None and len(members_here) != len(members):
                keep = [members.index(i) for i in members_here]
                hidden = hidden[keep]
            members = members_here
            index = torch.tensor(members, device=device)
            if rows.trunk[k] is None:
                rows.trunk[k] = with_room(span.new_cache())
            out = span(ids[index] if k == 0 else None, states=hidden if k else None, cache=rows.trunk[k],
                       attention_mask=rows.mask[index], position_ids=positions[index])
            leaving = [j for j, i in enumerate(members) if rows.exits[i] == stop]
            if stop == self.model.num_layers:  # the last span ends in the final norm: the full rows
                for j, i in enumerate(members):
                    logits[i] = out[j, -1]
                break
            if leaving:  # rows at exit `stop`: through its balcony
                rows_out = [members[j] for j in leaving]
                sub = torch.tensor(rows_out, device=device)
                if rows.balconies.get(stop) is None:
                    rows.balconies[stop] = with_room(self.balcony[stop].new_cache())
                normed = self.balcony[stop](states=out[leaving], cache=rows.balconies[stop],
                                            attention_mask=rows.mask[sub], position_ids=positions[sub])
                for n, i in enumerate(rows_out):
                    logits[i] = normed[n, -1]
            hidden = out
        return self.model.logits(torch.stack(logits)) if head else None

    def _through_graph(self, rows: Rows, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A decode step of full-depth rows through the compiled decoder; their logits [rows, vocab]."""
        from torch._inductor import config as inductor

        cache = GraphCache(rows.trunk, rows.mask)  # the caches' stores, with room for this step's column
        kv = cache.tensors()
        torch._dynamo.maybe_mark_dynamic(rows.mask, 1)  # one graph for every length (else two)
        for tensor in kv:
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        if len(rows) > 1:  # one graph for every batch, whichever size comes first (a lone row has its own)
            for tensor in (ids, rows.mask, positions, *kv):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        with inductor.patch({**GRAPH_SETTINGS, **(LONE_SETTINGS if len(rows) == 1 else {})}):
            out = self.full(input_ids=ids, attention_mask=rows.mask, position_ids=positions, cache=cache,
                            use_cache=True)
        cache.settle(rows.mask.shape[1])
        return self.model.logits(out.last_hidden_state[:, -1])

    def prefill(self, prompts: list[list[int]], exits: list[int | None], pad: int) -> tuple[Rows, torch.Tensor]:
        """New rows (left-padded together) and their next-token logits, in one pass."""
        filling = Prefill(self, prompts, exits, pad)
        return filling.rows, filling.advance()

    def step(self, rows: Rows, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: every row feeds its pending token; returns the next logits per row."""
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], 1)
        logits = self.forward(rows, tokens[:, None], rows.positions[:, None])
        rows.positions = rows.positions + 1
        return logits

    def join(self, rows: Rows, new: Rows) -> None:
        """Append `new`'s rows to `rows`, padding the narrower column layout on the left."""
        width = max(rows.mask.shape[1], new.mask.shape[1])
        for group in (rows, new):
            missing = width - group.mask.shape[1]
            if missing and len(group):
                group.mask = torch.cat([group.mask.new_zeros(len(group), missing), group.mask], 1)
                for cache in [*group.trunk, *group.balconies.values()]:
                    if cache is not None:
                        pad_columns(cache, width)
        for k in range(len(self.trunk)):
            if new.trunk[k] is not None:
                rows.trunk[k] = join_rows(rows.trunk[k], new.trunk[k])
        for e, cache in new.balconies.items():
            rows.balconies[e] = join_rows(rows.balconies.get(e), cache)
        rows.exits += new.exits
        rows.mask = new.mask if rows.mask.numel() == 0 else torch.cat([rows.mask, new.mask], 0)
        rows.positions = torch.cat([rows.positions, new.positions])

    def keep(self, rows: Rows, kept: list[int]) -> None:
        """Keep only the rows at these batch indices (the others finished or left)."""
        before = list(rows.exits)
        for k, cache in enumerate(rows.trunk):
            if cache is None:
                continue
            members = [i for i, e in enumerate(before) if self._runs(e, k)]
            chosen = [members.index(i) for i in kept if i in members]
            rows.trunk[k] = self._select(cache, chosen)
        for e, cache in list(rows.balconies.items()):
            members = [i for i, x in enumerate(before) if x == e]
            rows.balconies[e] = self._select(cache, [members.index(i) for i in kept if i in members])
        index = torch.tensor(kept, dtype=torch.long, device=rows.mask.device)
        rows.exits = [before[i] for i in kept]
        rows.mask, rows.positions = rows.mask[index], rows.positions[index]
        if not len(rows):
            rows.mask = rows.mask[:, :0]  # no row left: the next ones start from their own columns
        elif rows.mask.shape[1]:
            first = int(rows.mask.any(0).long().argmax())  # columns before it: padding for every row
            if first:
                rows.mask = rows.mask[:, first:]
                for cache in [*rows.trunk, *rows.balconies.values()]:
                    if cache is not None:
                        drop_columns(cache, first)

    @staticmethod
    def _select(cache, chosen: list[int]):
        if not chosen:
            return None
        cache.batch_select_indices(torch.tensor(chosen, dtype=torch.long, device=cache.layers[0].keys.device))
        return cache


class Prefill:
    """Newcomers being prefilled (left-padded together), `columns` prompt positions per call, so a
    long prompt does not stall the running batch: the scheduler interleaves chunks with decode steps.

    With the runner's prefix cache, every row starts from the same number of cached columns (the
    fewest any row found), its cached blocks' KV, and only the rest is fed: the columns are
    [cached prefix][left padding][rest], which the mask and positions describe as any padding."""

    def __init__(self, runner: MixedRunner, prompts: list[list[int]], exits: list[int | None], pad: int,
                 columns: int | None = None):
        self.runner, self.prompts = runner, prompts
        cache = runner.prefix
        hits = [cache.match(p, e) for p, e in zip(prompts, exits)] if cache is not None else []
        blocks = min((len(h) for h in hits), default=0)
        self.cached = blocks * cache.block if blocks else 0  # prompt tokens each row starts with in its caches
        self.ids, rest = left_pad([p[self.cached:] for p in prompts], pad, runner.model.device)
        self.mask = torch.cat([rest.new_ones(len(prompts), self.cached), rest], 1)
        self.positions = positions_from_mask(self.mask)[:, self.cached:]
        self.columns = columns or self.ids.shape[1]
        self.rows = Rows(list(exits), self.mask[:, :self.cached], self.mask.sum(-1), [None] * len(runner.trunk), {})
        if blocks:
            self._start_from([h[:blocks] for h in hits])
        self.fed = 0  # columns of `ids` (the uncached rest) in the caches so far

    @property
    def done(self) -> bool:
        return self.fed >= self.ids.shape[1]

    def advance(self) -> torch.Tensor | None:
        """Feed the next chunk; the rows' next-token logits once the last one is in, else None."""
        start, stop = self.fed, min(self.fed + self.columns, self.ids.shape[1])
        self.rows.mask = self.mask[:, :self.cached + stop]
        self.fed = stop
        logits = self.runner.forward(self.rows, self.ids[:, start:stop], self.positions[:, start:stop], head=self.done)
        if self.done and self.runner.prefix is not None:
            self._remember()
        return logits

    def _caches(self):
        """Each cache these rows fill, with the batch indices of its rows and where its layers sit in
        a block's KV list (a row's caches in stack order: the trunk spans it runs, then its balcony)."""
        runner, exits = self.runner, self.rows.exits
        first = 0
        for k, span in enumerate(runner.trunk):
            yield ("trunk", k), [i for i, e in enumerate(exits) if runner._runs(e, k)], first, span
            first += runner.span_layers[k]
        for e in sorted({e for e in exits if e is not None}):
            first = sum(runner.span_layers[k] for k in range(len(runner.trunk)) if runner._runs(e, k))
            yield ("balcony", e), [i for i, x in enumerate(exits) if x == e], first, runner.balcony[e]

    def _start_from(self, hits: list[list]) -> None:
        """Caches holding each row's cached blocks (`hits[row]`, one KV list per block)."""
        for (kind, where), members, first, span in self._caches():
            if not members:
                continue
            cache = with_room(span.new_cache())
            for j, layer in enumerate(cache.layers):
                keys = torch.stack([torch.cat([kv[first + j][0] for kv in hits[i]], 1) for i in members])
                values = torch.stack([torch.cat([kv[first + j][1] for kv in hits[i]], 1) for i in members])
                layer.update(keys, values)
            if kind == "trunk":
                self.rows.trunk[where] = cache
            else:
                self.rows.balconies[where] = cache

    def _remember(self) -> None:
        """Offer every row's prompt blocks to the prefix cache, each with its KV from these caches."""
        block, width = self.runner.prefix.block, self.ids.shape[1]
        caches = [(self.rows.trunk[where] if kind == "trunk" else self.rows.balconies.get(where), members, first)
                  for (kind, where), members, first, _ in self._caches() if members]
        for i, (prompt, exit_layer) in enumerate(zip(self.prompts, self.rows.exits)):
            # prompt token t >= cached sits at column cached + (its row's padding) + (t - cached)
            shift = width - (len(prompt) - self.cached)

            def kv_of(n: int, i=i, shift=shift):
                columns = slice(n * block + shift, (n + 1) * block + shift)
                return [(layer.keys[row, :, columns], layer.values[row, :, columns])
                        for cache, members, _ in caches if i in members
                        for row in [members.index(i)] for layer in cache.layers]

            self.runner.prefix.offer(prompt, exit_layer, self.cached // block, kv_of)
