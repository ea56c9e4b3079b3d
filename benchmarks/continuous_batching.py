"""transformers' own continuous batching (paged KV cache, `generate_batch`) on exit models, beside
the padded static batches of a plain batched `generate`.

    python benchmarks/continuous_batching.py --requests 32 --new-tokens 32 --exits full,15

For each target (the full model, or an exit model, which is an ordinary transformers model of
the base's class): greedy decoding of the same chat prompts (the shipped held-out text's
opening turns) through (a) `model.generate_batch` (continuous batching, paged attention, one
call; its manager's start-up timed apart), (b) left-padded static batches of `--batch-size`
through `generate` (the current engine's way), (c) one request at a time on a few prompts.
Prints output tokens/s and whether (a) and (b) give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--exits", default="full,15")
    parser.add_argument("--single", type=int, default=4, help="requests timed one at a time (scaled up)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import GenerationConfig

    from balcony import BalconyModel
    from balcony.default import heldout_prompts

    model = BalconyModel.from_pretrained("default")
    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in heldout_prompts(args.requests)]
    n = args.new_tokens
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=-1,
                              pad_token_id=tok.pad_token_id)
    rows = []
    for target in args.exits.split(","):
        sub = model.exit_model(None if target == "full" else int(target))
        start = time.perf_counter()
        out = sub.generate_batch(prompts, generation_config=config)
        continuous = time.perf_counter() - start
        cb_tokens = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
        start = time.perf_counter()
        padded_tokens = []
        side, tok.padding_side = tok.padding_side, "left"
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i:i + args.batch_size]
            batch = tok.pad({"input_ids": chunk}, return_tensors="pt")
            gen = sub.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            padded_tokens += gen[:, batch["input_ids"].shape[1]:].tolist()
        tok.padding_side = side
        padded = time.perf_counter() - start
        start = time.perf_counter()
        for ids in prompts[:args.single]:
            sub.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
        single = (time.perf_counter() - start) * len(prompts) / args.single
        total = len(prompts) * n
        same = sum(a == b for a, b in zip(cb_tokens, padded_tokens))
        rows.append({"target": target, "continuous_tok_s": total / continuous, "padded_tok_s": total / padded,
                     "one_at_a_time_tok_s": total / single, "same_tokens": f"{same}/{len(prompts)}"})
        print(f"{target:>5}: continuous (generate_batch) {total / continuous:6.1f} tok/s | padded batches of "
              f"{args.batch_size} {total / padded:6.1f} tok/s | one at a time {total / single:6.1f} tok/s | "
              f"same greedy tokens {same}/{len(prompts)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
