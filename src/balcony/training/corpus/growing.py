"""Growing a corpus by one source: shard after shard, from where the last shard of that source stopped."""

from __future__ import annotations

import os
import random
import time
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from .clean import Decontaminator, evaluation_texts
from .answers import TOP_K
from .source import Context, Source, locate
from .sources import SOURCES
from .store import Corpus, CorpusError, Shard, doc_key


class SourceOrder:
    """The order a source's items are added in, fixed by the seed run after run: round 0 is the
    item list shuffled by `seed` (the order every corpus was grown in before rounds existed, so
    their cursors still point where they stopped), each later round the same list reshuffled.
    Rounds are shuffled when first reached, so a source may have as many as it likes."""

    def __init__(self, items: list, rounds: int, seed: int):
        self.items, self.rounds, self.seed = items, rounds, seed
        self.round = lru_cache(maxsize=2)(self._shuffled)

    def _shuffled(self, r: int) -> list:
        items = list(self.items)
        random.Random(self.seed if r == 0 else f"{self.seed}:{r}").shuffle(items)
        return items

    def __len__(self) -> int:
        return len(self.items) * self.rounds

    def take(self, start: int, count: int) -> list:
        n = len(self.items)
        return [self.round(i // n)[i % n] for i in range(start, min(start + count, len(self)))]


def source_order(spec: Source, seed: int, paths: list | None = None) -> SourceOrder:
    return SourceOrder(spec.items(paths or []), spec.rounds, seed)


class ShardWriter:
    """The shard being filled: the documents kept, why others were dropped, and the span of the
    source's order it covers; written when full, and once more at the end."""

    def __init__(self, corpus: Corpus, source: str, settings: dict, ctx: Context, start: int):
        self.corpus, self.source, self.settings, self.ctx = corpus, source, settings, ctx
        self.start = self.cursor = start
        self.seen, self.shards = corpus.seen(), []
        self.texts: list[str] = []
        self.tokens = 0
        self.dropped = {"duplicates": 0, "contaminated_paragraphs": 0, "short": 0}

    def offer(self, document) -> int:
        """Keep `document` (text, or a (head, body) pair) unless short or seen; its tokens, 0 if dropped."""
        head, body = document if isinstance(document, tuple) else ("", document)
        body = self.ctx.decontaminate.clean(body)[0]
        text = head + body
        key = doc_key(text)
        if len(body.split()) < self.ctx.min_words:
            self.dropped["short"] += 1
        elif key in self.seen:
            self.dropped["duplicates"] += 1
        else:
            self.seen.add(key)
            count = len(self.ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.texts.append(text)
            self.tokens += count
            return count
        return 0

    def flush(self) -> None:
        self.dropped["contaminated_paragraphs"] = self.ctx.decontaminate.dropped
        if self.texts:
            self.shards.append(self.corpus.add(self.source, self.texts, self.tokens, self.cursor,
                                               {**self.settings, "items": [self.start, self.cursor]}, self.dropped))
        self.texts, self.tokens, self.start = [], 0, self.cursor
        self.dropped = dict.fromkeys(self.dropped, 0)
        self.ctx.decontaminate.dropped = 0


def resolve(source: str | Source) -> Source:
    if isinstance(source, Source):
        return source
    if source not in SOURCES:
        raise CorpusError(f"unknown corpus source {source!r}: use one of {sorted(SOURCES)}")
    return SOURCES[source]


def grow(root: str | os.PathLike, source: str | Source, ctx: Context, *, tokens: int | None = None,
         seconds: float | None = None, shard_tokens: int = 50_000, seed: int = 0, batch: int | None = None,
         tokenizer_name: str | None = None, progress: bool = True, paths: list | None = None,
         held_out: list[str] | None = None) -> list[Shard]:
    """Add shards of `source` to the corpus at `root` until `tokens` more (or `seconds` pass, or the
    source runs out), continuing where the last shard of that source stopped. `batch` items are
    made at once (default: the source's own; a sampled source's throughput grows with it, measured
    1.7x from 16 to 64 chats on 2 CPU cores). `paths` replace where the source looks (`locate`);
    `held_out` replaces the texts never trained on (default: `evaluation_texts()`)."""
    spec = resolve(source)
    if tokens is None and seconds is None:
        raise CorpusError("say how much to add: --tokens N, --seconds T, or both")
    if batch is not None and batch < 1:
        raise CorpusError(f"--batch must be at least 1, not {batch}")
    if spec.needs_model and ctx.model is None:
        raise CorpusError(f"the {spec.name!r} source samples from a model: load one")
    items = source_order(spec, seed, locate(spec, paths))
    if not len(items):
        raise CorpusError(f"the {spec.name!r} source found nothing on this machine"
                          + (f": {spec.install}, then run again" if spec.install else ""))
    corpus = Corpus(root, tokenizer_name)
    corpus.tokenizer_name = corpus.tokenizer_name or tokenizer_name
    ctx.decontaminate = Decontaminator(evaluation_texts() if held_out is None else held_out)
    size = batch or spec.batch
    settings = {"seed": seed, "batch": size}
    if spec.needs_model:
        settings.update(model=tokenizer_name, sampler="inverse-cdf", max_new_tokens=ctx.max_new_tokens,
                        temperature=ctx.temperature, top_p=ctx.top_p, top_k=TOP_K)
    writer = ShardWriter(corpus, spec.name, settings, ctx, corpus.cursor(spec.name))
    added, deadline = 0, None if seconds is None else time.monotonic() + seconds
    # sampling is seeded per batch; the caller's random state is left as it was (training after it)
    with torch.random.fork_rng(), tqdm(total=tokens, unit="tok", desc=f"corpus: {spec.name}", disable=not progress,
                                       dynamic_ncols=True) as bar:
        while (writer.cursor < len(items) and (tokens is None or added < tokens)
               and (deadline is None or time.monotonic() < deadline)):
            chunk = items.take(writer.cursor, size)
            torch.manual_seed(seed * 1_000_003 + writer.cursor)  # sampling, reproducible per batch
            for document in spec.make(chunk, ctx):
                count = writer.offer(document)
                added += count
                bar.update(count)
            writer.cursor += len(chunk)
            if writer.tokens >= shard_tokens:
                writer.flush()
        writer.flush()
    return writer.shards


def grow_to(root: str | os.PathLike, source: str | Source, ctx: Context, target_tokens: int, **options) -> list[str]:
    """Grow the corpus at `root` by `source` until it holds `target_tokens` (or `seconds` in
    `options` pass), and return every document it holds in the order they were added."""
    have = Corpus(root).tokens
    if have < target_tokens:
        grow(root, source, ctx, tokens=target_tokens - have, **options)
    return list(Corpus(root).texts())
