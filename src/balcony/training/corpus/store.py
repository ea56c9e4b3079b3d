"""A corpus folder: `manifest.json` and its gzipped JSONL shards, checked by sha256 on every read."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...core.errors import BalconyError

FORMAT = "balcony-corpus/1"
MANIFEST = "manifest.json"


class CorpusError(BalconyError):
    """A corpus folder that is damaged, or a request it cannot serve."""


@dataclass
class Shard:
    file: str  # relative to the corpus folder
    source: str
    documents: int
    tokens: int
    sha256: str
    cursor: int  # where in the source's order the next shard of this source starts
    settings: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # duplicates / contaminated paragraphs / too short
    created: str = ""


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def doc_key(text: str) -> str:
    """What two documents share when they differ only in case and spacing."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Corpus:
    """A corpus folder: its manifest, its shards, and what it has seen."""

    def __init__(self, root: str | os.PathLike, tokenizer_name: str | None = None):
        self.root = Path(root)
        path = self.root / MANIFEST
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path} is not valid JSON ({err}); restore it from version control") from err
            if manifest.get("format") != FORMAT:
                raise CorpusError(f"{path} is not a balcony corpus manifest ({FORMAT})")
            self.tokenizer_name = manifest.get("tokenizer")
            self.shards = [Shard(**s) for s in manifest["shards"]]
        else:
            self.tokenizer_name, self.shards = tokenizer_name, []
        if tokenizer_name and self.tokenizer_name and tokenizer_name != self.tokenizer_name:
            raise CorpusError(f"{self.root} counts tokens with {self.tokenizer_name!r}, not {tokenizer_name!r}: "
                              "grow it with the same model, or start another folder")
        self._seen: set[str] | None = None

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def summary(self) -> dict:
        by_source: dict = {}
        for number, s in enumerate(self.shards):
            row = by_source.setdefault(s.source, {"shards": 0, "documents": 0, "tokens": 0, "numbers": []})
            row["shards"] += 1
            row["documents"] += s.documents
            row["tokens"] += s.tokens
            row["numbers"].append(number)
        for row in by_source.values():  # what `train --corpus-shards` takes, e.g. "4-9,86-97"
            row["numbers"] = ranges(row["numbers"])
        return {"root": str(self.root), "tokenizer": self.tokenizer_name, "tokens": self.tokens, "sources": by_source}

    def cursor(self, source: str) -> int:
        return next((s.cursor for s in reversed(self.shards) if s.source == source), 0)

    def read(self, shard: Shard) -> list[str]:
        """A shard's documents, after checking its sha256 against the manifest."""
        path = self.root / shard.file
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CorpusError(f"{path} is missing ({err}): restore the corpus folder, or remove the shard "
                              "from manifest.json") from err
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise CorpusError(f"{path} does not match its sha256 in the manifest: the file is damaged; restore it")
        return [json.loads(line)["text"] for line in gzip.decompress(data).decode("utf-8").splitlines() if line]

    def texts(self) -> Iterator[str]:
        """Every document in the order it was added: a stream that only grows at its end, so a
        run can skip what an earlier one read."""
        for shard in self.shards:
            yield from self.read(shard)

    def documents(self, seed: int = 0, sources: list[str] | None = None, shards: str | None = None) -> Iterator[str]:
        """Every document (of `sources` only, and of the `shards` numbered, when given), in a seeded
        shuffled order: sources mix through the stream, so a run that reads only part of the corpus,
        and the held-out tail of a packed stream, see every source."""
        present = sorted({s.source for s in self.shards})
        if sources is not None and (missing := sorted(set(sources) - set(present))):
            raise CorpusError(f"{self.root} has no {', '.join(missing)} shards (it holds {', '.join(present) or 'none'}); "
                              f"grow it with `balcony corpus {self.root} --source {missing[0]}` or name others")
        numbers = self.numbers(shards) if shards is not None else range(len(self.shards))
        picked = [self.shards[i] for i in numbers if sources is None or self.shards[i].source in sources]
        if not picked:
            raise CorpusError(f"shards {shards} of {self.root} hold none of {', '.join(sources or [])}; "
                              f"`balcony corpus {self.root}` lists which shards each source has")
        texts = [text for shard in picked for text in self.read(shard)]
        random.Random(seed).shuffle(texts)
        yield from texts

    def numbers(self, spec: str) -> list[int]:
        """Shard numbers from e.g. "93-97", "93-" (93 to the last: what a corpus grew since) or "0,5,7-9"."""
        last = len(self.shards) - 1
        picked: set[int] = set()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, dash, hi = part.partition("-")
            try:
                first, end = int(lo), (int(hi) if hi else last) if dash else int(lo)
            except ValueError:
                raise CorpusError(f"shards {spec!r}: {part!r} is not a number or range (e.g. 93-97, 93-, 0,5,7-9)") from None
            if not 0 <= first <= end <= last:
                raise CorpusError(f"shards {spec!r}: {part!r} is outside {self.root}'s shards 0-{last}")
            picked.update(range(first, end + 1))
        if not picked:
            raise CorpusError(f"shards {spec!r} names no shard; give numbers or ranges, e.g. 93-97")
        return sorted(picked)

    def seen(self) -> set[str]:
        if self._seen is None:
            self._seen = {doc_key(text) for text in self.texts()}
        return self._seen

    def add(self, source: str, texts: list[str], tokens: int, cursor: int, settings: dict, dropped: dict) -> Shard:
        """Write one shard (to a temporary name, then renamed) and then the manifest."""
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        name = f"shards/{len(self.shards):05d}-{source}.jsonl.gz"
        payload = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
        data = gzip.compress(payload, compresslevel=9, mtime=0)  # mtime 0: the same text, the same bytes
        atomic_write(self.root / name, data)
        shard = Shard(file=name, source=source, documents=len(texts), tokens=tokens,
                      sha256=hashlib.sha256(data).hexdigest(), cursor=cursor, settings=settings, dropped=dropped,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.shards.append(shard)
        manifest = {"format": FORMAT, "tokenizer": self.tokenizer_name, "shards": [asdict(s) for s in self.shards]}
        atomic_write(self.root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        self.seen().update(doc_key(t) for t in texts)
        return shard
