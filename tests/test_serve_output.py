"""Output processing: the incremental detokenizer's deltas are exactly the whole decode, cut at the
first stop string, for any tokens (characters split over tokens, bytes that never decode, special
tokens), and each token costs a bounded amount of decoding whatever the length."""

from __future__ import annotations

import threading

import pytest
from conftest import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balcony.serving.job import Job
from balcony.serving.output import MAX_PENDING, Output

TEXTS = ["héllo wörld, ça va? 日本語のテキスト", "emoji 🎉🙂👍🏽 and flags 🇫🇷", "Ελληνικά, русский, עברית, العربية",
         "plain ascii text with spaces and numbers 42", "mixed: naïve café résumé — “quotes” …"]
PIECES = st.sampled_from([*"ab é日🎉👍🏽\n.", "🇫🇷", "ça", "ö"])  # multi-byte, and characters of several code points


def texts(min_size=0, max_size=40):
    return st.lists(PIECES, min_size=min_size, max_size=max_size).map("".join)


def byte_level_tokenizer():
    """A small byte-level BPE (GPT-2's kind): multi-byte characters are split over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def default_tokenizer():
    """SmolLM2's own tokenizer, when its converted copy is in the cache (nothing is converted here)."""
    from transformers import AutoTokenizer

    from balcony.default import cache_root

    folder = next((p.parent for p in cache_root().glob("smollm2*/tokenizer.json")), None)
    return AutoTokenizer.from_pretrained(folder) if folder is not None else None


TOKENIZERS = {"char": tiny_tokenizer(), "byte-bpe": byte_level_tokenizer(), "smollm2": default_tokenizer()}
TOKENIZERS = {name: t for name, t in TOKENIZERS.items() if t is not None}


def byte_ids(tokenizer) -> dict[int, int] | None:
    """For a byte-level tokenizer: the token ids of the bytes 0x80-0xF4 that it has (continuation and
    lead bytes: runs of them decode late, or never); None for other tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}  # GPT-2's map
    vocab = tokenizer.get_vocab()
    high = {b: vocab[chars[b]] for b in range(0x80, 0xF5) if chars[b] in vocab}
    return high if len(high) > 100 else None


BYTES = {name: byte_ids(t) for name, t in TOKENIZERS.items()}


class Counting:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def decode(self, ids, **kwargs):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def run(tokenizer, tokens, stops, logprobs=None):
    """Feed the tokens one by one as the engine does; the deltas, the job."""
    deltas = []
    job = Job([1], max(1, len(tokens)), None, stop=stops, logprobs=logprobs,
              emit=lambda kind, payload: deltas.append(payload) if kind == "delta" else None)
    output = Output(tokenizer, threading.Lock(), eos=set())
    for token in tokens:
        output.advance(job, token, None if logprobs is None else (0.0, []))
        if job.finished:
            break
    if not job.finished:
        output.finish(job, "length")
    return deltas, job


def cut_at_first_stop(text, stops):
    """The text before the first stop string to complete, reading it one character at a time."""
    for end in range(1, len(text) + 1):
        for stop in sorted((s for s in stops if s), key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end - len(stop)], True
    return text, False


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(TOKENIZERS)))
    tokenizer = TOKENIZERS[name]
    vocab = len(tokenizer)
    if draw(st.booleans()):
        text = draw(texts())
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokens and draw(st.booleans()):  # random tokens spliced in: unfinished bytes, specials
            at = draw(st.integers(0, len(tokens)))
            tokens[at:at] = draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    elif BYTES[name] and draw(st.booleans()):  # raw bytes: characters split, unfinished, invalid
        high = st.sampled_from(sorted(BYTES[name].values()))
        tokens = draw(st.lists(high | st.integers(0, vocab - 1) | high, max_size=60))
    else:
        tokens = draw(st.lists(st.integers(0, vocab - 1), max_size=60))
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    pieces = [full[i:j] for i in range(len(full)) for j in range(i + 1, min(len(full), i + 4) + 1)]
    stop = st.sampled_from(pieces) if pieces else texts(1, 3)
    stops = draw(st.lists(stop | texts(1, 3), max_size=3))
    if stops and len(stops[0]) > 1 and draw(st.booleans()):
        stops.append(stops[0][1:])  # one stop string ending another: both complete at one character
    return name, tokens, stops


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_deltas_are_the_whole_decode_cut_at_the_first_stop(case):
    name, tokens, stops = case
    tokenizer = TOKENIZERS[name]
    deltas, job = run(tokenizer, tokens, stops)
    expected, stopped = cut_at_first_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    assert "".join(text for text, _ in deltas) == job.text == expected
    assert all(text for text, _ in deltas)  # no empty deltas without logprobs to carry
    covered = [upto for _, upto in deltas]
    assert covered == sorted(covered) and all(upto <= len(job.tokens) for upto in covered)
    if stopped:
        assert not any(stop in text for text, _ in deltas for stop in stops)


def test_a_stop_string_spanning_tokens_and_characters_split_over_tokens():
    tokenizer = TOKENIZERS["byte-bpe"]
    tokens = tokenizer("ça va 🎉🎉 ok", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokens[:1]).endswith("\ufffd") or any(
        tokenizer.decode([t]).endswith("\ufffd") for t in tokens)  # some character is split
    deltas, job = run(tokenizer, tokens, ["🎉 o"])
    assert job.text == "ça va 🎉" and "\ufffd" not in "".join(t for t, _ in deltas)
    assert job.decoding.stopped
    # a stop string that never completes holds nothing back for good
    _, job = run(tokenizer, tokens, ["va 🎉🎉 no"])
    assert job.text == "ça va 🎉🎉 ok"


def test_a_character_still_open_when_the_window_gives_up_on_undecodable_bytes():
    ids = BYTES["byte-bpe"]
    # lead bytes that each break the one before, then an emoji's four bytes: the wait for a finished
    # character runs out at its second byte, which must not cut the emoji
    tokens = [ids[0xC3]] * (MAX_PENDING - 1) + [ids[b] for b in "😀".encode()]
    deltas, job = run(TOKENIZERS["byte-bpe"], tokens, [])
    assert job.text == "\ufffd" * (MAX_PENDING - 1) + "😀" == TOKENIZERS["byte-bpe"].decode(tokens)
    assert len(deltas) >= 2  # the broken bytes went out before the end


def test_of_two_stop_strings_ending_at_one_character_the_longer_cuts():
    _, job = run(TOKENIZERS["char"], TOKENIZERS["char"]("xabcd")["input_ids"], ["bc", "abc", "abcd"])
    assert job.text == "x" and job.decoding.stopped


def test_the_last_delta_carries_the_tokens_whose_text_was_held_back():
    tokenizer = TOKENIZERS["byte-bpe"]
    tokens = tokenizer("ab 🎉", add_special_tokens=False)["input_ids"]
    deltas, job = run(tokenizer, tokens, ["🎉"], logprobs=0)
    assert job.text == "ab " and deltas[-1][1] == len(job.tokens)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_the_decoding_work_per_token_does_not_grow_with_the_length(name):
    tokenizer = TOKENIZERS[name]
    text = " ".join(TEXTS) * 12
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    garbage = [(7 * i) % len(tokenizer) for i in range(300)]  # any ids
    if BYTES[name]:  # and bytes that never decode: a long run of lead bytes
        leads = [i for b, i in BYTES[name].items() if b >= 0xC2][:4]
        garbage += [leads[i % len(leads)] for i in range(100)]
    for sequence in (tokens, garbage + tokens):
        counting = Counting(tokenizer)
        _, job = run(counting, sequence, [])
        assert job.text == tokenizer.decode(sequence, skip_special_tokens=True)
        n = len(sequence)
        assert n > 500 and max(counting.calls) <= 2 * MAX_PENDING + 2  # a window, not the whole output
        assert sum(counting.calls) <= 8 * n  # the whole output decoded each time would be ~n^2 / 2
