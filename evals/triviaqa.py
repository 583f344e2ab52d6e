"""TriviaQA: answer trivia questions, closed-book or with an evidence document, scored as the
official triviaqa_evaluation.py scores them (its own normalisation, where punctuation becomes a
space; exact match and token F1, the best over the answer's aliases; missing predictions 0).

`python evaluate.py triviaqa wikipedia-dev.json --model-path out/model.pt [--evidence DIR]`.
"""
import argparse
import re
import string
import sys
from pathlib import Path

from data import input_file
from evals.common import (add_answer_args, add_common_args, benchmark_parser, check_run,
                          check_string_list, field, generate_texts, input_folder, load_scoring_model,
                          markdown_table, mean_percent, overlap_f1, prompt_room, read_json_file,
                          read_predictions_dict, styled_prompt, truncate_tokens, write_results)

# string.punctuation plus the quotes and accents the official script adds
PUNCTUATION = set(string.punctuation + "‘’´`")


def normalize_trivia(text: str) -> str:
    """TriviaQA's normalize_answer: "_" -> " ", lower-case, every punctuation mark -> a space
    ("U.S." -> "u s", not "us"), the articles a/an/the as whole words dropped, single spaces."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if c in PUNCTUATION else c for c in text)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def gold_answers(answer: dict) -> list[str]:
    """The official ground truths: NormalizedAliases, plus HumanAnswers normalised."""
    return answer["NormalizedAliases"] + [normalize_trivia(a) for a in answer.get("HumanAnswers",
                                                                                   [])]


def score_key(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each the best over the gold aliases."""
    pred = normalize_trivia(prediction)
    exact = max(float(pred == normalize_trivia(g)) for g in golds)
    f1 = max(overlap_f1(pred.split(), normalize_trivia(g).split()) for g in golds)
    return exact, f1


def score_triviaqa(units: list[dict], predictions: dict[str, str]) -> dict:
    """Official summary: exact_match and f1 over every key (a missing prediction scores 0),
    common (keys predicted), denominator (keys), pred_len and gold_len."""
    exact, f1 = [], []
    for u in units:
        e, f = score_key(predictions[u["key"]], u["golds"]) if u["key"] in predictions else (0, 0)
        exact.append(e)
        f1.append(f)
    common = sum(u["key"] in predictions for u in units)
    return {"exact_match": mean_percent(exact), "f1": mean_percent(f1), "common": common,
            "denominator": len(units), "pred_len": len(predictions), "gold_len": len(units)}


# ---- the file ---------------------------------------------------------------------------------
def read_triviaqa(path) -> list[dict]:
    """The units the official script scores, each {key, question, golds, doc}: one per question
    (key QuestionId) for the Wikipedia domain, one per evidence document (key
    "QuestionId--Filename") otherwise. With VerifiedEval only the verified questions (and, for
    Web, documents) count. `doc` is ("wikipedia" or "web", Filename) or None."""
    what = 'a TriviaQA file {"Data": [{"Question", "QuestionId", "Answer", ...}], "Domain", ...}'
    raw = read_json_file(path, what)
    data = field(raw, "Data", list, str(path))
    wikipedia, verified = raw.get("Domain") == "Wikipedia", bool(raw.get("VerifiedEval"))
    units = []
    for i, datum in enumerate(data):
        where = f"{path}: Data[{i}]"
        qid, question = field(datum, "QuestionId", str, where), field(datum, "Question", str, where)
        answer = field(datum, "Answer", dict, where)
        check_string_list(field(answer, "NormalizedAliases", list, f"{where}.Answer"),
                          f"{where}.Answer.NormalizedAliases")
        check_string_list(answer.get("HumanAnswers", []), f"{where}.Answer.HumanAnswers")
        golds = gold_answers(answer)
        if not golds:
            raise ValueError(f"{where}.Answer: no NormalizedAliases to score against")
        if verified and not field(datum, "QuestionPartOfVerifiedEval", bool, where):
            continue
        docs = []
        for key, folder in (("EntityPages", "wikipedia"), ("SearchResults", "web")):
            for j, page in enumerate(field(datum, key, list, where) if key in datum else []):
                at = f"{where}.{key}[{j}]"
                if verified and not wikipedia and not field(page, "DocPartOfVerifiedEval", bool,
                                                            at):
                    continue
                docs.append((folder, field(page, "Filename", str, at)))
        base = {"question": question, "golds": golds, "where": where}
        if wikipedia:
            units.append({**base, "key": qid, "doc": docs[0] if docs else None})
        else:
            units += [{**base, "key": f"{qid}--{name}", "doc": (folder, name)}
                      for folder, name in docs]
    if not units:
        raise ValueError(f"{path}: no questions to score (expected {what}; outside the Wikipedia "
                         "domain a question counts once per evidence document)")
    return units


def read_evidence(evidence_dir, doc, where: str) -> str:
    """The text of an evidence document: DIR/wikipedia/<Filename> or DIR/web/<Filename>."""
    if doc is None:
        raise ValueError(f"{where}: no evidence document to show with --evidence")
    path = Path(evidence_dir) / doc[0] / doc[1]
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (evidence for {where})") from None


# ---- the model's answers ----------------------------------------------------------------------
def trivia_prompt(question: str, evidence: str | None, style: str) -> str:
    instruction = "Answer the trivia question with a short answer (a name, a number, a phrase)."
    text = f"Question: {question}" if evidence is None else f"{evidence}\n\nQuestion: {question}"
    return styled_prompt(style, instruction, text, raw=f"{text}\nAnswer:")


def predict(args, units: list[dict]) -> dict[str, str]:
    """{key: answer}; with --evidence the unit's document, cut to fit, precedes the question."""
    model, _, tokenizer = load_scoring_model(args.model_path, args.device)
    room = prompt_room(model, args.max_new_tokens)
    prompts = []
    for u in units:
        evidence = None
        if args.evidence:
            budget = room - len(tokenizer.encode(trivia_prompt(u["question"], "", args.style)))
            evidence = truncate_tokens(tokenizer, read_evidence(args.evidence, u["doc"],
                                                                u["where"]), budget)
        prompts.append(trivia_prompt(u["question"], evidence, args.style))
    answers = generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                             stops=["\n"], progress=not args.quiet)
    return {u["key"]: a.strip() for u, a in zip(units, answers)}


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("triviaqa", __doc__)
    p.add_argument("file", type=input_file,
                   help="TriviaQA JSON as published (qa/wikipedia-dev.json, ...)")
    p.add_argument("--evidence", type=input_folder,
                   help="evidence folder (with wikipedia/ and web/): show the question's first "
                        "document; without it, closed-book")
    add_common_args(p)
    add_answer_args(p, "the official {QuestionId: answer} JSON", max_new_tokens=16)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_run(args)
    units = read_triviaqa(args.file)[:args.limit]
    if args.predictions:
        predictions, written = read_predictions_dict(args.predictions), None
    else:
        predictions = written = predict(args, units)
    scores = score_triviaqa(units, predictions)
    missing = scores["denominator"] - scores["common"]
    if missing and not args.quiet:
        print(f"{missing} questions have no prediction: scored 0", file=sys.stderr)
    table = markdown_table(["Questions", "Exact match", "F1"],
                           [[scores["denominator"], scores["exact_match"], scores["f1"]]])
    write_results(args, f"TriviaQA: {args.file}", table, scores, written)


if __name__ == "__main__":
    from data import cli_main
    cli_main(main, debug="--debug" in sys.argv)
