"""An artifact's model card (README.md): what it is, how it was made, how good it is.

`save_pretrained` writes one beside the weights, as peft and transformers do: YAML front matter
the Hugging Face hub reads (`library_name`, `base_model`, `license`, `tags`), then Markdown
sections, each between two HTML comments that name it (`<!-- balcony:exits -->` ...
`<!-- /balcony:exits -->`), so one of them can be rewritten and the rest kept: `balcony eval
--card` replaces the evaluation figures it measured, part by part (each held-out text, the
downstream tasks, the speed). Nothing time-dependent goes in: the same artifact, the same
training record and the same figures give the same card, byte for byte.

A README.md balcony did not write (no section comments in it) is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..default import DEFAULT_NAME, NAMED_BASES, RESOURCES, artifact_path
from .config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig
from .errors import ArtifactError

CARD_NAME = "README.md"
_OPEN, _CLOSE = "<!-- balcony:{} -->", "<!-- /balcony:{} -->"
_ANY_SECTION = re.compile(r"<!-- balcony:([\w/.:-]+) -->")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][\w./-]*$")
EVALUATION = "evaluation"
NOT_MEASURED = ("Not measured yet. `balcony eval FOLDER --data HELD_OUT_TEXT --card` (and `--tasks table1 --card`) "
                "writes the figures it measures here.")
INIT_WORDS = {"copy": "a copy of the base's last decoder layer and its final norm (the paper's init)",
              "next": "copies of the base layers right after the exit (the trunk continued) and its final norm",
              "random": "randomly initialised decoder layers and unit norms"}


@dataclass
class ExitFacts:
    """One exit as the card's table shows it."""

    exit: int
    layers: int  # decoder layers in its balcony (0: none, e.g. a LayerSkip exit)
    parameters: int  # trainable parameters it adds
    relative_cost: float  # per-token FLOPs as a fraction of the full model's


@dataclass
class Training:
    """What a training run tells the card about itself."""

    data: str  # what was read, in words
    tokens: int | None = None  # tokens read (steps x tokens per step)
    steps: int | None = None
    method: str = "balcony"  # `balcony train --method`
    continued_from: str | None = None  # --init-from: the artifact the balconies started from
    loss: dict = field(default_factory=dict)  # the loss options, by `balcony train`'s flat names
    options: dict = field(default_factory=dict)  # optimiser, precision, seed, ...: by the same names
    validation: dict | None = None  # the run's last validation: "kl/E" and "agreement/E" per exit E


# ----------------------------------------------------------------------------- the text


def front_matter(meta: dict) -> str:
    """A YAML block of strings and lists of strings (None values left out), as the hub reads it."""
    lines = ["---"]
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines += [f"{key}:", *(f"- {_yaml(v)}" for v in value)]
        else:
            lines.append(f"{key}: {_yaml(value)}")
    return "\n".join([*lines, "---"])


def _yaml(value) -> str:
    text = str(value)
    return text if _PLAIN_YAML.match(text) else json.dumps(text)  # a JSON string is a YAML string


def wrap(name: str, body: str) -> str:
    """`body` between the comments that name section `name`."""
    return f"{_OPEN.format(name)}\n{body.strip()}\n{_CLOSE.format(name)}"


def _span(text: str, name: str) -> tuple[int, int] | None:
    """Where section `name` sits in `text`: from its opening comment to the end of its closing one."""
    start, end = text.find(_OPEN.format(name)), text.find(_CLOSE.format(name))
    return None if start < 0 or end < start else (start, end + len(_CLOSE.format(name)))


def section(text: str, name: str) -> str | None:
    """The body of section `name` in `text`, or None when it has none."""
    span = _span(text, name)
    return None if span is None else text[span[0] + len(_OPEN.format(name)):span[1] - len(_CLOSE.format(name))].strip()


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with section `name` holding `body`: in its place, or appended when it has none."""
    span = _span(text, name)
    if span is None:
        return text.rstrip("\n") + "\n\n" + wrap(name, body) + "\n"
    return text[:span[0]] + wrap(name, body) + text[span[1]:]


def render(meta: dict, title: str, intro: str, sections: list[tuple[str, str]]) -> str:
    """A whole card: front matter, title, intro, then each (name, body) section in order."""
    parts = [front_matter(meta), f"# {title}", intro.strip(), *(wrap(name, body) for name, body in sections)]
    return "\n\n".join(parts) + "\n"


def is_ours(text: str) -> bool:
    return bool(_ANY_SECTION.search(text))


# ----------------------------------------------------------------------------- reading and writing


def read_card(directory: str | os.PathLike) -> str | None:
    """The card balcony wrote in `directory`, or None when there is none; a README.md written by
    someone else is refused (ArtifactError), never taken over."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return None
    text = path.read_text()
    if not is_ours(text):
        raise ArtifactError(f"{path} was not written by balcony (it has no `<!-- balcony:... -->` sections): it is "
                            f"left as it is; move it aside to let balcony write the model card")
    return text


def write_card(directory: str | os.PathLike, text: str) -> bool:
    """Write README.md atomically (a temporary file, then a rename); a README.md balcony did not
    write is kept, with a warning, and False returned."""
    path = Path(directory) / CARD_NAME
    if path.is_file() and not is_ours(path.read_text()):
        warnings.warn(f"{path} was not written by balcony: kept as it is, no model card written", stacklevel=3)
        return False
    tmp = path.with_name(CARD_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def card_folder(artifact: str | os.PathLike | None) -> Path:
    """The artifact folder whose card `balcony eval --card` may rewrite, or a clear refusal: the
    shipped `default` (and anything inside the installed package), no artifact, a folder that is
    no artifact, one this user cannot write, or one whose README.md balcony did not write."""
    if artifact is None:
        raise ArtifactError("--card writes into a saved artifact's model card: name the artifact folder "
                            "(fresh balconies have no card)")
    if str(artifact) == DEFAULT_NAME:
        raise ArtifactError("--card: `default` is the shipped artifact inside the installed package, whose card is "
                            "not rewritten; save a copy (BalconyModel.from_pretrained('default').save_pretrained(FOLDER)) "
                            "and evaluate that")
    directory = artifact_path(artifact)
    if directory.resolve().is_relative_to(RESOURCES.resolve()):
        raise ArtifactError(f"--card: {directory} is inside the installed package; save a copy and evaluate that")
    if not (directory / CONFIG_NAME).is_file():
        raise ArtifactError(f"--card: {directory} holds no {CONFIG_NAME}: it is no saved artifact")
    if not os.access(directory, os.W_OK):
        raise ArtifactError(f"--card: {directory} is not writable by this user; save a copy and evaluate that")
    read_card(directory)  # refuses a README.md written by someone else, before any evaluation runs
    return directory


# ----------------------------------------------------------------------------- the base


@dataclass
class BaseFacts:
    """What a card says about an artifact's base."""

    hub_id: str | None  # its id on the Hugging Face hub, when known
    licence: str | None  # as the hub's `license` field spells it, when known
    words: str  # the base in words
    short: str  # a short name, for the title


def base_facts(base_model: str | None) -> BaseFacts:
    """The facts of an artifact's recorded base. The licence comes from a named base's record, or
    a local base folder's own model card."""
    if not base_model:
        return BaseFacts(None, None, "a base model given as an object (its name was not recorded)", "a base model")
    named = NAMED_BASES.get(base_model)
    if named is not None:
        return BaseFacts(named.hub_id, named.licence, f"{named.hub_id or named.source} (balcony's `{named.name}` base)",
                         named.hub_id or named.name)
    path = Path(base_model)
    if path.is_dir() or path.is_absolute():
        return BaseFacts(None, _card_licence(path / CARD_NAME), f"a local checkpoint, `{path.name}`", path.name)
    hub_id = base_model if _HUB_ID.match(base_model) else None
    return BaseFacts(hub_id, None, f"`{base_model}`", base_model)


def _card_licence(path: Path) -> str | None:
    """The `license:` of a model card's front matter, if it has one."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    found = re.search(r"^license:\s*(\S+)\s*$", text.split("\n---", 1)[0], re.MULTILINE)
    return found.group(1).strip("'\"") if found else None


def licence_body(licence: str | None, derived: str, hub_id: str | None = None) -> str:
    """The licence section: the base's terms apply to what is derived from its weights."""
    where = f" (https://huggingface.co/{hub_id})" if hub_id else ""
    if licence is None:
        return (f"{derived} derived from the base model's weights, so its terms apply: see the base model's "
                f"licence{where}.")
    return f"{derived} derived from the base model's weights, so its licence applies: `{licence}`{where}."


# ----------------------------------------------------------------------------- the balcony card


def balcony_card(config: BalconyConfig, exits: list[ExitFacts], *, base_parameters: int,
                 training: Training | None = None, evaluation: dict[str, str] | None = None) -> str:
    """The card of a balcony artifact: base, exits, training, evaluation, licence, use and limits."""
    base = base_facts(config.base_model)
    meta = {"library_name": "balcony", "base_model": base.hub_id,
            "base_model_relation": "adapter" if base.hub_id else None, "license": base.licence,
            "tags": ["balcony", "early-exit", "elastic-depth", "self-distillation", *(
                ["depth-pruning"] if training is not None and training.method == "pruned" else [])]}
    costs = " / ".join(f"{row.relative_cost:.2f}" for row in exits)
    intro = (f"Balconies for {base.words}: small trainable exit layers (Balcony, EMNLP 2025) attached to the frozen "
             f"base at exits {', '.join(str(row.exit) for row in exits)} of its {config.num_layers} decoder layers. "
             f"Generating at an exit costs {costs} of the full model's FLOPs per token; the full model is the base, "
             "unchanged. This folder holds the balconies only (like a peft adapter): `balcony` loads them onto the "
             "base.")
    sections = [("base", _base_body(config, base.words, base_parameters)),
                ("exits", _exits_body(config, exits, base_parameters)),
                ("training", training_body(training) if training else _untrained_body(config)),
                (EVALUATION, evaluation_body(evaluation or {})),
                ("licence", "## Licence\n\n" + licence_body(base.licence, "The balconies are", base.hub_id)),
                ("use", _use_body(config))]
    return render(meta, f"Balconies for {base.short}", intro, sections)


def model_card(model, state_dict: dict | None = None, training: Training | None = None,
               evaluation: dict[str, str] | None = None) -> str:
    """The card of a `BalconyModel`'s balconies (`state_dict`: the tensors being saved, if not its own)."""
    config = model.balcony_config
    state = model.balconies.state_dict() if state_dict is None else state_dict
    exits = [ExitFacts(e, config.layers_at(e), sum(t.numel() for k, t in state.items() if k.split(".", 1)[0] == str(e)),
                       model.costs.relative(e)) for e in config.exits]
    return balcony_card(config, exits, base_parameters=sum(p.numel() for p in model.base.parameters()),
                        training=training, evaluation=evaluation)


def _base_body(config: BalconyConfig, base_words: str, base_parameters: int) -> str:
    shape = config.base_shape
    recorded = "" if not config.base_model or Path(config.base_model).is_absolute() else f"; recorded as `{config.base_model}` in `{CONFIG_NAME}`"
    lines = [f"- Base: {base_words}{recorded}",
             f"- Architecture: `{shape.get('model_type', '?')}`, {config.num_layers} decoder layers, hidden size "
             f"{shape.get('hidden_size', '?')}, vocabulary {shape.get('vocab_size', 0):,}; {base_parameters:,} parameters",
             f"- Weight fingerprint: `{config.base_fingerprint}` (the balconies load only onto a base with these "
             "weights; `verify_base=False` / `--no-verify-base` skips the check for one you know is compatible)",
             f"- Files: `{WEIGHTS_NAME}` (the balconies) and `{CONFIG_NAME}` (exits, base, and the weights' sha256, "
             "checked on load); the base is not stored here"]
    return "## Base model\n\n" + "\n".join(lines)


def exits_table(exits: list[ExitFacts], base_parameters: int, num_layers: int, layer_word: str = "balcony layers",
                full: ExitFacts | None = None) -> str:
    """The exits as a Markdown table, with the full model's row last (`full`: its figures; none trained by default)."""
    rows = [f"| exit | depth | {layer_word} | trainable parameters | % of base | relative cost |",
            "|---|---|---|---|---|---|"]
    for row in [*exits, full or ExitFacts(num_layers, 0, 0, 1.0)]:
        name = "full" if row.exit == num_layers else str(row.exit)
        rows.append(f"| {name} | {row.exit / num_layers:.2f} | {row.layers} | {row.parameters:,} | "
                    f"{100 * row.parameters / base_parameters:.2f}% | {row.relative_cost:.2f} |")
    return "\n".join(rows)


def _exits_body(config: BalconyConfig, exits: list[ExitFacts], base_parameters: int) -> str:
    total = sum(row.parameters for row in exits)
    return "\n\n".join([
        "## Exits",
        "Exit *e* runs the base's first *e* decoder layers, then the balcony at *e* (its own decoder layers and "
        "final norm), then the base's shared LM head; the layers past the exit never run.",
        exits_table(exits, base_parameters, config.num_layers),
        f"Depth: the exit as a fraction of the {config.num_layers} layers. Relative cost: per-token FLOPs of the "
        f"exit (its layers and the head) as a fraction of the full model's. Trainable parameters in all: {total:,} "
        f"({100 * total / base_parameters:.2f}% of the base). Init of fresh balconies: `{config.init}`, "
        f"{INIT_WORDS[config.init]}."])


def _untrained_body(config: BalconyConfig) -> str:
    return ("## Training\n\nNo training run is recorded with this artifact (it was saved outside `balcony train`). "
            f"Fresh balconies start as {INIT_WORDS[config.init]}; `balcony train` records its data, tokens, loss "
            "and options here.")


METHOD_WORDS = {
    "balcony": "Self-distillation: the base stays frozen and is the teacher; only the balconies train, each to "
               "match the full model's next-token distribution at its exit.",
    "pruned": "Depth pruning with healing, by self-distillation: exit *e* keeps the first *e* base layers (frozen) "
              "and trains a copy of base layer *e* and of the final norm to match the full model.",
    "layerskip": "LayerSkip-style training by self-distillation: every parameter of a copy of the base trains, with "
                 "layer dropout, against the frozen original model at every exit and at the last layer.",
}


def training_body(training: Training) -> str:
    """The training section: method, data, tokens, loss, options and the run's last validation."""
    lines = [f"- Data: {training.data}"]
    if training.tokens is not None:
        per_step = (f" ({training.steps:,} step{'s' * (training.steps != 1)} of {training.tokens // training.steps:,} "
                    "tokens)") if training.steps else ""
        lines.append(f"- Tokens read: {training.tokens:,}{per_step}")
    if training.continued_from:
        lines.append(f"- Continued from: `{training.continued_from}` (trained balconies, not fresh ones)")
    lines.append(f"- Loss: {loss_words(training.loss)}")
    options = {**training.loss, **training.options}
    if options:
        lines.append("- Options: " + ", ".join(f"`{k}={_option(v)}`" for k, v in sorted(options.items())))
    parts = ["## Training", METHOD_WORDS.get(training.method, f"Method `{training.method}`."), "\n".join(lines)]
    if training.validation:
        parts.append(_validation_table(training.validation))
    return "\n\n".join(parts)


def _option(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def loss_words(loss: dict) -> str:
    """The loss in words, from the loss options (`balcony train`'s names; missing ones: defaults)."""
    top = loss.get("kl_topk", 0)
    kl = ("KL(full model || exit) over the whole vocabulary (exact)" if not top else
          f"sparse KL(full model || exit): the teacher's top {top} tokens and its remaining mass"
          + (f", {loss.get('kl_tail_samples')} ids a token drawn from that remainder" if loss.get("kl_tail_samples")
             else ""))
    weights = loss.get("exit_weights")
    words = [kl, "exits weighted " + " / ".join(str(w) for w in weights) if weights else "mean over the exits"]
    extra = {"ce_weight": "cross-entropy against the data", "top1_weight": "cross-entropy against the teacher's "
             "top-1 token", "recall_weight": "extra weight on in-context recall tokens"}
    words += [f"{what} (weight {loss[name]})" for name, what in extra.items() if loss.get(name)]
    return "; ".join(words)


def _validation_table(validation: dict) -> str:
    exits = sorted({int(k.split("/")[1]) for k in validation if k.startswith("kl/")})
    rows = ["The run's last validation, on held-out rows of its training data (KL in nats per token; agreement: "
            "top-1 agreement with the full model):", "", "| exit | KL | agreement |", "|---|---|---|"]
    rows += [f"| {e} | {validation[f'kl/{e}']:.3f} | {validation.get(f'agreement/{e}', float('nan')):.3f} |"
             for e in exits]
    return "\n".join(rows)


def _use_body(config: BalconyConfig) -> str:
    name = DEFAULT_NAME if config.base_model == DEFAULT_NAME else "path/to/this/folder"
    exits = ", ".join(str(e) for e in config.exits)
    return "\n\n".join([
        "## Intended use and limits",
        f"Use: cheaper generation from the base at a chosen depth (exits {exits}, or a compute `budget`), a draft "
        "model for speculative decoding of the full model, or per-token dynamic exits; the full model stays "
        "available from the same weights.",
        f"```python\nfrom balcony import BalconyModel\n\nmodel = BalconyModel.from_pretrained({name!r})  # loads the "
        f"recorded base too (or pass base=...)\nout = model.generate(**model.encode(\"Hello\", chat=True), exit_layer={config.exits[-1]}, "
        "max_new_tokens=32)\n```",
        "Limits: an exit approximates the full model it was distilled from, so it inherits the base's limits, "
        "biases and licence terms and adds errors of its own: shallower exits agree less often with the full model, "
        "and tasks that need recall over a long context suffer most. The figures above hold for the text and tasks "
        "named there only. The balconies are useful only on the recorded base (the fingerprint above); on any other "
        "base they are refused."])


# ----------------------------------------------------------------------------- evaluation figures


def evaluation_body(parts: dict[str, str], empty: str = NOT_MEASURED) -> str:
    """The evaluation section from its parts (name -> Markdown): held-out texts by name, then the
    downstream tasks, then the speed; `empty`, saying how to measure, when there are none."""
    order = sorted(parts, key=lambda name: (name == "speed", name == "downstream"))  # held-out texts as added
    body = "\n\n".join(wrap(f"{EVALUATION}/{name}", parts[name]) for name in order)
    return "## Evaluation\n\n" + (body or empty)


def with_evaluation(text: str, parts: dict[str, str]) -> str:
    """`text` with these evaluation parts added or replaced, the other parts kept."""
    current = section(text, EVALUATION) or ""
    kept = {name.split("/", 1)[1]: section(current, name) or ""
            for name in _ANY_SECTION.findall(current) if name.startswith(EVALUATION + "/")}
    return replace_section(text, EVALUATION, evaluation_body({**kept, **parts}))


def evaluation_parts(report: dict, data: str | None = None) -> dict[str, str]:
    """Card parts from a `balcony eval --json` report: held-out figures (named by the text's file
    name), downstream figures, or both."""
    parts = {}
    if "exits" in report:
        name = Path(data).name if data else "held-out text"
        parts["heldout:" + re.sub(r"[^\w.-]+", "-", name)] = heldout_part(report, name)
    downstream = report.get("downstream", report if "rows" in report else None)
    if downstream is not None:
        parts["downstream"] = downstream_part(downstream)
    return parts


def heldout_part(report: dict, name: str) -> str:
    """Per-exit KL, agreement and perplexity on a held-out text, beside the untrained baselines."""
    rows = ["| exit | cost | KL | agreement | perplexity | early exit: agreement | truncation: agreement |",
            "|---|---|---|---|---|---|---|"]
    for row in report["exits"]:
        b = row["balcony"]
        rows.append(f"| {row['exit']} | {row['relative_cost']:.2f} | {b['kl']:.3f} | {b['agreement']:.3f} | "
                    f"{b['perplexity']:.2f} | {row['early_exit']['agreement']:.3f} | "
                    f"{row['truncation']['agreement']:.3f} |")
    return "\n\n".join([
        f"### Held-out text: `{name}`",
        f"{report['tokens']:,} tokens ({report['sequences']} sequences of {report['seq_len']}); the full model's "
        f"perplexity {report['full']['perplexity']:.2f}. KL is KL(full model || exit) in nats per token; agreement "
        "is top-1 agreement with the full model. The baselines are untrained exits at the same depth: early exit "
        "(the base's final norm and head after layer *e*) and truncation (as many base layers as the exit runs, "
        "then the final norm).",
        "\n".join(rows)])


def downstream_part(report: dict) -> str:
    """Accuracy per task for every method at every exit, with the average and the share kept."""
    tasks, core = report["tasks"], report["average_of"]
    rows = ["| method | exit | cost | " + " | ".join(tasks) + " | average | kept | kept above chance |",
            "|---|---|---|" + "---|" * (len(tasks) + 3)]
    for row in report["rows"]:
        cells = " | ".join(f"{100 * row['accuracy'][t]:.1f}" for t in tasks)
        rows.append(f"| {row['method']} | {row['exit'] if row['exit'] is not None else 'full'} | {row['cost']:.2f} | "
                    f"{cells} | {100 * row['average']:.1f} | {100 * row['kept']:.1f}% | "
                    f"{100 * row['kept_above_chance']:.1f}% |")
    documents = ", ".join(f"{t} {report['documents'][t]:,}" for t in tasks if t in report.get("documents", {}))
    return "\n\n".join([
        "### Downstream tasks",
        f"Accuracy in % (`{report.get('metric', {}).get('hellaswag', 'acc_norm')}` for HellaSwag, `acc` for the "
        f"rest); average over {', '.join(core)}; kept: the average as a share of the full model's; kept above "
        f"chance: the same above the chance average. Cost: per-token cost relative to the full model "
        f"({report.get('cost_source', 'flops')}). Documents: {documents or 'see the report'}"
        + (f" (at most {report['limit']} per task)." if report.get("limit") else "."),
        "\n".join(rows)])


def speed_part(bench: dict) -> str:
    """Decode speed per exit from a `balcony bench --json` report (batch 1), beside the FLOP-ideal."""
    settings = bench.get("settings", {})
    rows = ["| exit | decode tokens/s (batch 1) | ms per token | speedup | FLOP-ideal speedup |", "|---|---|---|---|---|"]
    for row in bench["rows"]:
        if row["exit"] == "plain":
            continue
        rows.append(f"| {row['exit']} | {row['decode_tokens_per_second']['1']:.1f} | {row['ms_per_token']['1']:.1f} | "
                    f"{row['speedup']['1']:.2f}x | {row['ideal_speedup']:.2f}x |")
    where = ", ".join(f"{k} {settings[k]}" for k in ("device", "dtype", "threads") if k in settings)
    return "\n\n".join(["### Speed", f"`balcony bench` ({where}; median of {settings.get('repeats', '?')} rounds; "
                        f"prompt {settings.get('prompt_len', '?')} tokens, {settings.get('new_tokens', '?')} new "
                        "tokens). Speed depends on the machine: these figures are one machine's.", "\n".join(rows)])
