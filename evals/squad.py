"""SQuAD v1.1 and v2.0: answer questions about a passage, scored as the official evaluate-v1.1.py
and evaluate-v2.0.py scripts score them (normalised exact match and token F1, the best over the
gold answers; v2.0 adds unanswerable questions, "" being the no-answer prediction).

`python evaluate.py squad dev-v2.0.json --model-path out/model.pt` or `--predictions PRED.json`.
"""
import argparse
import sys

from data import input_file
from evals.common import (add_answer_args, add_common_args, benchmark_parser, check_run, field,
                          generate_texts, group_rows, load_scoring_model, markdown_table,
                          normalize_squad, overlap_f1, prompt_room, read_json_file,
                          read_predictions_dict, styled_prompt, truncate_tokens, write_results)

NO_ANSWER = "unanswerable"  # what the prompt asks the model to say; scored as the empty answer


# ---- the file ---------------------------------------------------------------------------------
WHAT = 'a SQuAD file {"version", "data": [{"title", "paragraphs": [...]}]}'


def read_squad(path) -> tuple[bool, list[dict]]:
    return read_squad_data(read_json_file(path, WHAT), path)


def read_squad_data(raw, path) -> tuple[bool, list[dict]]:
    """(is v2.0, questions) of a SQuAD file's contents; each question is {id, title, context,
    question, answers: [text], has_answer}. v2.0: version "v2.0" or any `is_impossible` field."""
    articles = field(raw, "data", list, str(path))
    questions, v2 = [], str(raw.get("version", "")).startswith("v2")  # raw: a dict now
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        title = field(article, "title", str, where)
        for p, paragraph in enumerate(field(article, "paragraphs", list, where)):
            here = f"{where}.paragraphs[{p}]"
            context = field(paragraph, "context", str, here)
            for q, qa in enumerate(field(paragraph, "qas", list, here)):
                at = f"{here}.qas[{q}]"
                answers = [field(ans, "text", str, f"{at}.answers[{i}]")
                           for i, ans in enumerate(field(qa, "answers", list, at))]
                v2 = v2 or "is_impossible" in qa
                questions.append({"id": field(qa, "id", str, at), "title": title,
                                  "context": context, "question": field(qa, "question", str, at),
                                  "answers": answers, "has_answer": bool(answers), "where": at})
    if not questions:
        raise ValueError(f"{path}: no questions (expected {WHAT})")
    if not v2:  # v1.1 takes the best over the gold answers: a question needs one
        for q in questions:
            if not q["answers"]:
                raise ValueError(f"{q['where']}: no answers (a SQuAD v1.1 question needs one; "
                                 "v2.0 files say so with version v2.0 or is_impossible)")
    return v2, questions


# ---- the official scores ----------------------------------------------------------------------
def exact_score(prediction: str, gold: str) -> float:
    return float(normalize_squad(prediction) == normalize_squad(gold))


def f1_score(prediction: str, gold: str, v2: bool) -> float:
    """Token F1; v2.0 first settles empty answers: 1 if both are empty, else 0 if either is."""
    pred, ref = normalize_squad(prediction).split(), normalize_squad(gold).split()
    if v2 and (not pred or not ref):
        return float(pred == ref)
    return overlap_f1(pred, ref)


def score_question(question: dict, prediction: str, v2: bool) -> tuple[float, float]:
    """(exact, f1) of one prediction, each the best over the gold answers. v2.0 drops gold answers
    that normalise to nothing; with none left the only gold answer is "" (no answer)."""
    golds = question["answers"]
    if v2:
        golds = [g for g in golds if normalize_squad(g)] or [""]
    return (max(exact_score(prediction, g) for g in golds),
            max(f1_score(prediction, g, v2) for g in golds))


def score_squad(questions: list[dict], predictions: dict[str, str], v2: bool) -> dict:
    """The official summary ({"exact_match", "f1"} for v1.1; {"exact", "f1", "total", HasAns_*,
    NoAns_*} for v2.0), with "missing" (counted as 0) and "by_title"."""
    exact, f1 = [], []
    for q in questions:
        e, f = score_question(q, predictions[q["id"]], v2) if q["id"] in predictions else (0, 0)
        exact.append(e)
        f1.append(f)
    overall, groups = group_rows([q["title"] for q in questions], {"exact": exact, "f1": f1})
    missing = sum(q["id"] not in predictions for q in questions)
    if not v2:
        return {"exact_match": overall["exact"], "f1": overall["f1"], "total": overall["n"],
                "missing": missing, "by_title": groups}
    scores = {"exact": overall["exact"], "f1": overall["f1"], "total": overall["n"]}
    _, parts = group_rows(["HasAns" if q["has_answer"] else "NoAns" for q in questions],
                          {"exact": exact, "f1": f1})
    for name in ("HasAns", "NoAns"):  # the official script's breakdown, where there are any
        if name in parts:
            scores.update({f"{name}_exact": parts[name]["exact"], f"{name}_f1": parts[name]["f1"],
                           f"{name}_total": parts[name]["n"]})
    return {**scores, "missing": missing, "by_title": groups}


def render_squad(scores: dict, v2: bool) -> str:
    """Exact match and F1: overall, HasAns/NoAns (v2.0), then per article title."""
    em = "exact" if v2 else "exact_match"
    rows = [["**overall**", scores["total"], scores[em], scores["f1"]]]
    rows += [[name, scores[f"{name}_total"], scores[f"{name}_exact"], scores[f"{name}_f1"]]
             for name in ("HasAns", "NoAns") if f"{name}_total" in scores]
    rows += [[title, s["n"], s["exact"], s["f1"]] for title, s in scores["by_title"].items()]
    return markdown_table(["Group", "Questions", "Exact match", "F1"], rows)


# ---- the model's answers ----------------------------------------------------------------------
def squad_prompt(question: dict, context: str, style: str, v2: bool) -> str:
    instruction = "Answer the question with a short phrase copied from the passage."
    if v2:
        instruction += f" If the passage does not answer it, reply {NO_ANSWER}."
    text = f"{context}\n\nQuestion: {question['question']}"
    return styled_prompt(style, instruction, text, raw=f"{text}\nAnswer:")


def predict(args, questions: list[dict], v2: bool) -> dict[str, str]:
    """{id: answer} from the model; passages cut so that the prompt and answer fit the context."""
    model, _, tokenizer = load_scoring_model(args.model_path, args.device)
    room = prompt_room(model, args.max_new_tokens)
    prompts = []
    for q in questions:
        budget = room - len(tokenizer.encode(squad_prompt(q, "", args.style, v2)))
        context = truncate_tokens(tokenizer, q["context"], budget)
        prompts.append(squad_prompt(q, context, args.style, v2))
    answers = generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                             stops=["\n"], progress=not args.quiet)
    return {q["id"]: official_answer(a, v2) for q, a in zip(questions, answers)}


def official_answer(answer: str, v2: bool) -> str:
    """The answer stripped; in v2.0 the model's NO_ANSWER becomes "", the scorer's no-answer."""
    answer = answer.strip()
    return "" if v2 and normalize_squad(answer) == NO_ANSWER else answer


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("squad", __doc__)
    p.add_argument("file", type=input_file,
                   help="SQuAD JSON as published (train/dev-v1.1.json, dev-v2.0.json)")
    add_common_args(p)
    add_answer_args(p, "the official {id: answer} JSON", max_new_tokens=24)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_run(args)
    v2, questions = read_squad(args.file)
    questions = questions[:args.limit]
    if args.predictions:
        predictions, written = read_predictions_dict(args.predictions), None
    else:
        predictions = written = predict(args, questions, v2)
    scores = score_squad(questions, predictions, v2)
    if scores["missing"] and not args.quiet:
        print(f"{scores['missing']} questions have no prediction: scored 0", file=sys.stderr)
    title = f"SQuAD {'v2.0' if v2 else 'v1.1'}: {args.file}"
    write_results(args, title, render_squad(scores, v2), scores, written)


if __name__ == "__main__":
    from data import cli_main
    cli_main(main, debug="--debug" in sys.argv)
