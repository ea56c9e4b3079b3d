"""What each `balcony VERB` does: one thin function per verb, calling the module that does the work.

Each takes the parsed arguments (`cli.parser` builds them from the entry points' typed defaults)
and returns the process's exit code.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from ..core.errors import BalconyError
from ..core.policy import FULL, DepthRequest


def _load(args):
    from ..core.model import BalconyModel

    if args.artifact:
        if args.exits:
            raise BalconyError("--exits applies to fresh balconies; an artifact brings its own exits (drop --exits)")
        return BalconyModel.from_pretrained(
            args.artifact, base=args.model, dtype=args.dtype, device=args.device, verify_base=not args.no_verify_base
        ), True
    model = BalconyModel.from_base(args.model, exits=args.exits, init=args.init, dtype=args.dtype, device=args.device)
    return model, False


# ----------------------------------------------------------------------------- info


def info(args) -> int:
    model, trained = _load(args)
    return _report_info(model, trained, args)


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _report_info(model, trained: bool, args) -> int:
    base_params = _parameters(model.base)
    report = {
        "base": model.balcony_config.base_model,
        "model_type": model.base.config.model_type,
        "num_layers": model.num_layers,
        "hidden_size": model.base.config.hidden_size,
        "base_parameters": base_params,
        "dtype": str(model.dtype).replace("torch.", ""),
        "artifact": args.artifact,
        "trained": trained,
        "exits": model.exits,
        "per_exit": [
            {
                "exit": e,
                "balcony_parameters": _parameters(model.balconies[str(e)]),
                "balcony_fraction_of_base": _parameters(model.balconies[str(e)]) / base_params,
                "relative_cost": model.costs.relative(e),
            }
            for e in model.exits
        ],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"base         {report['base']} ({report['model_type']}, {model.num_layers} layers, {base_params / 1e6:.1f}M parameters, {report['dtype']})")
    counts = [model.balcony_config.layers_at(e) for e in model.exits]
    layers = f"{counts[0]} decoder layer{'s' if counts[0] > 1 else ''} each" if len(set(counts)) == 1 else \
        "decoder layers " + ", ".join(f"{e}: {n}" for e, n in zip(model.exits, counts))
    print(f"balconies    {'trained, from ' + args.artifact if trained else 'fresh (untrained, init=' + args.init + ')'}, {layers}")
    print(f"{'exit':>6} {'added params':>14} {'% of base':>10} {'cost vs full':>13}")
    for row in report["per_exit"]:
        print(f"{row['exit']:>6} {row['balcony_parameters']:>14,} {100 * row['balcony_fraction_of_base']:>9.2f}% {row['relative_cost']:>12.2f}x")
    print(f"{FULL:>6} {0:>14,} {0:>9.2f}% {1:>12.2f}x")
    return 0


# ----------------------------------------------------------------------------- generate


def generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model, _ = _load(args)
    exit_layer = model.policy.resolve(DepthRequest(args.exit, args.budget, args.max_ms_per_token))
    inputs = model.encode(args.prompt, chat=args.chat)
    tokenizer = model.tokenizer
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                   return_dict_in_generate=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else {}
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    mode = _mode(args, model, exit_layer)
    if mode is not None:
        output = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, **options, **mode)
        if streamer is not None:
            print(tokenizer.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    else:
        output = model.generate(**inputs, exit_layer=exit_layer, streamer=streamer, **options,
                                **(sampling or dict(do_sample=False)))
    seconds = time.perf_counter() - start
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    result = {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "token_ids": new_tokens,
        "exit": FULL if output.exit_layer is None else output.exit_layer,
        "num_tokens": len(new_tokens),
        "seconds": round(seconds, 4),
        "tokens_per_second": len(new_tokens) / seconds if seconds > 0 else None,
        "relative_cost": model.costs.relative(output.exit_layer),
        **(output.stats or {}),
        **({"draft_exit": args.draft_exit} if args.speculative else {}),
        **{name: getattr(args, name) for name in ("budget", "max_ms_per_token") if getattr(args, name) is not None},
    }
    if args.json:
        print(json.dumps(result))
    else:
        _say_generated(result, args)
    return 0


def _mode(args, model, exit_layer) -> dict | None:
    """generate's options for --speculative or --dynamic (None for neither), checked against the other flags."""
    if not (args.speculative or args.dynamic):
        return None
    if args.speculative and args.dynamic:
        raise BalconyError("--speculative and --dynamic are two different modes: choose one")
    if exit_layer is not None:
        raise BalconyError("--speculative and --dynamic choose their own depth: drop --exit/--budget/--max-ms-per-token")
    if args.dynamic:
        if args.threshold is None:
            raise BalconyError("--dynamic needs --threshold, a top probability in [0, 1] (1.0: the full model)")
        if args.temperature > 0:
            raise BalconyError("--dynamic decodes greedily: drop --temperature")
        return dict(mode="dynamic", threshold=args.threshold, draft_vocab=args.draft_vocab or None)
    if args.draft_exit is None:
        raise BalconyError(f"--speculative needs --draft-exit, one of {model.exits}")
    mode = dict(mode="speculative", draft_exit=args.draft_exit, num_draft=args.num_draft,
                draft_vocab=args.draft_vocab or None)
    if args.temperature > 0:
        mode.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    return mode


def _say_generated(result: dict, args) -> None:
    print(f"\n-- exit {result['exit']} · {result['num_tokens']} tokens · {result['tokens_per_second']:.1f} tokens/s")
    if args.speculative:
        print(f"-- drafted by exit {args.draft_exit}: {result['acceptance_rate']:.0%} of drafted tokens accepted, "
              f"{result['tokens_per_round']:.2f} tokens per verification")
    elif args.dynamic:
        shares = ", ".join(f"{depth}: {share:.0%}" for depth, share in result["exit_share"].items())
        print(f"-- tokens left at depth {shares}; mean depth {result['mean_exit']:.1f}; "
              f"{result['compute_saved']:.0%} of sequential layer passes saved")


# ----------------------------------------------------------------------------- eval


def evaluate(args) -> int:
    from ..evaluation.quality import evaluate as run_eval
    from ..evaluation.quality import format_table

    if not args.data and not args.tasks:
        raise BalconyError("give held-out text with --data, lm-eval tasks with --tasks, or both")
    card = _card_folder(args)  # refused now, before any evaluation runs
    model, _ = _load(args)
    report = {}
    if args.data:
        report = run_eval(model, args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                          batch_size=args.batch_size)
        print(format_table(report))
    if args.tasks:
        from pathlib import Path

        from ..evaluation.downstream import evaluate_downstream
        from ..evaluation.downstream_report import format_table as format_tasks
        from ..evaluation.downstream_report import plot

        tasks = evaluate_downstream(model, [t for t in args.tasks.split(",") if t], limit=args.limit,
                                    all_documents=args.all_documents, include_path=args.include_path,
                                    num_fewshot=args.num_fewshot, batch_tokens=args.batch_tokens)
        print(format_tasks(tasks))
        print(f"-- {tasks['seconds']:.0f} s in all, {tasks['requests']} requests scored for "
              f"{len(tasks['rows'])} variants from {tasks['scored_tokens']} model tokens", file=sys.stderr)
        # the downstream report is the JSON's root unless held-out text was evaluated too
        report = {**report, "downstream": tasks} if report else tasks
        plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
        if plot_path:
            plot(tasks, plot_path)
            print(f"wrote {plot_path}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if card is not None:
        _add_to_card(card, model, report, args.data)
    return 0


def _card_folder(args):
    """The artifact folder whose model card `eval --card` rewrites (None without --card)."""
    from ..core.card import card_folder

    return card_folder(args.artifact) if args.card else None


def _add_to_card(folder, model, report: dict, data: str | None) -> None:
    """Write an eval report's figures into the card's evaluation section, keeping the rest of the card."""
    from ..core.card import evaluation_parts, model_card, read_card, with_evaluation, write_card

    text = read_card(folder) or model_card(model)  # an artifact saved before cards were written gets one
    write_card(folder, with_evaluation(text, evaluation_parts(report, data)))
    print(f"wrote the figures into {folder / 'README.md'}", file=sys.stderr)


# ----------------------------------------------------------------------------- bench


def bench(args) -> int:
    from pathlib import Path

    from ..evaluation.bench import bench as run_bench
    from ..evaluation.bench import format_table, plot, profile_from
    from ..core.artifact import speed_profile_path, write_profile

    model, _ = _load(args)
    sizes = tuple(args.batch_sizes)
    report = run_bench(model, batch_sizes=sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       prefill_len=args.prefill_len, repeats=args.repeats)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.artifact and not args.no_profile:
        path = speed_profile_path(args.artifact)
        write_profile(path, profile_from(report, model.balcony_config.shape()))
        print(f"stored the speed profile for max_ms_per_token budgets in {path}", file=sys.stderr)
    if args.plot:
        quality = json.loads(Path(args.eval).read_text()) if args.eval else None
        plot(report, quality, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export


def export(args) -> int:
    from ..export import export as run_export

    model, _ = _load(args)
    path = run_export(model, args.exit, args.out)
    print(f"exit {args.exit} written to {path} as a {model.base.config.model_type} checkpoint with "
          f"{int(args.exit) + model.balcony_config.layers_at(int(args.exit))} layers; load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


# ----------------------------------------------------------------------------- train


def train(args) -> int:
    from ..training.trainer import TrainConfig, TrainingInterrupted, Trainer

    config = TrainConfig.from_flat(**{name: getattr(args, name) for name in args.train_options})
    trainer = Trainer(config, device=args.device)
    if trainer.dist.main:
        print(f"training exits {trainer.exits} for {trainer.total_steps} steps x {trainer.tokens_per_step} tokens "
              f"on {trainer.data.train.shape[0]} sequences ({trainer.dist.world} process(es))", file=sys.stderr)
    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        if trainer.dist.main:
            print(f"balcony: {stop}", file=sys.stderr)
        return 130
    if trainer.dist.main:
        print(f"balconies written to {args.out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- compare


def compare(args) -> int:
    """Train every method on the same tokens (or continue), evaluate each at every exit, print one table."""
    from pathlib import Path

    from ..evaluation.compare import compare as run_compare
    from ..evaluation.compare_report import format_table, plot
    from ..training.interrupt import TrainingInterrupted

    try:
        report = run_compare(args.out, args.tokens, args.methods, heldout=args.heldout, tasks=args.tasks,
                             limit=args.limit, include_path=args.include_path, layerskip_lr=args.layerskip_lr,
                             device=args.device, **{name: getattr(args, name) for name in args.train_options})
    except TrainingInterrupted as stop:
        print(f"balcony: {stop}; or run the same compare command again: it continues every method", file=sys.stderr)
        return 130
    print(format_table(report))
    path = args.plot or str(Path(args.out) / "compare.png")
    plot(report, path)
    print(f"wrote {Path(args.out) / 'compare.json'} and {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- corpus


def corpus(args) -> int:
    """Grow a training corpus by one source, or say what it holds."""
    from ..training.corpus import HELD_OUT_FILES, SOURCES, Context, Corpus, evaluation_texts, grow, locate

    if args.source is None:
        if not Corpus.exists(args.out):
            raise BalconyError(f"{args.out} is not a corpus yet: grow one with --source and --tokens or --seconds")
        held = Corpus(args.out)
        for shard in held.shards:
            held.read(shard)  # checks every shard's sha256
        print(json.dumps(held.summary(), indent=2))
        return 0
    from ..core.model import load_base

    # the source's text and the held-out texts are found before the model loads: a machine
    # without them fails at once, naming what to install
    paths = locate(SOURCES[args.source], args.source_path)
    files = HELD_OUT_FILES if args.held_out is None else [f for f in args.held_out if f != "none"]
    held_out = evaluation_texts(files)
    model, tokenizer = load_base(args.model)
    model.eval()
    shards = grow(args.out, args.source, Context(model, tokenizer, max_new_tokens=args.max_new_tokens),
                  tokens=args.tokens, seconds=args.seconds, shard_tokens=args.shard_tokens, seed=args.seed,
                  batch=args.batch, tokenizer_name=args.model or "default", paths=paths, held_out=held_out)
    added = sum(s.tokens for s in shards)
    print(f"added {len(shards)} shard(s), {added:,} tokens of {args.source}; the corpus holds "
          f"{Corpus(args.out).tokens:,} tokens", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- quickstart


def quickstart(args) -> int:
    """The main job: load (or briefly train) balconies, evaluate, benchmark, sample every exit, report."""
    from pathlib import Path

    from ..default import DEFAULT_NAME, HELDOUT_TEXT, is_default
    from ..evaluation.quickstart import run_quickstart

    args.exits = None
    args.init = "copy"
    args.dtype = args.device = None
    args.no_verify_base = False
    args.json = False
    if args.train:
        if args.artifact:
            raise BalconyError("--train trains fresh balconies: drop the artifact argument, or drop --train to use it")
        from ..training.config import CheckpointOptions, DataOptions, LogOptions, OptimOptions, TrainConfig
        from ..training.trainer import train as run_train

        out = Path(args.out) / "balconies"
        print(f"[quickstart] 0/3 training fresh balconies for {args.train_steps} steps on {args.train_data} -> {out}", flush=True)
        run_train(TrainConfig(out=str(out), model=args.model, precision="bf16",
                              data=DataOptions(source=args.train_data, val_fraction=0.02, val_sequences=8),
                              optim=OptimOptions(max_steps=args.train_steps, lr=1e-3, warmup=0.05),
                              checkpoints=CheckpointOptions(every=args.train_steps),
                              logging=LogOptions(eval_every=max(1, args.train_steps // 2))))
        args.artifact = str(out)
    elif not args.artifact and is_default(args.model):
        args.artifact = DEFAULT_NAME  # the shipped balconies
    if args.data is None and is_default(args.model):
        args.data = str(HELDOUT_TEXT)  # the default model's own text, which no balcony was trained on
    model, trained = _load(args)
    _report_info(model, trained, args)
    run_quickstart(model, args.out, data=args.data, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                   trained=trained)
    return 0


# ----------------------------------------------------------------------------- serve


def serve(args) -> int:
    """An OpenAI-compatible server; every request may pick its own depth."""
    from ..serving.api import ServeConfig, api_key_from_env
    from ..serving.api import serve as run_server

    model, _ = _load(args)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    config = ServeConfig(**{**options, "api_key": args.api_key or api_key_from_env(),
                            "aliases": (str(args.artifact),) if args.artifact else (),
                            "min_exit": _quality_floor(model, args)})
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"balcony serve: warning: listening on {config.host} without an API key", file=sys.stderr)
    run_server(model, config)
    return 0


def _quality_floor(model, args):
    """--min-exit, or the shallowest exit reaching --min-agreement in --quality, whichever is deeper."""
    floor = model.policy.check_exit(args.min_exit) if args.min_exit is not None else None
    full = args.min_exit is not None and floor is None
    if args.min_agreement is not None:
        if not args.quality:
            raise BalconyError("--min-agreement reads each exit's agreement from an eval report: give --quality "
                               "EVAL.json (written by `balcony eval ARTIFACT --data HELD_OUT --json EVAL.json`)")
        with open(args.quality) as f:
            reached = model.policy.quality_floor(json.load(f), args.min_agreement)
        full = full or reached is None
        floor = max(floor or 0, reached or 0) or None
    if full:
        return FULL
    if floor is not None:
        print(f"balcony serve: the load-adaptive policy goes no shallower than exit {floor}", file=sys.stderr)
    return floor
