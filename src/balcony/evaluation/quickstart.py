"""The main job in one call: what the model is, how good and how fast each exit is, a sample
from each, written up as `report.md` plus a quality-against-speed plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.model import BalconyModel
from ..core.policy import label
from .bench import bench, plot
from .bench import format_table as bench_table
from .quality import evaluate
from .quality import format_table as eval_table


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def run_quickstart(
    model: BalconyModel,
    out: str | Path,
    *,
    data: str | None = None,
    eval_tokens: int = 16_384,
    prompt: str = "What is the capital of France?",
    max_new_tokens: int = 24,
    trained: bool = True,
    bench_repeats: int = 2,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = ["# balcony quickstart report", ""]
    base = model.balcony_config.base_model
    lines += [f"Base: `{base}` ({model.base.config.model_type}, {model.num_layers} layers). "
              f"Exits: {model.exits}. Balconies: {'trained' if trained else 'fresh, untrained (copies of the last layer)'}.", ""]

    quality = None
    if data:
        _say(f"1/3 evaluating every exit and both baselines on {data} (up to {eval_tokens:,} tokens)")
        quality = evaluate(model, data, max_tokens=eval_tokens)
        (out / "eval.json").write_text(json.dumps(quality, indent=2))
        lines += ["## Quality per exit", "", "```", eval_table(quality), "```", ""]
    else:
        _say("1/3 no held-out text given (--data): skipping the quality evaluation")

    _say("2/3 measuring speed per exit against the full model (round-robin)")
    speed = bench(model, batch_sizes=(1, 8), new_tokens=16, prefill_len=256, repeats=bench_repeats)
    (out / "bench.json").write_text(json.dumps(speed, indent=2))
    lines += ["## Speed per exit", "", "```", bench_table(speed), "```", ""]
    plot(speed, quality, str(out / "quality_vs_speed.png"))
    lines += ["![quality against speed](quality_vs_speed.png)", ""]

    _say("3/3 a greedy sample at every exit")
    tokenizer = model.tokenizer
    inputs = model.encode(prompt, chat=True)
    lines += ["## Samples", "", f"Prompt: {prompt!r}, greedy, {max_new_tokens} new tokens.", "",
              "| exit | cost | tokens/s | text |", "|---|---|---|---|"]
    for exit_layer in [*model.exits, None]:
        start = time.perf_counter()
        output = model.generate(**inputs, exit_layer=exit_layer, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        new = output.sequences[0, inputs["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).replace("\n", " ").strip()
        name = label(exit_layer)
        print(f"{name:>6} | {len(new) / seconds:6.1f} tok/s | {text}")
        cell = text.replace("|", "\\|")  # a markdown table cell
        lines.append(f"| {name} | {model.costs.relative(output.exit_layer):.2f} | {len(new) / seconds:.1f} | {cell} |")
    lines += ["", f"Written in {time.perf_counter() - started:.0f} s."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _say(f"report: {report}, plot: {out / 'quality_vs_speed.png'}")
    return report
