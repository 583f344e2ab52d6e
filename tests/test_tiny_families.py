"""benchmarks/tiny_families.py: new entries of the rule families, scored per family."""
import json
import subprocess
import sys
from pathlib import Path

import script_loader

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tiny_families.py"


def load_script():
    return script_loader.load_script("benchmarks/tiny_families.py")


def test_new_entries_cover_the_rule_families_and_leave_the_instruction_set_out():
    tf = load_script()
    known = json.loads((ROOT / "data" / "instruction-data.json").read_text(encoding="utf-8"))
    entries = tf.new_entries(5, 1, known)
    tasks = [e["task"] for e in entries]
    rule_tasks = {f[0] for f in tf.rule_families()}
    assert set(tasks) == rule_tasks and {"greater_than", "odd_one_out"} <= rule_tasks
    assert not rule_tasks & {"capital", "plural", "synonym"}  # fact tables are left out
    assert all(tasks.count(t) <= 5 for t in rule_tasks) and len(entries) >= 5 * (len(rule_tasks) - 1)
    old = {tf.md.normalize(e["instruction"] + " " + e["input"]) for e in known}
    assert not any(tf.md.normalize(e["instruction"] + " " + e["input"]) in old for e in entries)
    assert tf.new_entries(5, 1, known) == entries and tf.new_entries(5, 2, known) != entries


def test_answer_contained_per_family_by_hand():
    tf = load_script()
    entries = [{"task": "greater_than", "answer": "Yes"}, {"task": "greater_than", "answer": "No"},
               {"task": "addition", "answer": "85"}]
    responses = ["Yes, 5 is greater than 3.", "Yes, 2 is less than 9.", "47 plus 38 equals 85."]
    assert tf.contained_by_family(responses, entries) == {"greater_than": 0.5, "addition": 1.0,
                                                          "all": 2 / 3}
    table = tf.render({"m.pt": {"all": 2 / 3, "greater_than": 0.5}}, {"all": 3, "greater_than": 2})
    assert table.splitlines()[2:] == ["| all (3) | 66.7 |", "| greater_than (2) | 50.0 |"]


def test_the_script_scores_a_real_model_and_refuses_a_missing_one(tmp_path):
    model = ROOT / "data" / "tiny-pretrained.pt"
    run = subprocess.run([sys.executable, str(SCRIPT), str(model), "--per-family", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| all (") and any(r.startswith("| odd_one_out (2) | ") for r in rows)
    assert all(0 <= float(r.rsplit("|", 2)[1]) <= 100 for r in rows)
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.pt")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "argument models: " in missing.stderr
    assert "none.pt: no such file" in missing.stderr
