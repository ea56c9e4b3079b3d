"""`balcony VERB`: one thin function per verb, each calling the module that does the work."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time

from .core.config import INITS
from .core.errors import BalconyError
from .core.policy import FULL


def _parse_exits(text: str) -> list[int]:
    try:
        exits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--exits takes comma-separated layer numbers like 15,20,25, not {text!r}") from None
    if not exits:
        raise argparse.ArgumentTypeError("--exits needs at least one layer number")
    return exits


def _parse_layers(text: str) -> int | dict[str, int]:
    try:
        if ":" not in text:
            return int(text)
        return {e.strip(): int(n) for e, n in (part.split(":") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--balcony-layers takes a number like 2 or exit:layers pairs like 15:2,20:1, "
                                         f"not {text!r}") from None


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", nargs="?", help="balcony artifact folder (from save_pretrained or `balcony train`), "
                        "or `default`: the shipped balconies for the default model")
    parser.add_argument("--model", help="base model: hub id or local path; 'default' (the default) is the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--exits", type=_parse_exits, help="exits for fresh, untrained balconies when no artifact is given (e.g. 15,20,25)")
    parser.add_argument("--init", choices=INITS, default="copy", help="init of fresh balconies")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu (default) or e.g. cuda")
    parser.add_argument("--no-verify-base", action="store_true", help="skip the base weight-fingerprint check")


def _load(args):
    from .core.model import BalconyModel

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


def _report_info(model, trained: bool, args) -> int:
    base_params = sum(p.numel() for p in model.base.parameters())
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
                "balcony_parameters": model.balcony_parameters(e),
                "balcony_fraction_of_base": model.balcony_parameters(e) / base_params,
                "relative_cost": model.relative_cost(e),
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


def _exit_arg(text: str):
    return None if text in (FULL, "none", "None") else text


def generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model, _ = _load(args)
    exit_layer = model.resolve_depth(args.exit, args.budget, args.max_ms_per_token)
    inputs = model.encode(args.prompt, chat=args.chat)
    tokenizer = model.tokenizer
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        options.update(do_sample=False)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    mode_stats = None
    if args.speculative or args.dynamic:
        if args.speculative and args.dynamic:
            raise BalconyError("--speculative and --dynamic are two different modes: choose one")
        if exit_layer is not None:
            raise BalconyError("--speculative and --dynamic choose their own depth: drop --exit/--budget/--max-ms-per-token")
        if args.speculative:
            if args.draft_exit is None:
                raise BalconyError(f"--speculative needs --draft-exit, one of {model.exits}")
            mode = dict(mode="speculative", draft_exit=args.draft_exit, num_draft=args.num_draft,
                        draft_vocab=args.draft_vocab or None)
            if args.temperature > 0:
                mode.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        else:
            if args.threshold is None:
                raise BalconyError("--dynamic needs --threshold, a top probability in [0, 1] (1.0: the full model)")
            if args.temperature > 0:
                raise BalconyError("--dynamic decodes greedily: drop --temperature")
            mode = dict(mode="dynamic", threshold=args.threshold, draft_vocab=args.draft_vocab or None)
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=options["pad_token_id"], **mode)
        mode_stats = model.last_stats
        if streamer is not None:
            print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    else:
        output = model.generate(**inputs, exit_layer=exit_layer, streamer=streamer, **options)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    result = {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "token_ids": new_tokens,
        "exit": FULL if exit_layer is None else exit_layer,
        "num_tokens": len(new_tokens),
        "seconds": round(seconds, 4),
        "tokens_per_second": len(new_tokens) / seconds if seconds > 0 else None,
        "relative_cost": model.relative_cost(exit_layer),
    }
    if mode_stats is not None:
        result.update(mode_stats)
        if args.speculative:
            result["draft_exit"] = args.draft_exit
    if args.budget is not None:
        result["budget"] = args.budget
    if args.max_ms_per_token is not None:
        result["max_ms_per_token"] = args.max_ms_per_token
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n-- exit {result['exit']} · {len(new_tokens)} tokens · {result['tokens_per_second']:.1f} tokens/s")
        if args.speculative:
            print(f"-- drafted by exit {args.draft_exit}: {result['acceptance_rate']:.0%} of drafted tokens accepted, "
                  f"{result['tokens_per_round']:.2f} tokens per verification")
        elif args.dynamic:
            shares = ", ".join(f"{depth}: {share:.0%}" for depth, share in result["exit_share"].items())
            print(f"-- tokens left at depth {shares}; mean depth {result['mean_exit']:.1f}; "
                  f"{result['compute_saved']:.0%} of sequential layer passes saved")
    return 0


# ----------------------------------------------------------------------------- eval


def evaluate(args) -> int:
    from .evaluation.quality import evaluate as run_eval
    from .evaluation.quality import format_table

    if not args.data and not args.tasks:
        raise BalconyError("give held-out text with --data, lm-eval tasks with --tasks, or both")
    model, _ = _load(args)
    report = {}
    if args.data:
        report = run_eval(model, args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                          batch_size=args.batch_size)
        print(format_table(report))
    if args.tasks:
        from pathlib import Path

        from .evaluation.downstream import evaluate_downstream, plot
        from .evaluation.downstream import format_table as format_tasks

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
    return 0


# ----------------------------------------------------------------------------- bench


def bench(args) -> int:
    from pathlib import Path

    from .evaluation.bench import bench as run_bench
    from .evaluation.bench import format_table, plot, profile_from
    from .core.artifact import speed_profile_path

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
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile_from(report, model.balcony_config.shape()), indent=2))
        print(f"stored the speed profile for max_ms_per_token budgets in {path}", file=sys.stderr)
    if args.plot:
        quality = json.loads(Path(args.eval).read_text()) if args.eval else None
        plot(report, quality, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export


def export(args) -> int:
    from .export import export as run_export

    model, _ = _load(args)
    path = run_export(model, args.exit, args.out)
    print(f"exit {args.exit} written to {path} as a {model.base.config.model_type} checkpoint with "
          f"{int(args.exit) + model.balcony_config.layers_at(int(args.exit))} layers; load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


# ----------------------------------------------------------------------------- train


def train(args) -> int:
    from .training.trainer import TrainConfig, TrainingInterrupted, Trainer

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
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


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


# ----------------------------------------------------------------------------- corpus


def corpus(args) -> int:
    """Grow a training corpus by one source, or say what it holds."""
    from .training.corpus import Context, Corpus, grow

    if args.source is None:
        if not Corpus.exists(args.out):
            raise BalconyError(f"{args.out} is not a corpus yet: grow one with --source and --tokens or --seconds")
        held = Corpus(args.out)
        for shard in held.shards:
            held.read(shard)  # checks every shard's sha256
        print(json.dumps(held.summary(), indent=2))
        return 0
    from .core.model import load_base

    model, tokenizer = load_base(args.model)
    model.eval()
    shards = grow(args.out, args.source, Context(model, tokenizer, max_new_tokens=args.max_new_tokens),
                  tokens=args.tokens, seconds=args.seconds, shard_tokens=args.shard_tokens, seed=args.seed,
                  batch=args.batch, tokenizer_name=args.model or "default")
    added = sum(s.tokens for s in shards)
    print(f"added {len(shards)} shard(s), {added:,} tokens of {args.source}; the corpus holds "
          f"{Corpus(args.out).tokens:,} tokens", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- quickstart


def quickstart(args) -> int:
    """The main job: load (or briefly train) balconies, evaluate, benchmark, sample every exit, report."""
    from pathlib import Path

    from .default import DEFAULT_NAME, HELDOUT_TEXT, is_default
    from .evaluation.quickstart import run_quickstart

    args.exits = None
    args.init = "copy"
    args.dtype = args.device = None
    args.no_verify_base = False
    args.json = False
    if args.train:
        if args.artifact:
            raise BalconyError("--train trains fresh balconies: drop the artifact argument, or drop --train to use it")
        from .training.trainer import TrainConfig
        from .training.trainer import train as run_train

        out = Path(args.out) / "balconies"
        print(f"[quickstart] 0/3 training fresh balconies for {args.train_steps} steps on {args.train_data} -> {out}", flush=True)
        run_train(TrainConfig(out=str(out), model=args.model, data=args.train_data, max_steps=args.train_steps,
                              lr=1e-3, warmup=0.05, precision="bf16", val_fraction=0.02, val_sequences=8,
                              eval_every=max(1, args.train_steps // 2), checkpoint_every=args.train_steps))
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
    from .serving.api import ServeConfig, api_key_from_env
    from .serving.api import serve as run_server

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
    floor = model.check_exit(args.min_exit) if args.min_exit is not None else None
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


# ----------------------------------------------------------------------------- entry point


def _defaults(entry) -> dict:
    """The defaults of a typed entry point (a config dataclass or a function): the CLI states none of its own."""
    if dataclasses.is_dataclass(entry):
        return {f.name: f.default for f in dataclasses.fields(entry) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(entry).parameters.items() if p.default is not p.empty}


def _options(parser: argparse.ArgumentParser, defaults: dict, specs: dict[str, dict]) -> None:
    """--name options for the entry point's fields `specs` names, each with the entry point's default."""
    for name, spec in specs.items():
        spec = dict(spec)
        if name in defaults and "default" not in spec:
            if isinstance(defaults[name], bool) and "action" not in spec:
                spec["action"] = "store_false" if defaults[name] else "store_true"
            else:
                spec["default"] = defaults[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **spec)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="base, exits, parameters added per exit and relative per-token cost")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=info)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text at an exit (or the full model)")
    _model_args(p)
    p.add_argument("--exit", type=_exit_arg, default=None, help="exit layer, or 'full' (the default) for the full model")
    p.add_argument("--budget", type=float, help="instead of --exit: fraction of the full model's per-token cost, e.g. 0.7")
    p.add_argument("--max-ms-per-token", type=float, help="instead of --exit: latency target (needs `balcony bench` first)")
    p.add_argument("--speculative", action="store_true",
                   help="the full model's output (greedy, or sampled with --temperature), drafted by a balcony")
    p.add_argument("--draft-exit", type=int, help="with --speculative: the balcony that drafts")
    p.add_argument("--num-draft", type=int, default=6, help="with --speculative: the most tokens a round drafts")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="with --speculative: tokens the draft head scores; with --dynamic: tokens a balcony's "
                        "confidence is screened on before the full head (0: the whole vocabulary)")
    p.add_argument("--dynamic", action="store_true", help="each token leaves at the first confident exit")
    p.add_argument("--threshold", type=float, help="with --dynamic: top probability a balcony needs to emit")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=generate)


def _eval_parser(sub) -> None:
    from .evaluation.downstream import evaluate_downstream
    from .evaluation.quality import evaluate as held_out

    p = sub.add_parser("eval", help="quality per exit on held-out text, with early-exit and truncation baselines")
    _model_args(p)
    p.add_argument("--data", help="held-out text: a plain text file (or folder, JSONL)")
    p.add_argument("--tasks", help="downstream tasks for every method at every exit and the full model: `table1` "
                   "(the paper's protocol, offline), offline tasks (arc_easy, piqa, mmlu, ...: see the README) "
                   "or any lm-eval task")
    _options(p, _defaults(evaluate_downstream), {
        "include_path": dict(help="folder of extra lm-eval task YAMLs (e.g. local data sets)"),
        "limit": dict(type=int, help="at most this many documents per task (a seeded random sample)"),
        "all_documents": dict(help="no default caps: all of HellaSwag and MMLU too (hours on a CPU)"),
        "num_fewshot": dict(type=int, help="override every task's number of examples in the prompt"),
        "batch_tokens": dict(type=int, help="tasks: model tokens per forward pass"),
    })
    p.add_argument("--plot", metavar="PNG", help="tasks: plot average accuracy against cost (default: beside --json)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    _options(p, _defaults(held_out), {"seq_len": dict(type=int), "max_tokens": dict(type=int),
                                      "batch_size": dict(type=int)})
    p.set_defaults(func=evaluate)


def _bench_parser(sub) -> None:
    from .evaluation.bench import bench as run_bench

    p = sub.add_parser("bench", help="speed per exit vs the full model and the FLOP-ideal; stores a latency profile")
    _model_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--plot", metavar="PNG", help="plot quality (from --eval) or speed against the ideal")
    p.add_argument("--eval", metavar="JSON", help="an eval report (balcony eval --json) for the plot's quality axis")
    defaults = _defaults(run_bench)
    p.add_argument("--batch-sizes", type=_parse_exits, default=list(defaults["batch_sizes"]),
                   help="comma-separated batch sizes, e.g. 1,8")
    _options(p, defaults, {name: dict(type=int) for name in ("prompt_len", "new_tokens", "prefill_len", "repeats")})
    p.add_argument("--no-profile", action="store_true", help="do not store bench_profile.json beside the artifact")
    p.set_defaults(func=bench)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write one exit as a standard transformers checkpoint (e + balcony layers)")
    _model_args(p)
    p.add_argument("--exit", required=True, help="the exit to export")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=export)


# help for TrainConfig's fields on the command line; types and defaults come from TrainConfig
_TRAIN_OPTIONS = {
    "model": dict(help="base model: hub id or local path; default: the embedded SmolLM2-135M-Instruct"),
    "exits": dict(type=_parse_exits, help="exits to train, e.g. 15,20,25 (default: 1/2, 2/3, 5/6 of the depth)"),
    "init": dict(choices=INITS, help="fresh balconies: copy (of the base's last layer, the paper's), next (of the "
                 "layers after the exit: the trunk continued) or random"),
    "init_from": dict(metavar="ARTIFACT",
                      help="continue from trained balconies (an artifact folder or 'default') instead of fresh ones"),
    "balcony_layers": dict(type=_parse_layers, metavar="N|EXIT:N,...",
                           help="decoder layers per balcony (default 1, the paper's), or per exit, e.g. 15:2; "
                                "with --init-from (default: the artifact's), more than the artifact's grows it"),
    "data": dict(help="text file, folder, JSONL, datasets name, or 'self' / 'self:TOKENS' (default for the default model)"),
    "text_field": dict(help="JSONL / dataset field holding the text"),
    "corpus_sources": dict(help="with a corpus folder as --data: train on these of its sources only, "
                           "comma-separated (e.g. chat,reading; default: all)"),
    "corpus_shards": dict(metavar="NUMBERS", help="with a corpus folder as --data: train on these of its shards only, "
                          "e.g. 93-97, or 93- (from 93 to the last: what the corpus grew since a run); "
                          "`balcony corpus FOLDER` lists each source's shard numbers"),
    "skip_tokens": dict(type=int, help="start this many tokens into the data's stream: a continuation that reads "
                        "what an earlier run on the same data (with its --max-tokens) did not"),
    "out": dict(required=True, help="output folder: artifact, metrics.jsonl, checkpoints/"),
    "max_steps": dict(type=int),
    "max_tokens": dict(type=int, help="training budget in tokens (instead of --max-steps)"),
    "seq_len": dict(type=int),
    "batch_size": dict(type=int, help="sequences per micro-batch per process"),
    "grad_accum": dict(type=int),
    "lr": dict(type=float),
    "warmup": dict(type=float, help="warm-up fraction of the steps"),
    "weight_decay": dict(type=float),
    "grad_clip": dict(type=float),
    "exit_weights": dict(type=_floats, help="loss weight per exit (default: mean)"),
    "ce_weight": dict(type=float, help="weight of cross-entropy against the data (paper: 0)"),
    "top1_weight": dict(type=float, help="weight of cross-entropy against the teacher's top-1 token, beside the KL "
                                         "(greedy decoding and speculative acceptance follow the top 1; paper: 0)"),
    "recall_weight": dict(type=float, help="extra loss weight where the next token is a less common one already seen "
                          "in the row (in-context recall, what LAMBADA asks; default 0)"),
    "precision": dict(choices=("fp32", "bf16")),
    "chunk_tokens": dict(type=int, help="tokens per head+KL chunk (memory vs speed)"),
    "kl_topk": dict(type=int, help="sparse KL: the teacher's top k tokens + tail mass (0: the exact KL)"),
    "kl_samples": dict(type=int, help="sparse KL: random vocabulary rows that estimate the student's normaliser"),
    "kl_tail_samples": dict(type=int, help="sparse KL: ids per token drawn from the teacher's remainder (outside its "
                            "top k), so its shape is learnt too; 0: the remainder is one bucket"),
    "teacher_cache": dict(metavar="DIR", help="sparse KL: keep the teacher's top k per training row in DIR, so later "
                         "epochs and later runs on the same data skip the teacher's top layers and head"),
    "activation_checkpointing": dict(),
    "val_fraction": dict(type=float),
    "val_sequences": dict(type=int),
    "eval_every": dict(type=int),
    "checkpoint_every": dict(type=int),
    "keep_checkpoints": dict(type=int),
    "seed": dict(type=int),
    "report_to": dict(choices=("none", "tensorboard", "wandb")),
    "resume": dict(help="continue from the latest checkpoint in --out"),
    "fsdp": dict(help="shard base and balcony layers over the ranks (under torchrun)"),
    "stop_after": dict(type=int, help=argparse.SUPPRESS),
}


def _train_parser(sub) -> None:
    from .training.trainer import TrainConfig

    p = sub.add_parser("train", help="train balconies by self-distillation (also under torchrun / accelerate launch)")
    _options(p, _defaults(TrainConfig), _TRAIN_OPTIONS)
    p.add_argument("--device", default=None)
    p.set_defaults(func=train)


def _serve_parser(sub) -> None:
    from .serving.api import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request exits and load-adaptive depth")
    _model_args(p)
    _options(p, _defaults(ServeConfig), {
        "host": dict(help="interface to bind (default: loopback only)"),
        "port": dict(type=int),
        "api_key": dict(help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $BALCONY_API_KEY, else none)"),
        "model_name": dict(help="the model id clients send and /v1/models lists"),
        "target_ms_per_token": dict(type=float, help="load-adaptive: serve unpinned requests at the deepest "
                                    "exit that holds this latency at the current load"),
        "max_batch_size": dict(type=int, help="requests decoded together (rows at any exits share one batch)"),
        "prefill_tokens": dict(type=int, help="prompt tokens prefilled per scheduler step; newcomers beyond it "
                               "wait a step and longer prompts go in chunks, so running requests keep streaming"),
        "max_queue": dict(type=int, help="requests queued or running before 429"),
        "max_prompt_tokens": dict(type=int),
        "max_tokens_limit": dict(type=int, help="the largest max_tokens a request may ask for"),
        "min_exit": dict(type=str, help="quality floor: the shallowest exit the load-adaptive policy may pick "
                         "('full': never shallower); it wins over --target-ms-per-token"),
    })
    p.add_argument("--min-agreement", type=float, help="quality floor from measured quality: the shallowest exit "
                   "whose top-1 agreement with the full model reaches this, in --quality")
    p.add_argument("--quality", metavar="EVAL_JSON", help="an eval report (`balcony eval --data ... --json`) for "
                   "--min-agreement")
    p.set_defaults(func=serve)


def _corpus_parser(sub) -> None:
    from .training.corpus import SOURCES, grow

    p = sub.add_parser("corpus", help="grow a training corpus (deduplicated shards with a manifest) by one source")
    p.add_argument("out", help="the corpus folder (created if new; grown if not)")
    p.add_argument("--source", choices=sorted(SOURCES), help="what to add; without it: what the corpus holds")
    p.add_argument("--model", help="the model that samples (chat, reading) and whose tokenizer counts tokens "
                   "(default: the embedded model)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
    _options(p, _defaults(grow), {"tokens": dict(type=int, help="add about this many tokens"),
                                  "seconds": dict(type=float, help="stop adding after this long"),
                                  "shard_tokens": dict(type=int, help="tokens per shard"),
                                  "seed": dict(type=int, help="fixes the source's order and the sampling"),
                                  "batch": dict(type=int, help="items made at once (chat: prompts sampled together; "
                                                "64 samples ~1.7x faster than the default 16 on 2 CPU cores)")})
    p.set_defaults(func=corpus)


def _quickstart_parser(sub) -> None:
    from .evaluation.quickstart import run_quickstart

    defaults = _defaults(run_quickstart)
    p = sub.add_parser("quickstart", help="the main job: evaluate, benchmark and sample every exit; write a report")
    p.add_argument("artifact", nargs="?", help="balcony artifact (default: `default`, the shipped balconies of the "
                   "default model; with --model and no artifact: fresh, untrained balconies)")
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="held-out text for the quality table (default model: the shipped held-out text; "
                   "otherwise skipped without it)")
    p.add_argument("--train", action="store_true", help="train fresh balconies briefly first instead of loading an artifact")
    p.add_argument("--train-data", default="pydocs", help="with --train: training text (default: pydocs, this Python's docstrings)")
    p.add_argument("--train-steps", type=int, default=40, help="with --train: steps of 4 x 512 tokens")
    p.add_argument("--out", default="quickstart-report", help="folder for report.md and the plot")
    _options(p, defaults, {"prompt": dict(), "max_new_tokens": dict(type=int)})
    p.set_defaults(func=quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balcony", description="Elastic depth for Hugging Face causal LMs (Balcony).")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_info_parser, _generate_parser, _eval_parser, _bench_parser, _export_parser, _train_parser,
                _corpus_parser, _serve_parser, _quickstart_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) is not None and getattr(args, "max_new_tokens", 1) < 1:
        print("balcony: error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (BalconyError, FileNotFoundError) as err:
        print(f"balcony: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
