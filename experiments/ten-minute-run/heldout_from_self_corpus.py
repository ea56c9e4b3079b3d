"""Write the self-corpus documents that a training run never read, as held-out JSONL.

    python experiments/ten-minute-run/heldout_from_self_corpus.py --skip-tokens 175000 --out heldout.jsonl

`balcony train --data self` reads its cached corpus folder from its start, in the order the
documents were sampled, until its token budget (163K tokens for experiments/ten-minute-run/run.sh);
documents after --skip-tokens played no part in it.
"""

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tokens", type=int, default=175_000)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from balcony.default import cache_root, default_model_path
    from balcony.training.corpus import Corpus

    corpora = sorted(p for p in (cache_root() / "corpus").glob("self-*") if Corpus.exists(p))
    if not corpora:
        raise SystemExit("no self corpus cached yet: run `balcony train --data self ...` first")
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    seen, kept = 0, []
    for text in Corpus(corpora[0]).texts():
        if seen > args.skip_tokens:
            kept.append(text)
        seen += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the EOS that packing adds
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": text}) + "\n" for text in kept))
    print(f"{len(kept)} documents after the first {args.skip_tokens:,} tokens -> {args.out}")


if __name__ == "__main__":
    main()
