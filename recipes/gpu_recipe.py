"""One GPU, a few minutes: sample a large self corpus, train balconies on it, write the artifact.

For any base balcony supports, on one machine with a GPU (it runs on a CPU too, slowly: the test
does, with a tiny model). Nothing here is installed or downloaded beyond what loading the base
does, and every step is time-boxed (`--sample-seconds`, `--train-seconds`), so a run's length is
known before it starts. Nothing else in balcony depends on this script.

    # from the repository root (or anywhere balcony is installed):
    python recipes/gpu_recipe.py --base default --init-from default --corpus recipes/corpus \
        --out runs/gpu --sample-seconds 150 --train-seconds 270
    python recipes/gpu_recipe.py --base HuggingFaceTB/SmolLM2-360M-Instruct --exits 16,24 --out runs/gpu360

Steps:
1. the base, `--base`: a named base (`default`, `gemma3-270m`: see `balcony.default`), a local
   checkpoint folder, a hub id, or a GGUF file (converted once into OUT/base);
2. balconies: `--init-from ARTIFACT` (e.g. `default`, continuing the shipped ones) or fresh at `--exits`;
3. a self corpus: the full model's own chat answers to the `chat` source's prompts (topics the
   shipped held-out chats never use), sampled in large batches for `--sample-seconds` (0: none)
   (`balcony.training.data.self_generated_corpus`, T=1, top-p 0.95, top-k 50, into the corpus folder
   OUT/corpus-self, grown as `balcony corpus --source chat` grows one; a second run with the same
   --out adds to it), mixed with a corpus folder's shards (`--corpus`, e.g. recipes/corpus) and any
   `--data` JSONL files;
4. training (`balcony.training.trainer.Trainer`, bf16 on a GPU, exact KL) for about `--train-seconds`: the
   step count is set from a measured calibration step so the cosine schedule ends on time;
5. OUT/artifact (bf16 weights: 28 MB for the default's three exits), OUT/run/metrics.jsonl, and
   OUT/recipe.json with every setting and figure. The run's fp32 checkpoints and the converted
   GGUF base are removed, so OUT holds only what is worth keeping.

recipes/default/make.sh runs it twice as its v9-gpu stage. Tested on the CPU with a tiny model
(tests/test_gpu_recipe.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def load_model(args):
    from balcony import BalconyModel
    from balcony.default import NamedBase, convert_gguf

    base = args.base
    if base.endswith(".gguf") and Path(base).is_file():  # a GGUF file: dequantised once into OUT/base
        gguf, base = Path(base), str(Path(args.out) / "base")
        if not (Path(base) / "config.json").is_file():
            convert_gguf(gguf, Path(base), NamedBase(gguf.stem, "", "", "base", str(gguf)))
    if args.init_from:
        model = BalconyModel.from_pretrained(args.init_from, base=base, device=args.device,
                                             verify_base=not args.no_verify_base)
    else:
        exits = [int(e) for e in args.exits.split(",")] if args.exits else None
        model = BalconyModel.from_base(base, exits=exits, device=args.device)
    return model


def build_corpus(model, args) -> tuple[Path, dict]:
    """The self corpus (time-boxed) plus corpus shards and extra JSONL files, written as one JSONL file."""
    from balcony.training.corpus import SOURCES, Corpus
    from balcony.training.data import load_documents, self_generated_corpus

    out = Path(args.out)
    self_path = out / "corpus-self"  # a corpus folder (`balcony corpus`'s shards and manifest)
    cached = Corpus(self_path).tokens  # a second run in the same --out grows the same corpus
    began = time.monotonic()
    # the `chat` source's prompts (`balcony corpus --source chat`): topics the shipped held-out
    # chats never use, so nothing sampled here is a held-out text's prompt
    prompts = SOURCES["chat"].items([])  # no files named: its own prompt lists
    # bf16 sampling: the teacher trains in bf16 on a GPU anyway; fp32 made 10K tokens/s on an H200
    if args.sample_seconds <= 0:  # no sampling: what an earlier run in this --out sampled, if any
        documents = list(Corpus(self_path).documents()) if cached else []
    else:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.sample_precision == "bf16"):
            documents = self_generated_corpus(model.base, model.tokenizer, target_tokens=args.sample_tokens,
                                              batch_size=args.sample_batch, max_new_tokens=args.sample_new_tokens,
                                              path=self_path, seconds=args.sample_seconds, prompts=prompts,
                                              seed=args.sample_seed, min_words=1)  # every answer is kept
    elapsed = time.monotonic() - began
    sampled = Corpus(self_path).tokens
    info = {"self_documents": len(documents), "self_tokens": sampled, "self_tokens_new": sampled - cached,
            "self_prompts": len(prompts), "sample_seconds": round(elapsed, 1), "sample_precision": args.sample_precision,
            "sample_tokens_per_second": round((sampled - cached) / max(1e-9, elapsed))}
    mixed = out / "corpus.jsonl"
    with mixed.open("w", encoding="utf-8") as f:

        def write(texts) -> int:
            count = 0
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
                count += 1
            return count

        write(documents)
        if args.corpus:
            count = write(load_documents(args.corpus, corpus_sources=args.corpus_sources, corpus_shards=args.corpus_shards))
            info["corpus"] = {"path": args.corpus, "sources": args.corpus_sources, "shards": args.corpus_shards,
                              "documents": count}
        for extra in args.data or []:
            write(load_documents(extra))  # JSONL files with a `text` field (blank lines skipped)
    info["extra_data"] = list(args.data or [])
    return mixed, info


def train(model, corpus: Path, args) -> dict:
    """Calibrate one step's time, then train for as many steps as `--train-seconds` allows."""
    from balcony.training.data import build_dataset
    from balcony.training.config import (CheckpointOptions, DataOptions, LogOptions, LossOptions, OptimOptions,
                                         TrainConfig)
    from balcony.training.trainer import Trainer

    precision = "bf16" if model.device.type == "cuda" else args.precision
    data = build_dataset(str(corpus), model.tokenizer, args.seq_len, val_fraction=args.val_fraction)

    def config(out: Path, steps: int) -> TrainConfig:
        return TrainConfig(out=str(out), precision=precision, seed=args.seed,
                           data=DataOptions(seq_len=args.seq_len, val_sequences=args.val_sequences),
                           optim=OptimOptions(batch_size=args.batch_size, max_steps=steps, lr=args.lr, warmup=args.warmup),
                           loss=LossOptions(kl_topk=args.kl_topk, top1_weight=args.top1_weight),
                           checkpoints=CheckpointOptions(every=10**9),
                           logging=LogOptions(eval_every=max(1, steps // 8), progress=args.progress))

    saved = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    while True:  # the first step also finds a batch that fits: halve it on running out of memory
        try:
            probe = Trainer(config(Path(args.out) / "calibration", 10**6), model=model, data=data)
            probe.train_step()  # warm-up (kernels, allocator)
            break
        except torch.OutOfMemoryError:
            if args.batch_size == 1:
                raise
            probe = None
            args.batch_size //= 2
            torch.cuda.empty_cache()
            print(f"gpu_recipe: out of memory, batch size now {args.batch_size}", flush=True)
    began = time.monotonic()
    for _ in range(args.calibration_steps):
        probe.train_step()
    per_step = (time.monotonic() - began) / args.calibration_steps
    model.balconies.load_state_dict(saved)  # calibration must not train
    steps = max(1, int(args.train_seconds / (per_step * 1.15)))  # validation passes take the rest
    trainer = Trainer(config(Path(args.out) / "run", steps), model=model, data=data)
    began = time.monotonic()
    trainer.fit()
    return {"steps": steps, "seconds_per_step": round(per_step, 4), "train_seconds": round(time.monotonic() - began, 1),
            "tokens_trained": steps * trainer.tokens_per_step, "train_sequences": int(data.train.shape[0]),
            "epochs": round(steps * args.batch_size / max(1, data.train.shape[0]), 2), "precision": precision}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--base", "--model", default="default",
                   help="the base: a named base (default, gemma3-270m), a folder, a hub id or a .gguf file")
    p.add_argument("--init-from", help="continue these trained balconies (e.g. default)")
    p.add_argument("--exits", help="fresh balconies at these exits (without --init-from)")
    p.add_argument("--no-verify-base", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", nargs="*", help="JSONL corpora (a `text` field) to mix with the self corpus")
    p.add_argument("--corpus", help="a corpus folder (`balcony corpus`, e.g. recipes/corpus) to mix in")
    p.add_argument("--corpus-sources", nargs="*", help="only these sources of --corpus (e.g. chat books)")
    p.add_argument("--corpus-shards", help="only these shards of --corpus (e.g. 93-)")
    p.add_argument("--sample-seed", type=int, default=1234)
    p.add_argument("--sample-seconds", type=float, default=150)
    p.add_argument("--sample-tokens", type=int, default=50_000_000, help="stop sampling here if time remains")
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--sample-new-tokens", type=int, default=384)
    p.add_argument("--sample-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: sample under bf16 autocast (fp32 samples about 10K tokens/s at batch 2048 on an H200)")
    p.add_argument("--train-seconds", type=float, default=270)
    p.add_argument("--calibration-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.02)
    p.add_argument("--kl-topk", type=int, default=0, help="0: exact KL (a GPU does not need the sparse one)")
    p.add_argument("--top1-weight", type=float, default=0.0, help="CE against the teacher's top 1, beside the KL")
    p.add_argument("--precision", default="fp32", help="on a CPU (bf16 is always used on a GPU)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--val-sequences", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args)
    corpus, corpus_info = build_corpus(model, args)
    training = train(model, corpus, args)
    artifact = out / "artifact"
    model.save_pretrained(artifact, dtype=torch.bfloat16)
    # OUT keeps what is worth keeping: the bf16 artifact, the metrics, the report
    for heavy in (out / "run").glob("*.safetensors"):
        heavy.unlink()
    shutil.rmtree(out / "base", ignore_errors=True)
    report = {"settings": vars(args), "device": str(model.device),
              "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None,
              "torch": torch.__version__, "corpus": corpus_info, "training": training,
              "seconds": round(time.monotonic() - began, 1), "artifact": str(artifact)}
    (out / "recipe.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
