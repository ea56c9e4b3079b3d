"""One corpus stage of recipes/default/make.sh: grow a corpus folder by one source until the stage
has added TOKENS, resuming an interrupted stage, and print the shard numbers it added.

    python recipes/default/corpus_stage.py CORPUS SOURCE TOKENS STATE [balcony corpus options...]

`balcony corpus --tokens N` adds N more tokens every time it runs, and a run that is interrupted
keeps the shards it finished. So the stage remembers, in STATE (JSON), how many shards the corpus
held and how many tokens of SOURCE it had when the stage began; a rerun asks only for what is
still missing. A source that runs out of items (man, info, books, bible are finite) ends the
stage with what it has. The last line printed is the stage's shard numbers, e.g. `26-36`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def census(corpus: Path, source: str) -> tuple[int, int]:
    """(shards in the corpus, tokens of `source`) from its manifest; (0, 0) for a new folder."""
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        return 0, 0
    shards = json.loads(manifest.read_text())["shards"]
    return len(shards), sum(s["tokens"] for s in shards if s["source"] == source)


def main(argv: list[str]) -> int:
    corpus, source, tokens, state_path, *options = argv
    corpus, tokens, state_path = Path(corpus), int(tokens), Path(state_path)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
    else:
        shards, have = census(corpus, source)
        state = {"source": source, "first_shard": shards, "tokens_before": have, "tokens": tokens}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state) + "\n")
    shards, have = census(corpus, source)
    added = have - state["tokens_before"]
    missing = tokens - added
    if missing > 0.01 * tokens:  # within 1%: a shard boundary, not worth another run
        print(f"corpus stage {source}: {added:,} of {tokens:,} tokens there, adding {missing:,}", flush=True)
        command = [sys.executable, "-m", "balcony", "corpus", str(corpus), "--source", source,
                   "--tokens", str(missing), *options]
        done = subprocess.run(command)
        if done.returncode:
            return done.returncode
        shards, have = census(corpus, source)
    if shards <= state["first_shard"]:
        print(f"corpus stage {source}: no shards added", file=sys.stderr)
        return 1
    print(f"corpus stage {source}: {have - state['tokens_before']:,} tokens in shards "
          f"{state['first_shard']}-{shards - 1}")
    print(f"{state['first_shard']}-{shards - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
