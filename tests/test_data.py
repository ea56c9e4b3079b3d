"""Data sources, packing, the held-out split and clear errors on bad data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_base, tiny_tokenizer, write_corpus

from balcony import BalconyModel
from balcony.core.errors import BalconyError
from balcony.training.corpus import Corpus
from balcony.training.data import DataError, build_dataset, load_documents, pack, self_generated_corpus


@pytest.fixture()
def tok():
    return tiny_tokenizer()


def test_text_file_is_packed_with_eos_and_a_held_out_tail(tmp_path, tok):
    path = write_corpus(tmp_path / "a.txt", documents=30)
    data = build_dataset(str(path), tok, 16, val_fraction=0.2)
    assert data.train.shape[1] == data.val.shape[1] == 16
    assert data.val.shape[0] == round((data.train.shape[0] + data.val.shape[0]) * 0.2)
    stream = tok(path.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = torch.cat([data.train.reshape(-1), data.val.reshape(-1)]).tolist()
    assert flat == stream[: len(flat)]  # the held-out rows are the tail of the stream, never trained on


def test_folder_jsonl_and_chat_sources(tmp_path, tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "one.txt").write_text("Hello there.")
    (folder / "two.md").write_text("General Kenobi.")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    assert list(load_documents(str(folder), tok)) == ["Hello there.", "General Kenobi."]

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "plain text"}) + "\n\n" + json.dumps({"body": "other field"}) + "\n")
    assert next(iter(load_documents(str(jsonl), tok, text_field="text"))) == "plain text"
    with pytest.raises(DataError, match="neither a string field 'text'"):
        list(load_documents(str(jsonl), tok))
    with pytest.raises(DataError, match="d.jsonl:1"):
        list(load_documents(str(jsonl), tok, text_field="body"))

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    assert list(load_documents(str(chat), tok)) == ["user: hi\nassistant: yo\n"]


def test_bad_data_gives_clear_errors_before_any_work(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="0 tokens"):
        build_dataset(str(empty), tok, 16)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="lower --seq-len"):
        build_dataset(str(short), tok, 16)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2 is not valid JSON"):
        build_dataset(str(broken), tok, 16)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        build_dataset(str(empty_dir), tok, 16)
    with pytest.raises(DataError, match="datasets"):
        build_dataset(str(tmp_path / "no-such-file.txt"), tok, 16)


def test_max_tokens_bounds_the_data(tmp_path, tok):
    path = write_corpus(tmp_path / "a.txt", documents=200)
    data = pack(load_documents(str(path), tok), tok, 16, max_tokens=160)
    assert data.train.numel() + data.val.numel() == 160


def test_skip_tokens_continues_where_an_earlier_run_stopped(tmp_path, tok):
    path = write_corpus(tmp_path / "a.txt", documents=200)
    whole = pack(load_documents(str(path), tok), tok, 16, max_tokens=320, val_fraction=0.0).train.reshape(-1)
    later = pack(load_documents(str(path), tok), tok, 16, max_tokens=160, val_fraction=0.0, skip_tokens=160)
    assert torch.equal(later.train.reshape(-1), whole[160:])
    with pytest.raises(DataError, match="skip-tokens"):
        pack(load_documents(str(path), tok), tok, 16, skip_tokens=10**7)


def test_self_generated_corpus_is_sampled_once_and_cached(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    model = BalconyModel.from_base(tiny_base("llama"), exits=[3], tokenizer=tok)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    data = build_dataset("self:300", tok, 16, model=model)
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling leaves the training seed alone
    assert data.train.shape[0] >= 1 and data.val.shape[0] >= 1
    (cached,) = (tmp_path / "cache" / "corpus").iterdir()  # a corpus folder, as `balcony corpus` grows
    held = Corpus(cached)
    assert {s.source for s in held.shards} == {"self"} and held.tokens >= 300
    assert all("assistant:" in text for text in held.texts())  # chat-formatted samples
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1))
    again = build_dataset("self:300", tok, 16, model=model)
    assert not calls and torch.equal(again.train, data.train)
    more = self_generated_corpus(model.base, tok, target_tokens=held.tokens + 100, batch_size=4, max_new_tokens=16,
                                 min_words=1, path=cached)
    assert more[: len(list(held.texts()))] == list(held.texts())  # grown at its end: --skip-tokens still holds
    assert len(Corpus(cached).shards) > len(held.shards) and Corpus(cached).cursor("self") > held.cursor("self")


def test_self_generated_corpus_to_a_folder_of_its_own_with_own_prompts(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    model = BalconyModel.from_base(tiny_base("llama"), exits=[3], tokenizer=tok)
    out = tmp_path / "mine" / "chat"
    documents = self_generated_corpus(model, tok, target_tokens=60, batch_size=2, max_new_tokens=8, path=out,
                                      prompts=["Tell me about owls."], min_words=1)
    assert documents and all("Tell me about owls." in d for d in documents)
    assert sum(s.documents for s in Corpus(out).shards) == len(documents)
    assert not (tmp_path / "cache" / "corpus").exists()  # the user's own self corpus is untouched


def test_self_data_and_the_chat_source_are_one_sampling_pipeline(tmp_path, monkeypatch, tok):
    """`train --data self` and `corpus --source chat` draw through the same sampler into the same
    kind of folder, and both resume from their manifest's cursor."""
    from balcony.training.corpus import Context, grow, prompt_lists
    from balcony.training.corpus.sources import chat

    asked = []

    def fake_answers(model, tokenizer, messages, **options):
        asked.append((len(messages), options))
        return [(f"user: {m}\nassistant:", " ".join(f"word{i}" for i in range(50))) for m in messages]

    monkeypatch.setattr(chat, "sample_answers", fake_answers)
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    model = BalconyModel.from_base(tiny_base("llama"), exits=[3], tokenizer=tok)
    build_dataset("self:2000", tok, 16, model=model)
    grow(tmp_path / "chat", "chat", Context(model, tok, max_new_tokens=256), tokens=2000, tokenizer_name="tiny",
         held_out=[], progress=False)
    self_options, chat_options = asked[0][1], asked[-1][1]
    assert self_options == chat_options == {"max_new_tokens": 256, "temperature": 1.0, "top_p": 0.95}
    (self_root,) = (tmp_path / "cache" / "corpus").iterdir()
    sampled = [Corpus(self_root).shards[-1], Corpus(tmp_path / "chat").shards[-1]]
    assert sampled[0].settings.keys() == sampled[1].settings.keys()  # the same record of how it was sampled
    assert [s.source for s in sampled] == ["self", "chat"]
    held_out = [t.lower() for t in prompt_lists()["held_out_topics"]]
    assert all(any(topic in t.lower() for topic in held_out) for t in Corpus(self_root).texts())  # their topics


def test_hugging_face_dataset_saved_on_disk(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    texts = [f"Document number {i}. " + "Some words follow here. " * 3 for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "ds"))
    data = build_dataset(str(tmp_path / "ds"), tok, 32)
    flat = data.train.reshape(-1).tolist()
    assert flat[: len("Document number 0")] == tok("Document number 0", add_special_tokens=False)["input_ids"]
    # a local dataset-loading script / data files folder through load_dataset (streaming)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "part.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in texts))
    streamed = list(load_documents("json", tok, text_field="content", split="train",
                                   data_files=str(tmp_path / "jsonl" / "part.jsonl")))
    assert streamed == texts


def test_pydocs_corpus_reads_docstrings_once_in_a_fixed_order(tmp_path, monkeypatch, tok):
    from balcony.training.data import python_docs_corpus

    source = tmp_path / "site"
    long_doc = "This function explains a thing in plenty of words. " * 8
    for i in range(6):
        body = "".join(f'def f{j}():\n    """{long_doc} ({i}, {j})"""\n\n' for j in range(6))
        (source / f"pkg{i}").mkdir(parents=True)
        (source / f"pkg{i}" / "mod.py").write_text(f'"""Module {i}: {long_doc}"""\n\n' + body)
    (source / "tests").mkdir()
    (source / "tests" / "test_x.py").write_text(f'"""{long_doc} FIXTURE"""\n')  # test folders are skipped
    (source / "broken.py").write_text("def (:\n")  # unparsable files are skipped, not fatal
    first = python_docs_corpus(tmp_path / "a.jsonl", roots=[source])
    second = python_docs_corpus(tmp_path / "b.jsonl", roots=[source])
    assert first.read_text() == second.read_text()
    texts = [json.loads(line)["text"] for line in first.read_text().splitlines()]
    assert len([t for t in texts if t.startswith("Module")]) == 6 and not any("FIXTURE" in t for t in texts)
    kept_out = python_docs_corpus(tmp_path / "d.jsonl", roots=[source], exclude=[source / "pkg0", source / "pkg3"])
    kept = {json.loads(line)["text"].split(":")[0] for line in kept_out.read_text().splitlines()}
    assert kept == {"Module 1", "Module 2", "Module 4", "Module 5"}  # held-out packages stay out
    with pytest.raises(BalconyError, match="no docstrings"):
        python_docs_corpus(tmp_path / "c.jsonl", roots=[tmp_path / "empty"])
    # as a training source, built once into the cache
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("balcony.training.data.python_docs_corpus", lambda: first)
    data = build_dataset("pydocs", tok, 16)
    assert data.train.shape[0] > 10
