"""Write the self-corpus documents that a training run never read, as held-out JSONL.

    python recipes/heldout_from_self_corpus.py --skip-tokens 175000 --out heldout.jsonl

`balcony train --data self` reads the cached corpus from its start until its token budget
(163K tokens for recipes/smollm2-10min.sh); documents after --skip-tokens played no part in it.
"""

import argparse
import json

from balcony.default import cache_root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tokens", type=int, default=175_000)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    corpora = sorted((cache_root() / "corpus").glob("self-*.jsonl"))
    if not corpora:
        raise SystemExit("no self corpus cached yet: run `balcony train --data self ...` first")
    seen, kept = 0, []
    for line in corpora[0].read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if seen > args.skip_tokens:
            kept.append(line)
        seen += record["tokens"] + 1  # + the EOS that packing adds
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
    print(f"{len(kept)} documents after the first {args.skip_tokens:,} tokens -> {args.out}")


if __name__ == "__main__":
    main()
