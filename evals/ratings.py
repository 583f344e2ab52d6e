"""Ratings from head-to-head battles, as the Chatbot Arena computes them: online Elo in battle
order, and Bradley–Terry strengths by maximum likelihood, each with seeded bootstrap intervals.

Entry points: `read_battles`, `online_elo`, `bradley_terry`, `bootstrap`, `main`
(`python evaluate.py ratings battles.jsonl`). Plain Python: no numpy, scipy or pandas.
"""
import argparse
import collections
import json
import math
import random
import sys
from typing import Callable

from data import ArgumentParser, input_file, non_negative_float, non_negative_int, positive_float
from evals.common import check_outputs, markdown_table, write_results

# the Arena's battle logs: the score of model_a in each outcome (a tie is half a win)
WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
Battle = tuple[str, str, float]  # (model_a, model_b, score of model_a)


# ---- reading battles ---------------------------------------------------------------------------
def check_battle(record, where: str) -> Battle:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with model_a, model_b, winner")
    a, b, winner = record.get("model_a"), record.get("model_b"), record.get("winner")
    if not (isinstance(a, str) and a and isinstance(b, str) and b):
        raise ValueError(f"{where}: model_a and model_b must be non-empty strings")
    if a == b:
        raise ValueError(f"{where}: a model cannot battle itself ({a!r})")
    if winner not in WINNERS:
        raise ValueError(f"{where}: winner {winner!r} is not one of {', '.join(WINNERS)}")
    return a, b, WINNERS[winner]


def read_battles(path) -> list[Battle]:
    """Battles in file order, from JSON lines (this project's battle files) or one JSON list
    (the Arena's published clean_battle_*.json); a bad record is named by its line or index."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected battles as JSON lines") from None
    try:
        if text.lstrip().startswith("["):
            return [check_battle(r, f"{path}: battle {i}") for i, r in enumerate(json.loads(text))]
        return [check_battle(json.loads(line), f"{path}:{n}")
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines or a JSON list ({e.msg})") from None


# ---- online Elo --------------------------------------------------------------------------------
def online_elo(battles: list[Battle], k: float = 4, scale: float = 400, base: float = 10,
               init: float = 1000) -> dict[str, float]:
    """Elo updated battle by battle, in order: R_a += K (S_a - E_a), with the expected score
    E_a = 1 / (1 + base^((R_b - R_a) / scale)). The Arena's published settings are the defaults;
    a small K makes the ratings move slowly, so the order of battles matters little."""
    rating = collections.defaultdict(lambda: float(init))
    for a, b, score in battles:
        expected_a = 1 / (1 + base ** ((rating[b] - rating[a]) / scale))
        rating[a] += k * (score - expected_a)
        rating[b] += k * ((1 - score) - (1 - expected_a))
    return dict(rating)


# ---- Bradley–Terry -----------------------------------------------------------------------------
def tally(battles: list[Battle]) -> tuple[list[str], dict, dict]:
    """(models, games[(i, j)] for i < j, score[i] = wins + ties / 2) with models as indices."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    games, score = collections.Counter(), [0.0] * len(models)
    for a, b, s in battles:
        i, j = index[a], index[b]
        games[min(i, j), max(i, j)] += 1
        score[i] += s
        score[j] += 1 - s
    return models, games, score


def mle_exists(n: int, battles: list[Battle], models: list[str]) -> bool:
    """Zermelo's condition: every model reaches every other along "scored against" links, i.e.
    no group of models lost (or won) every game against the rest; else strengths run to 0 or ∞."""
    index = {m: i for i, m in enumerate(models)}
    beat = collections.defaultdict(set)
    for a, b, s in battles:
        if s > 0:
            beat[index[a]].add(index[b])
        if s < 1:
            beat[index[b]].add(index[a])
    reverse = collections.defaultdict(set)
    for i, js in beat.items():
        for j in js:
            reverse[j].add(i)

    def reach(links) -> int:
        seen, todo = {0}, [0]
        while todo:
            for j in links[todo.pop()] - seen:
                seen.add(j)
                todo.append(j)
        return len(seen)
    return reach(beat) == n and reach(reverse) == n


def bradley_terry(battles: list[Battle], scale: float = 400, base: float = 10,
                  init: float = 1000, prior: float = 1.0, anchor: str | None = None,
                  tol: float = 1e-10, max_iter: int = 100_000) -> dict[str, float]:
    """Bradley–Terry strengths p (P(i beats j) = p_i / (p_i + p_j)) that maximise the likelihood
    of the record, ties counted as half a win, by Hunter's MM iteration
    p_i <- W_i / sum_j n_ij / (p_i + p_j). `prior` adds that many virtual draws of each model
    against a fixed reference of strength 1, which keeps an unbeaten (or winless) model finite;
    prior 0 is the plain maximum likelihood. Scaled like Elo: init + scale * log_base(p),
    shifted so that the mean (or the `anchor` model) is at init."""
    models, games, score = tally(battles)
    n = len(models)
    if prior <= 0 and n > 1 and not mle_exists(n, battles, models):
        raise ValueError("the Bradley–Terry maximum likelihood does not exist: some models won "
                         "(or lost) every battle against the others; use a prior > 0")
    opponents = collections.defaultdict(list)
    for (i, j), g in games.items():
        opponents[i].append((j, g))
        opponents[j].append((i, g))
    p = [1.0] * n
    for _ in range(max_iter):
        new = []
        for i in range(n):
            denominator = sum(g / (p[i] + p[j]) for j, g in opponents[i]) + prior / (p[i] + 1)
            new.append((score[i] + prior / 2) / denominator)
        if prior <= 0:  # without the reference only ratios are fixed: geometric mean 1
            centre = math.exp(sum(math.log(x) for x in new) / n)
            new = [x / centre for x in new]
        change = max(abs(math.log(x / y)) for x, y in zip(new, p))
        p = new
        if change < tol:
            break
    ratings = {m: scale * math.log(x, base) for m, x in zip(models, p)}
    if anchor is not None and anchor not in ratings:
        raise ValueError(f"--anchor {anchor!r} is not a model in the battles")
    shift = init - (ratings[anchor] if anchor else sum(ratings.values()) / n)
    return {m: r + shift for m, r in ratings.items()}


# ---- bootstrap ---------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def bootstrap(battles: list[Battle], fit: Callable[[list], dict], rounds: int = 1000,
              seed: int = 123, progress: bool = False) -> dict[str, tuple[float, float]]:
    """95% intervals (2.5th and 97.5th percentiles) of `fit` over `rounds` resamples of the
    battles drawn with replacement, in drawn order as the Arena's notebook does. A model that is
    missing from a resample, or a fit that fails on it, leaves that round out for it."""
    rng, samples = random.Random(seed), collections.defaultdict(list)
    for r in range(1, rounds + 1):
        try:
            result = fit(rng.choices(battles, k=len(battles)))
        except ValueError:  # e.g. no maximum likelihood for this resample
            continue
        for model, rating in result.items():
            samples[model].append(rating)
        if progress and (r % 100 == 0 or r == rounds):
            print(f"\rbootstrap {r}/{rounds}", end="\n" if r == rounds else "", file=sys.stderr,
                  flush=True)
    return {m: (percentile(v, 0.025), percentile(v, 0.975)) for m, v in samples.items()}


def records(battles: list[Battle]) -> dict[str, dict]:
    """Battles, wins, losses and ties per model."""
    out = collections.defaultdict(lambda: {"battles": 0, "wins": 0, "losses": 0, "ties": 0})
    for a, b, s in battles:
        for model, mine in ((a, s), (b, 1 - s)):
            out[model]["battles"] += 1
            out[model]["wins" if mine == 1 else "losses" if mine == 0 else "ties"] += 1
    return dict(out)


def rate(battles: list[Battle], args) -> dict:
    """Elo and Bradley–Terry with their intervals and each model's record, ranked by BT."""
    def elo(b):
        return online_elo(b, args.k)

    def bt(b):
        return bradley_terry(b, prior=args.prior, anchor=args.anchor)
    table, elo_now, bt_now = records(battles), elo(battles), bt(battles)
    show = not args.quiet
    elo_ci = bootstrap(battles, elo, args.bootstrap, args.seed, show) if args.bootstrap else {}
    bt_ci = bootstrap(battles, bt, args.bootstrap, args.seed, show) if args.bootstrap else {}
    ranked = sorted(table, key=lambda m: -bt_now[m])
    return {"models": {m: dict(table[m], elo=elo_now[m], elo_ci=elo_ci.get(m), bradley_terry=
                               bt_now[m], bradley_terry_ci=bt_ci.get(m)) for m in ranked},
            "settings": {"k": args.k, "scale": 400, "base": 10, "init": 1000,
                         "prior": args.prior, "anchor": args.anchor or "mean 1000",
                         "bootstrap": args.bootstrap, "seed": args.seed}}


def render(result: dict) -> str:
    def ci(pair):
        return "-" if pair is None else f"{pair[0]:.1f} to {pair[1]:.1f}"
    rows = [[rank, m, r["bradley_terry"], ci(r["bradley_terry_ci"]), r["elo"], ci(r["elo_ci"]),
             r["battles"], r["wins"], r["losses"], r["ties"]]
            for rank, (m, r) in enumerate(result["models"].items(), 1)]
    return markdown_table(["Rank", "Model", "Bradley–Terry", "95% CI", "Elo", "95% CI",
                           "Battles", "Wins", "Losses", "Ties"], rows)


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="evaluate.py ratings")
    p.add_argument("battles", nargs="+", type=input_file,
                   help="battle files: JSON lines with model_a, model_b, winner (from `arena`), "
                        "or the Arena's JSON list")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000,
                   help="resamples for the 95%% intervals, 0: none")
    p.add_argument("--seed", type=non_negative_int, default=123, help="seed of the resampling")
    p.add_argument("--k", type=positive_float, default=4.0, help="Elo's K, the step per battle")
    p.add_argument("--prior", type=non_negative_float, default=1.0,
                   help="virtual draws per model against a 1000-rated reference in "
                        "Bradley–Terry, 0: plain maximum likelihood")
    p.add_argument("--anchor", help="put this model's Bradley–Terry rating at 1000 "
                                    "(default: the mean is 1000)")
    p.add_argument("--json", help="write the ratings here (JSON)")
    p.add_argument("--report", help="append a Markdown section with the table to this file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_outputs(args)  # fail now, not after the bootstrap
    battles = [b for path in args.battles for b in read_battles(path)]
    if not battles:
        raise ValueError(f"no battles in {', '.join(args.battles)}")
    result = rate(battles, args)
    write_results(args, "Ratings from battles (Chatbot Arena style)", render(result), result)
