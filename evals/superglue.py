"""SuperGLUE by log-likelihood: `python evaluate.py superglue TASK DIR --model-path M` reads the
task's JSONL files as downloaded (BoolQ/val.jsonl, CB/val.jsonl, ...), turns each example into a
prompt and candidate continuations, and picks the most likely (evals/classify.py). TASK as
Hugging Face's `super_glue` configs name them; several joined by commas, or all.
"""
import sys
from pathlib import Path
from typing import Callable

from data import cli_main
from evals import classify
from evals.classify import Item, Task, label_index
from evals.humaneval import read_jsonl  # the same JSONL reader, errors naming file and line

YES_NO = [" no", " yes"]
SPLITS = {"dev": "val.jsonl", "train": "train.jsonl"}


def jsonl_task(name: str, folder: str, build: Callable[[dict], tuple[str, list[str]]],
               labels: list, metrics: tuple[str, ...]) -> Task:
    """A task with one example a line: build(row) gives (context, options); `label` picks one."""
    def read(path: Path) -> list[Item]:
        items = []
        for n, row in read_jsonl(path):
            try:
                context, options = build(row)
                answer = label_index(labels, row["label"], f"{path}:{n}")
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                raise ValueError(f"{path}:{n}: not a {name} example (no {e})") from None
            items.append(Item(context, options, answer))
        if not items:
            raise ValueError(f"{path}: no examples")
        return items
    return Task(name, folder, SPLITS, read, labels, metrics)


def copa(row: dict) -> tuple[str, list[str]]:
    """The premise, then "because" (cause) or "therefore" (effect), then each choice as the
    continuation, its first letter lowercased to continue the sentence."""
    link = {"cause": " because", "effect": " therefore"}[row["question"]]
    choices = [row["choice1"], row["choice2"]]
    return row["premise"].rstrip(".") + link, [" " + c[:1].lower() + c[1:] for c in choices]


def read_multirc(path: Path) -> list[Item]:
    """One item per candidate answer (yes: correct); answers of a question share a group."""
    items = []
    for n, row in read_jsonl(path):
        try:
            passage = row["passage"]
            for q in passage["questions"]:
                for a in q["answers"]:
                    context = (f"{passage['text']}\nQuestion: {q['question']}\n"
                               f"Candidate answer: {a['text']}\n"
                               "Is the candidate answer correct?\nAnswer:")
                    items.append(Item(context, list(YES_NO),
                                      label_index([0, 1], a["label"], f"{path}:{n}"),
                                      f"{row['idx']}-{q['idx']}"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a MultiRC example (no {e})") from None
    if not items:
        raise ValueError(f"{path}: no examples")
    return items


TASKS = {t.name: t for t in (
    jsonl_task("boolq", "BoolQ", lambda r: (f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                                            YES_NO), [False, True], ("acc",)),
    jsonl_task("cb", "CB", lambda r: (f"{r['premise']}\nQuestion: {r['hypothesis']}. True, False, "
                                      "or Neither?\nAnswer:", [" True", " False", " Neither"]),
               ["entailment", "contradiction", "neutral"], ("acc", "macro_f1")),
    jsonl_task("copa", "COPA", copa, [0, 1], ("acc",)),
    Task("multirc", "MultiRC", SPLITS, read_multirc, [0, 1], ("f1a", "em")),
    jsonl_task("rte", "RTE", lambda r: (f"{r['premise']}\nQuestion: {r['hypothesis']} True or "
                                        "False?\nAnswer:", [" True", " False"]),
               ["entailment", "not_entailment"], ("acc",)),
    jsonl_task("wic", "WiC", lambda r: (f"Sentence 1: {r['sentence1']}\nSentence 2: "
                                        f"{r['sentence2']}\nQuestion: Is the word '{r['word']}' "
                                        "used in the same way in the two sentences above?\nAnswer:",
                                        YES_NO), [False, True], ("acc",)),
    jsonl_task("wsc", "WSC", lambda r: (f"Passage: {r['text']}\nQuestion: In the passage above, "
                                        f"does the pronoun \"{r['target']['span2_text']}\" refer "
                                        f"to \"{r['target']['span1_text']}\"?\nAnswer:", YES_NO),
               [False, True], ("acc",)),
)}


def build_parser():
    return classify.build_parser("SuperGLUE", TASKS, __doc__)


def main(argv=None) -> None:
    classify.main("SuperGLUE", TASKS, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
