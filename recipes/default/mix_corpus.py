"""Mix JSONL corpora into one training file: whole documents, a token window of each, shuffled together.

    python recipes/default/mix_corpus.py --out OUT/data/mix.jsonl \\
        OUT/data/chat.jsonl OUT/data/docstrings-train.jsonl:skip=460000:take=60000

Each source is PATH[:skip=N][:take=M]: documents are taken in file order, the first N tokens'
worth skipped (e.g. what an earlier run already read) and then documents added until M tokens
(default: all). Tokens are counted with the default model's tokenizer. The documents of all
sources are then shuffled with --seed, so `balcony train`, which packs its data in file order,
sees the sources interleaved.
"""

from __future__ import annotations

import argparse
import json
import random


def read(spec: str, tokenizer) -> list[str]:
    path, *options = spec.split(":")
    opts = dict(o.split("=", 1) for o in options)
    skip, take = int(opts.get("skip", 0)), int(opts.get("take", 0)) or None
    seen, kept, taken = 0, [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            seen += n
            if seen <= skip:
                continue
            if take is not None and taken >= take:
                break
            kept.append(text)
            taken += n
    print(f"{path}: {len(kept)} documents, {taken:,} tokens (after skipping {skip:,})")
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="PATH[:skip=N][:take=M]")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from balcony.default import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    documents = [doc for spec in args.sources for doc in read(spec, tokenizer)]
    random.Random(args.seed).shuffle(documents)
    with open(args.out, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"{len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()
