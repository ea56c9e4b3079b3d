"""`books`: long, explanatory prose (unlike the terse reference of man and info pages): the HTML
books of Debian's documentation packages, as text without their navigation.

Each book is found wherever its package puts it, in whatever version is installed (the newest,
when several are); `--source-path` reads any other HTML pages or folders of them instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..source import Source, pack_paragraphs

DOC_ROOT = Path("/usr/share")
INSTALL = "apt-get install debian-handbook debian-reference-en postgresql-doc python3-doc"


@dataclass(frozen=True)
class Book:
    package: str  # what ships it
    folder: str  # its HTML folder under DOC_ROOT; a `*` stands for a version, and the newest is read
    pages: tuple[str, ...] = ("*.html",)


BOOKS = (
    Book("debian-handbook", "doc/debian-handbook/html/en-US"),
    Book("debian-reference-en", "debian-reference", ("*.en.html",)),
    Book("postgresql-doc", "doc/postgresql-doc-*/html"),
    Book("python3-doc", "doc/python3.*/html",
         tuple(f"{part}/*.html" for part in ("tutorial", "howto", "faq", "reference", "library", "using"))),
)


def version(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", str(path))]


def locate(root: Path | None = None) -> list[Path]:
    """The pages of every book installed under `root` (default `DOC_ROOT`)."""
    root = root or DOC_ROOT
    pages = []
    for book in BOOKS:
        folders = sorted((p for p in root.glob(book.folder) if p.is_dir()), key=version)
        if folders:
            pages += [p for pattern in book.pages for p in folders[-1].glob(pattern) if p.is_file()]
    return pages


def book_pages(paths: list[Path]) -> list[str]:
    """The HTML pages named, and those under folders named, sorted."""
    return sorted(str(p) for path in paths for p in (path.rglob("*.html") if path.is_dir() else [path])
                  if p.is_file())


class HTMLText(HTMLParser):
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
        parser = HTMLText()
        parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
        parser.close()
    except OSError:
        return []
    return pack_paragraphs(parser.text().split("\n\n"), max_chars)


SOURCE = Source("books", False, book_pages, lambda batch, ctx: [d for p in batch for d in render_html(p)], batch=8,
                install=INSTALL, locate=locate)
