"""Average two trained artifacts of the same balconies, weight by weight (a "model soup", as
WiSE-FT does for a fine-tuned model and its start): default-v5 is the mean of the
default-v4 balconies and their continuation on books (stage v5-books of recipes/default/make.sh),
which kept the continuation's gains on manual-like text without its loss on chat.

    python recipes/default/soup.py OUT/runs/v4 OUT/runs/v5-books --alpha 0.5 --out OUT/runs/v5
"""

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

from balcony.core.config import WEIGHTS_NAME, BalconyConfig

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("start", type=Path, help="the artifact continued from")
    p.add_argument("end", type=Path, help="its continuation")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of `end`: 0 is `start`, 1 is `end`")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    config = BalconyConfig.load(args.end)
    if BalconyConfig.load(args.start) != config:
        raise SystemExit(f"{args.start} and {args.end} hold balconies of different configurations: nothing to average")
    start, end = load_file(args.start / WEIGHTS_NAME), load_file(args.end / WEIGHTS_NAME)
    args.out.mkdir(parents=True, exist_ok=True)
    config.save(args.out)
    save_file({name: (start[name].float() * (1 - args.alpha) + w.float() * args.alpha).to(w.dtype).contiguous()
               for name, w in end.items()}, args.out / WEIGHTS_NAME)
    print(f"{args.out}: {1 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.end}")
