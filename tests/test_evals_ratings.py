import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from evals import ratings
from evals.ratings import (bootstrap, bradley_terry, mle_exists, online_elo, percentile,
                           read_battles, records)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), "ratings", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def simulated(strength: dict, n: int = 300, seed: int = 0) -> list:
    """Battles between random pairs; P(a beats b) = s_a / (s_a + s_b), 10% ties."""
    rng, names, out = random.Random(seed), sorted(strength), []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        if rng.random() < 0.1:
            out.append((a, b, 0.5))
        else:
            out.append((a, b, float(rng.random() < strength[a] / (strength[a] + strength[b]))))
    return out


# ---- Elo -----------------------------------------------------------------------------------------
def test_online_elo_hand_computed():
    # battle 1: E_A = 0.5, A = 1000 + 4 * 0.5 = 1002, B = 998
    # battle 2: E_A = 1 / (1 + 10^((998 - 1002) / 400)) = 1 / (1 + 10^-0.01) = 0.5057562
    #           A = 1002 + 4 * (1 - 0.5057562) = 1003.976975, B = 998 - 1.976975 = 996.023025
    elo = online_elo([("A", "B", 1.0)])
    assert elo == {"A": 1002.0, "B": 998.0}
    elo = online_elo([("A", "B", 1.0), ("A", "B", 1.0)])
    assert elo["A"] == pytest.approx(1003.976975, abs=1e-6)
    assert elo["B"] == pytest.approx(996.023025, abs=1e-6)
    assert sum(elo.values()) == pytest.approx(2000)  # Elo moves points, it does not make them


def test_online_elo_symmetric_record():
    assert online_elo([("A", "B", 0.5)] * 5) == {"A": 1000.0, "B": 1000.0}  # ties only
    # one win each way: equal up to the order effect of online updates (K = 4 keeps it tiny)
    elo = online_elo([("A", "B", 1.0), ("B", "A", 1.0)])
    assert abs(elo["A"] - elo["B"]) < 0.1


# ---- Bradley–Terry -----------------------------------------------------------------------------
def test_bradley_terry_maximum_likelihood_hand_computed():
    # A won 3 of 4 against B: the MLE has p_A / p_B = 3, a gap of 400 log10(3) = 190.849,
    # centred on 1000: A = 1095.424, B = 904.576
    battles = [("A", "B", 1.0)] * 3 + [("B", "A", 1.0)]
    bt = bradley_terry(battles, prior=0)
    assert bt["A"] == pytest.approx(1000 + 200 * math.log10(3), abs=1e-6)
    assert bt["B"] == pytest.approx(1000 - 200 * math.log10(3), abs=1e-6)
    anchored = bradley_terry(battles, prior=0, anchor="B")
    assert anchored["B"] == pytest.approx(1000) and anchored["A"] == pytest.approx(
        1000 + 400 * math.log10(3), abs=1e-6)
    shrunk = bradley_terry(battles, prior=1)  # the virtual draws pull the gap in, not over
    assert 0 < shrunk["A"] - shrunk["B"] < bt["A"] - bt["B"]


def test_bradley_terry_symmetric_records_give_equal_ratings():
    # ties are half a win: a win, a loss and two ties is an even record
    even = [("A", "B", 1.0), ("A", "B", 0.0), ("A", "B", 0.5), ("B", "A", 0.5)]
    assert bradley_terry(even, prior=0) == pytest.approx({"A": 1000, "B": 1000})
    cycle = [("A", "B", 1.0), ("B", "C", 1.0), ("C", "A", 1.0)]  # rock, paper, scissors
    assert bradley_terry(cycle, prior=0) == pytest.approx({"A": 1000, "B": 1000, "C": 1000})


def test_unbeaten_model_needs_the_prior():
    battles = [("A", "B", 1.0)] * 3
    assert not mle_exists(2, battles, ["A", "B"])
    assert mle_exists(2, battles + [("A", "B", 0.5)], ["A", "B"])  # a tie is a half win back
    with pytest.raises(ValueError, match="maximum likelihood does not exist"):
        bradley_terry(battles, prior=0)
    bt = bradley_terry(battles, prior=1)
    assert math.isfinite(bt["A"]) and bt["A"] > bt["B"]


def test_a_strictly_stronger_model_ranks_first():
    battles = simulated({"strong": 4.0, "middle": 2.0, "weak": 1.0})
    for fitted in (online_elo(battles), bradley_terry(battles, prior=0), bradley_terry(battles)):
        assert sorted(fitted, key=fitted.get, reverse=True) == ["strong", "middle", "weak"]
    bt = bradley_terry(battles, prior=0)
    # true gaps are 400 log10(2) = 120.4 each; 300 battles estimate them roughly
    assert 60 < bt["strong"] - bt["middle"] < 200 and 60 < bt["middle"] - bt["weak"] < 200


# ---- bootstrap ---------------------------------------------------------------------------------
def test_percentile_interpolates():
    assert percentile([3, 1, 2, 4], 0.5) == 2.5
    assert percentile([1, 2, 3, 4, 5], 0.025) == pytest.approx(1.1)
    assert percentile([7], 0.975) == 7


def test_bootstrap_intervals_are_seeded_and_contain_the_estimates():
    battles = simulated({"a": 3.0, "b": 2.0, "c": 1.0}, n=200, seed=1)
    for fit in (online_elo, lambda b: bradley_terry(b, prior=0)):
        point = fit(battles)
        ci = bootstrap(battles, fit, rounds=200, seed=7)
        assert ci == bootstrap(battles, fit, rounds=200, seed=7)
        assert ci != bootstrap(battles, fit, rounds=200, seed=8)
        for model, (lo, hi) in ci.items():
            assert lo < point[model] < hi
    # a resample without any maximum likelihood is left out instead of failing the whole run
    lopsided = [("A", "B", 1.0)] * 5 + [("B", "A", 1.0)]
    ci = bootstrap(lopsided, lambda b: bradley_terry(b, prior=0), rounds=50, seed=0)
    assert ci["A"][0] <= ci["A"][1]


def test_records_count_wins_losses_and_both_kinds_of_tie():
    r = records([("A", "B", 1.0), ("B", "A", 0.5), ("A", "C", 0.0)])
    assert r["A"] == {"battles": 3, "wins": 1, "losses": 1, "ties": 1}
    assert r["C"] == {"battles": 1, "wins": 1, "losses": 0, "ties": 0}


# ---- files and the command line ------------------------------------------------------------------
def test_read_battles_from_json_lines_and_the_arenas_json_list(tmp_path):
    rows = [{"model_a": "x", "model_b": "y", "winner": "model_a", "prompt": "p"},
            {"model_a": "y", "model_b": "x", "winner": "tie (bothbad)", "anony": True},
            {"model_a": "x", "model_b": "y", "winner": "tie"},
            {"model_a": "x", "model_b": "y", "winner": "model_b"}]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    (tmp_path / "arena.json").write_text(json.dumps(rows))
    expected = [("x", "y", 1.0), ("y", "x", 0.5), ("x", "y", 0.5), ("x", "y", 0.0)]
    assert read_battles(tmp_path / "b.jsonl") == expected
    assert read_battles(tmp_path / "arena.json") == expected


def test_cli_prints_the_table_and_writes_json(tmp_path):
    battles = [("x", "y", 1.0)] * 3 + [("y", "x", 1.0)]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"model_a": a, "model_b": b,
                                        "winner": "model_a" if s else "model_b"}) + "\n"
                            for a, b, s in battles))
    r = run_cli(path, "--bootstrap", "100", "--prior", "0", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "| 1 | x | 1095.4 |" in r.stdout and "| 2 | y | 904.6 |" in r.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["models"]) == ["x", "y"]
    assert result["models"]["x"]["wins"] == 3 and len(result["models"]["x"]["elo_ci"]) == 2
    assert result["settings"]["anchor"] == "mean 1000"


@pytest.mark.parametrize("content,message", [
    ('{"model_a": "x", "model_b": "y", "winner": "model_a"}\n{"model_a": "x", "model_b": "y", '
     '"winner": "a"}\n', r"b.jsonl:2: winner 'a' is not one of model_a, model_b, tie"),
    ('{"model_a": "x", "model_b": "x", "winner": "tie"}\n', r"b.jsonl:1: a model cannot battle"),
    ("[1]", r"b.jsonl: battle 0: expected an object"),
    ("{oops\n", r"b.jsonl: not JSON lines or a JSON list"),
    ("\n", r"no battles in"),
])
def test_bad_battles_are_named(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        ratings.main([str(tmp_path / "b.jsonl")])


def test_cli_bad_battles_are_one_line_exit_2(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"model_a": "x", "model_b": "y", "winner": "a"}\n')
    r = run_cli(tmp_path / "b.jsonl")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "b.jsonl:1: winner 'a' is not one of" in r.stderr
