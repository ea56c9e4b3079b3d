"""lm-evaluation-harness at any exit, without forking it.

    python -m balcony.evaluation.harness --model balcony --model_args artifact=DIR,exit_layer=15 --tasks arc_easy

is lm-eval's own command line with balcony's model types registered (the plain `lm_eval` script
does not import third-party model types); it is also installed as `balcony-lm-eval`.
`model_args` takes `artifact` (or `model` for fresh balconies on a base), `exit_layer` (a number
or `full`) or `budget`, and any `HFLM` option (batch_size, max_length, ...). `balcony eval
ARTIFACT --tasks ...` sweeps every exit and both baselines in one pass instead
(`balcony.evaluation.downstream`).

The sub-model is lm-eval's ordinary Hugging Face backend (`HFLM`) run on the exit model (an
object of the base's own class), so loglikelihood, rolling perplexity and generation tasks all
work; the model type itself is `lm_eval_adapter.BalconyLM`.
"""

from __future__ import annotations

from .lm_eval_adapter import command_line


def main() -> None:
    command_line()


if __name__ == "__main__":
    main()
