"""GLUE by log-likelihood: `python evaluate.py glue TASK DIR --model-path M` reads the task's TSV
files as downloaded (SST-2/dev.tsv, CoLA/dev.tsv, ...), asks a short question per example and
picks the label word the model finds most likely (evals/classify.py), reported with the task's
official metric. TASK as Hugging Face's `glue` configs name them; several with commas, or all.
"""
import csv
import re
import sys
from pathlib import Path

from data import cli_main
from evals import classify
from evals.classify import Item, Task, label_index

YES_NO = [" no", " yes"]
TRUE_FALSE = [" True", " False"]
FIELDS = re.compile(r"{(\w+)}")  # the column names a template uses
SPLITS = {"dev": "dev.tsv", "train": "train.tsv"}
COLA = ("source", "label", "original_label", "sentence")  # CoLA's files have no header
MRPC = ("label", "id1", "id2", "sentence1", "sentence2")  # its header's names ("#1 String") renamed
PAIR = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"


def read_tsv(path: Path, columns: tuple[str, ...] | None = None, header: bool = True,
             skip_bad: bool = False) -> list[tuple[int, dict]]:
    """(line number, {column: text}) per row, columns named by the header row unless `columns`
    names them. GLUE's files are tab-separated with no quoting: quotes are ordinary text.
    A row with the wrong number of columns is an error, or skipped with `skip_bad` (QQP's train
    file has a few broken rows, which the usual GLUE readers skip too)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a UTF-8 TSV file ({e.__class__.__name__})") from None
    names = columns or (rows[0] if rows else [])
    out = []
    for n, row in enumerate(rows[int(header):], int(header) + 1):
        if len(row) != len(names) and skip_bad:
            continue
        if len(row) != len(names):
            raise ValueError(f"{path}:{n}: expected {len(names)} tab-separated columns, "
                             f"got {len(row)}")
        out.append((n, dict(zip(names, row))))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def tsv_task(name: str, folder: str, template: str, options: list[str], labels: list,
             metrics: tuple[str, ...], label_column: str = "label", files: dict | None = None,
             columns: tuple[str, ...] | None = None, header: bool = True,
             skip_bad: bool = False) -> Task:
    """A task whose rows fill `template` with their columns and whose label picks the option."""
    def read(path: Path) -> list[Item]:
        rows = read_tsv(path, columns, header, skip_bad)
        missing = {label_column, *FIELDS.findall(template)} - set(rows[0][1])
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)} (is this the {name} file?)")
        return [Item(template.format(**row), list(options),
                     label_index(labels, row[label_column], f"{path}:{n}"))
                for n, row in rows]
    return Task(name, folder, files or SPLITS, read, labels, metrics)


def read_stsb(path: Path) -> list[Item]:
    """STS-B: the options are the scores " 0" .. " 5"; the answer is the gold score itself."""
    items = []
    for n, row in read_tsv(path):
        try:
            score = float(row["score"])
            context = PAIR.format(**row)
        except (KeyError, ValueError):
            raise ValueError(f"{path}:{n}: expected sentence1, sentence2 and a numeric score") \
                from None
        items.append(Item(context + "Question: On a scale of 0 to 5, how similar are "
                          "the two sentences?\nAnswer:", [f" {i}" for i in range(6)], score))
    return items


NLI = "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"
MNLI = "{sentence1}\nQuestion: {sentence2} True, False or Neither?\nAnswer:"
MNLI_LABELS = ["entailment", "neutral", "contradiction"]

TASKS = {t.name: t for t in (
    tsv_task("cola", "CoLA", "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:",
             YES_NO, [0, 1], ("mcc",), columns=COLA, header=False),
    tsv_task("sst2", "SST-2", "{sentence}\nQuestion: Is this sentence positive or negative?\n"
             "Answer:", [" negative", " positive"], [0, 1], ("acc",)),
    tsv_task("mrpc", "MRPC", PAIR + "Question: Do both sentences mean the same thing?\nAnswer:",
             YES_NO, [0, 1], ("acc", "f1"), columns=MRPC),
    tsv_task("qqp", "QQP", "Question 1: {question1}\nQuestion 2: {question2}\n"
             "Question: Do both questions ask the same thing?\nAnswer:", YES_NO, [0, 1],
             ("acc", "f1"), "is_duplicate", skip_bad=True),
    Task("stsb", "STS-B", SPLITS, read_stsb, list(range(6)), ("pearson", "spearman")),
    tsv_task("mnli", "MNLI", MNLI, [" True", " Neither", " False"], MNLI_LABELS, ("acc",),
             "gold_label", {"dev": "dev_matched.tsv", "train": "train.tsv"}),
    tsv_task("mnli_mismatched", "MNLI", MNLI, [" True", " Neither", " False"], MNLI_LABELS,
             ("acc",), "gold_label", {"dev": "dev_mismatched.tsv", "train": "train.tsv"}),
    tsv_task("qnli", "QNLI", "{question}\n{sentence}\n"
             "Question: Does this response answer the question?\nAnswer:", [" yes", " no"],
             ["entailment", "not_entailment"], ("acc",)),
    tsv_task("rte", "RTE", NLI, TRUE_FALSE, ["entailment", "not_entailment"], ("acc",)),
    tsv_task("wnli", "WNLI", NLI, TRUE_FALSE, [1, 0], ("acc",)),
)}


def build_parser():
    return classify.build_parser("GLUE", TASKS, __doc__)


def main(argv=None) -> None:
    classify.main("GLUE", TASKS, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
