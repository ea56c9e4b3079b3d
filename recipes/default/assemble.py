"""Put exits of two trained runs into one artifact (recipes/default/make.sh, stages v2 and v4).

    python recipes/default/assemble.py REST GROWN --take 15 --out DIR [--bf16]

Every exit of REST, except those named by --take, which come from GROWN (trained on the same base;
GROWN's balcony may have more layers, e.g. exit 15 grown to two). --bf16 stores the weights in
bf16, as `default` ships.
"""

import argparse

import torch

from balcony import BalconyModel

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rest")
    p.add_argument("grown")
    p.add_argument("--take", required=True, help="exits taken from GROWN, e.g. 15")
    p.add_argument("--out", required=True)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    take = {int(e) for e in args.take.split(",")}
    rest = BalconyModel.from_pretrained(args.rest)
    grown = BalconyModel.from_pretrained(args.grown, base=rest.base)
    layers = {e: (grown if e in take else rest).balcony_config.layers_at(e) for e in rest.exits}
    ship = BalconyModel.from_base(rest.base, exits=rest.exits, balcony_layers=layers, tokenizer=rest.tokenizer)
    for e in ship.exits:
        ship.balconies[str(e)].load_state_dict((grown if e in take else rest).balconies[str(e)].state_dict())
    ship.save_pretrained(args.out, dtype=torch.bfloat16 if args.bf16 else None)
