"""``memjax mia icl``: membership inference against a prompted causal LM.

The data is a JSON Lines file of labelled texts (``text`` and ``label`` fields; an ``id``
field is kept when present). ``--prompts`` M disjoint sets of ``--k`` demonstrations are
drawn at random (``--seed``); every example is queried under every prompt, and scored by
the probability of its correct label under its own prompt (single-prompt attack; the
demonstrations are the members) and under the average of the M prompts' label
distributions (the ensemble mitigation; Duan et al. 2023, "On the privacy risk of
in-context learning"). Writes ``scores.parquet`` (id, member, prompt, label, both scores,
the ensemble's prediction), ``metrics.json`` (AUC of both attacks, task accuracy on the
non-members) and ``index.html``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from memjax.errors import InputError

TITLE = "Membership inference against a prompted LM (in-context learning)"


def register(attacks: Any) -> None:
    """Add ``memjax mia icl`` to ``memjax mia``'s subcommands."""
    from memjax.cli._common import positive_int, results_folder
    from memjax.mia import ICL_NORMALIZATIONS

    cmd = attacks.add_parser("icl", help="membership inference against a prompted LM "
                             "(demonstrations in the prompt), single prompt vs an ensemble",
                             description=__doc__.split("\n\n")[1].replace("\n", " "))
    cmd.add_argument("--model", required=True, help="causal LM folder (Hugging Face "
                     "checkpoint, memjax convert or memjax.train output) with its tokenizer")
    cmd.add_argument("--data", required=True, help="jsonl:FILE of labelled texts")
    cmd.add_argument("--text-field", default="text", help="the text field (default text)")
    cmd.add_argument("--label-field", default="label", help="the label field (default "
                     "label): a label word of --labels, or its index")
    cmd.add_argument("--labels", nargs="+", help="the label words (verbalizers) in class "
                     "order; default: the data's distinct string labels, sorted")
    cmd.add_argument("--query", default="Text: {text}\\nTopic:", help="the query template, "
                     "with a {text} field (\\n and \\t are read as newline and tab)")
    cmd.add_argument("--answer", default=" {label}", help="the answer template, with a "
                     "{label} field (default ' {label}')")
    cmd.add_argument("--separator", default="\\n\\n", help="written after each "
                     "demonstration (default a blank line)")
    cmd.add_argument("--k", type=positive_int, default=4,
                     help="demonstrations per prompt (default 4)")
    cmd.add_argument("--prompts", type=positive_int, default=4,
                     help="M prompts with disjoint demonstrations, ensembled (default 4)")
    cmd.add_argument("--normalize", choices=ICL_NORMALIZATIONS, default="labels",
                     help="labels: probability vector over the label words (the paper's, "
                     "default); none: each label's probability under the whole vocabulary")
    cmd.add_argument("--seed", type=int, default=0, help="draws the demonstration sets")
    cmd.add_argument("--batch-size", type=positive_int, default=8,
                     help="(prompt, query) pairs per batch (default 8)")
    cmd.add_argument("--out", type=results_folder, default="memjax-mia-icl",
                     help="results folder (new, empty, or an earlier report to replace)")
    cmd.add_argument("--no-progress", action="store_true")
    cmd.set_defaults(run=cmd_icl)


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line as newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def read_labelled(spec: str, text_field: str, label_field: str
                  ) -> tuple[np.ndarray, list[str], list[Any]]:
    """(ids [N], texts, labels) of a ``jsonl:FILE``; refused naming the file and line."""
    if not spec.startswith("jsonl:"):
        raise InputError(f"--data {spec!r}: expected jsonl:FILE (labelled texts)")
    path = Path(spec.removeprefix("jsonl:"))
    if not path.is_file():
        raise InputError(f"--data {spec!r}: no such file")
    ids, texts, labels = [], [], []
    with path.open(encoding="utf-8") as file:
        for line_no, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"--data {path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object")
            text = record.get(text_field)
            if not isinstance(text, str):
                raise InputError(f"{where}: no string field {text_field!r} (--text-field)")
            if label_field not in record:
                raise InputError(f"{where}: no field {label_field!r} (--label-field)")
            label = record[label_field]
            if not isinstance(label, str | int) or isinstance(label, bool):
                raise InputError(f"{where}: label {label!r} is not a string or integer")
            ids.append(record.get("id", len(ids)))
            texts.append(text)
            labels.append(label)
    if not texts:
        raise InputError(f"--data {spec!r}: no examples")
    id_array = np.asarray(ids)
    if id_array.dtype == object:
        id_array = np.asarray([str(i) for i in ids])
    return id_array, texts, labels


def label_words(labels: list[Any], given: list[str] | None) -> tuple[str, ...]:
    """--labels, else the data's distinct string labels (sorted)."""
    if given:
        return tuple(given)
    if not all(isinstance(label, str) for label in labels):
        raise InputError("--labels: the data has integer labels; name the label words "
                         "with --labels")
    return tuple(sorted(set(labels)))


def cmd_icl(args: argparse.Namespace) -> int:
    from memjax.cli._common import load_model, print_metrics, write_results
    from memjax.mia import PromptTemplate, draw_demonstration_sets, icl_membership

    ids, texts, labels = read_labelled(args.data, args.text_field, args.label_field)
    template = PromptTemplate(labels=label_words(labels, args.labels),
                              query=unescape(args.query), answer=unescape(args.answer),
                              separator=unescape(args.separator))
    sets = draw_demonstration_sets(len(texts), args.k, args.prompts, args.seed)
    model = load_model(args.model, "--model", "causal_lm", "a causal LM")
    result = icl_membership(model, texts, labels, template, sets, normalize=args.normalize,
                            batch_size=args.batch_size, progress=not args.no_progress)
    scores = result.metrics()
    table = {"id": ids, "member": result.is_member, "prompt": result.prompt_index,
             "label": result.labels, "single_prompt_score": result.single_prompt,
             "ensemble_score": result.ensemble,
             "ensemble_prediction": result.ensemble_prediction}
    m = args.prompts
    metrics: list[tuple[str, Any]] = [
        ("model", model.name), ("examples", len(texts)), ("members", int(result.is_member.sum())),
        ("k demonstrations", args.k), ("prompts", m), ("normalize", args.normalize),
        ("AUC (single prompt)", scores["auc_single_prompt"]),
        (f"AUC (ensemble of {m} prompts)", scores["auc_ensemble"]),
        ("accuracy on non-members (single prompt)", scores["accuracy_single_prompt"]),
        (f"accuracy on non-members (ensemble of {m} prompts)", scores["accuracy_ensemble"])]
    text = ("Membership inference against a prompted causal LM (Duan et al. 2023, 'On the "
            "privacy risk of in-context learning'): the members are the demonstrations of "
            f"{m} prompts with {args.k} disjoint demonstrations each; a candidate's score is "
            "its correct label's probability under its own prompt (non-members: a prompt "
            "assigned round-robin), and under the average of the prompts' label "
            "distributions (the ensemble mitigation). Accuracy is the task utility on the "
            "non-members.")
    folder = write_results(args.out, TITLE, text, table, metrics)
    print_metrics(metrics, folder)
    return 0
