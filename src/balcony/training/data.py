"""Training text from any source, tokenized and packed into fixed-length sequences.

Sources, all behind `load_documents`:
* a plain text file, or a folder of them (each file is one document);
* a corpus folder grown by `balcony corpus` (`training.corpus`: shards with a manifest);
* JSONL: a `text` field per line, or chat `messages` rendered with the tokenizer's template;
* a Hugging Face `datasets` name or local path (streamed), for users who have one;
* `self`: text sampled from the frozen model itself, kept as a corpus folder in the user cache
  (`self_generated_corpus`, through `corpus.grow`). The teacher *is* the model, so this is
  honest data-free self-distillation; it is the default on the embedded model.
* `pydocs`: the docstrings of this Python's standard library and installed packages, plus the
  Python reference topics: millions of tokens of technical English that any machine with the
  set-up has, offline (the shipped default balconies were trained on it).

Documents are joined with EOS and cut into rows of `seq_len` tokens; the last rows of the
stream are held out for validation, so held-out text is never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import BalconyError
from .corpus import Context, Corpus, evaluation_texts, grow_to, held_out_prompts, prompt_source
from .corpus.sources.pydocs import python_docs_corpus

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".py", ".html", ".csv"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
SELF = "self"
SELF_ROUNDS = 10_000  # prompts asked afresh round after round: the self corpus grows as far as asked
PYDOCS = "pydocs"


class DataError(BalconyError, ValueError):
    """Training data that is missing, empty, malformed or too short."""


@dataclass
class PackedData:
    train: torch.Tensor  # [rows, seq_len] int64
    val: torch.Tensor  # [rows, seq_len] int64
    source: str

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for t in (self.train, self.val):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- documents


def load_documents(source: str, tokenizer=None, *, text_field: str = "text", split: str = "train",
                   corpus_sources: list[str] | None = None, corpus_shards: str | None = None,
                   **dataset_options) -> Iterator[str]:
    """Yield documents (strings) from a file, folder, JSONL file or `datasets` name.

    `corpus_sources` and `corpus_shards` (numbers, e.g. "93-97") pick shards of a corpus folder
    (`balcony corpus`); `dataset_options` go to
    `datasets.load_dataset` (e.g. `name=`, `data_files=`).
    """
    path = Path(source)
    if path.is_dir() and (path / "manifest.json").is_file():  # a corpus folder (`balcony corpus`)
        yield from Corpus(path).documents(sources=corpus_sources, shards=corpus_shards)
        return
    if corpus_sources is not None or corpus_shards is not None:
        picked = f"corpus sources ({', '.join(corpus_sources)})" if corpus_sources else f"corpus shards ({corpus_shards})"
        raise DataError(f"{picked} pick shards of a corpus folder made by `balcony corpus`; {source} is not one")
    if path.is_dir() and not _looks_like_hf_dataset_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
        if not files:
            raise DataError(f"{source} holds no text files ({', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))})")
        for file in files:
            yield from load_documents(str(file), tokenizer, text_field=text_field, split=split)
        return
    if path.is_file():
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, tokenizer, text_field)
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text ({err}); convert it or pass a JSONL file") from err
        return
    yield from _hf_documents(source, tokenizer, text_field=text_field, split=split, **dataset_options)


def _jsonl_documents(path: Path, tokenizer, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg}); each line must be one JSON object") from err
            yield _record_text(record, tokenizer, text_field, where=f"{path}:{number}")


def _record_text(record, tokenizer, text_field: str, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where} has chat `messages` but the tokenizer has no chat template to render them")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    raise DataError(f"{where} has neither a string field {text_field!r} nor a `messages` list")


def _looks_like_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _hf_documents(name: str, tokenizer, *, text_field: str, split: str, **options) -> Iterator[str]:
    path = Path(name)
    looks_like_a_path = path.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES or name.startswith((".", "/", "~"))
    if not path.exists() and looks_like_a_path:
        raise DataError(f"{name} not found: give an existing text file, folder or JSONL file, or a datasets name")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a file or folder here; to read it as a Hugging Face dataset, `pip install datasets`"
        ) from None
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split, streaming=True, **options)
    except Exception as err:  # datasets raises many kinds; the user needs the name and the cause
        raise DataError(f"could not open dataset {name!r} (split {split!r}): {err}") from err
    for i, record in enumerate(dataset):
        yield _record_text(record, tokenizer, text_field, where=f"{name}[{i}]")


# ----------------------------------------------------------------------------- packing


def pack(
    documents: Iterable[str],
    tokenizer,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    val_fraction: float = 0.05,
    source: str = "",
    skip_tokens: int = 0,
) -> PackedData:
    """Tokenize, join with EOS, cut into `seq_len` rows; the last rows become the held-out split.
    `skip_tokens` drops the stream's first tokens (what an earlier run on the same source read)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    stream: list[int] = []
    batch: list[str] = []

    def flush():
        if batch:
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if ids:
                    stream.extend(ids)
                    stream.append(eos)
            batch.clear()

    for doc in documents:
        if doc and doc.strip():
            batch.append(doc)
        if len(batch) >= 64:
            flush()
            if max_tokens is not None and len(stream) >= skip_tokens + max_tokens:
                break
    flush()
    if skip_tokens:
        if len(stream) <= skip_tokens:
            raise DataError(f"{source or 'the data'} holds {len(stream)} tokens, all of them within --skip-tokens "
                            f"{skip_tokens}: skip fewer, or add text")
        del stream[:skip_tokens]
    if max_tokens is not None:
        stream = stream[:max_tokens]
    rows = len(stream) // seq_len
    needed = 2 if val_fraction > 0 else 1
    if rows < needed:
        what = "(one training and one held-out sequence)" if needed == 2 else "(one full sequence)"
        raise DataError(
            f"{source or 'the data'} gives {len(stream)} tokens: at least {needed} x seq_len = {needed * seq_len} "
            f"are needed {what}. Add text or lower --seq-len."
        )
    data = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
    n_val = min(rows - 1, max(1, round(rows * val_fraction))) if val_fraction > 0 else 0
    return PackedData(train=data[: rows - n_val].clone(), val=data[rows - n_val :].clone(), source=source)


def build_dataset(
    source: str,
    tokenizer,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    val_fraction: float = 0.05,
    model=None,
    text_field: str = "text",
    split: str = "train",
    corpus_sources: list[str] | None = None,
    corpus_shards: str | None = None,
    skip_tokens: int = 0,
) -> PackedData:
    """Any supported source -> PackedData. `self` (or `self:TOKENS`) samples from `model`."""
    if tokenizer is None:
        raise DataError("training on text needs a tokenizer; this base has none (save one beside the model)")
    if source == SELF or source.startswith(SELF + ":"):
        if model is None:
            raise DataError("the `self` corpus samples from the model; pass the model")
        target = int(source.split(":", 1)[1]) if ":" in source else (max_tokens or 200_000)
        documents = self_generated_corpus(model, tokenizer, target_tokens=int((target + skip_tokens) * 1.05) + 2 * seq_len)
    elif source == PYDOCS:
        documents = _jsonl_documents(python_docs_corpus(), tokenizer, "text")
    else:
        documents = load_documents(source, tokenizer, text_field=text_field, split=split, corpus_sources=corpus_sources,
                                   corpus_shards=corpus_shards)
    return pack(documents, tokenizer, seq_len, max_tokens=max_tokens, val_fraction=val_fraction, source=source,
                skip_tokens=skip_tokens)


# ----------------------------------------------------------------------------- the self-generated corpus


def self_corpus_path(model) -> Path:
    """Where `--data self` keeps this model's samples: a corpus folder in the user cache."""
    from ..default import cache_root

    return cache_root() / "corpus" / f"self-{model_fingerprint(model)}"


def model_fingerprint(model) -> str:
    # a BalconyModel records its base's; a LayerSkipModel its original's (the same teacher: the same corpus)
    found = getattr(getattr(model, "balcony_config", None), "base_fingerprint", None)
    return found or getattr(model, "base_fingerprint", None) or "model"


def self_generated_corpus(
    model,
    tokenizer,
    *,
    target_tokens: int,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 1234,
    path: Path | None = None,
    prompts: list[str] | None = None,
    seconds: float | None = None,
    min_words: int | None = None,
    held_out: list[str] | None = None,
) -> list[str]:
    """Sample documents from the full (frozen) model until `target_tokens`, kept as a corpus folder.

    The same machinery as `balcony corpus --source chat` (`corpus.grow`): a later, larger request
    only samples what is missing, an interrupted run keeps its finished shards, and answers that
    repeat, run under `min_words` words (default 1: every answer is kept, short ones too) or share a run of words with a held-out text are dropped.
    `prompts` replaces the built-in prompt list (the held-out text's templates and topics, each
    asked afresh round after round); each document is a prompt in the chat template plus the
    model's answer. `path` is the corpus folder to grow (default: this model's `self` corpus in
    the user cache). `seconds` stops sampling after that long (at a batch boundary), however few
    tokens were made. `held_out`: the texts never to sample (default: the shipped held-out texts).
    """
    root = Path(path) if path is not None else self_corpus_path(model)
    source = prompt_source("self", list(prompts) if prompts else held_out_prompts(), rounds=SELF_ROUNDS)
    ctx = Context(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  min_words=1 if min_words is None else min_words)
    return grow_to(root, source, ctx, target_tokens, seconds=seconds, seed=seed, batch=batch_size,
                   tokenizer_name=model_fingerprint(model) if path is None else None,
                   held_out=evaluation_texts(files=None) if held_out is None else held_out)
