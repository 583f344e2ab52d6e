"""The chapter's files that a reader may copy out work there: gpt.py, collate.py and data.py each
alone, train.py with them and generate.py (the book's functions, train_model_simple included).
Each is copied into an empty folder and used by a fresh interpreter that cannot see the project."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USES = {
    "gpt.py": """
        import torch, gpt
        cfg = gpt.model_config("tiny")
        model = gpt.GPTModel(cfg).eval()
        logits = model(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, 50257)
        gpt.save_model(model, cfg, "model.pt")
        again, _ = gpt.load_model("model.pt")
        assert torch.equal(again(torch.tensor([[1, 2, 3]])), logits)
    """,
    "collate.py": """
        import collate
        inputs, targets = collate.custom_collate_fn([[1, 2, 3], [4, 5]])
        assert inputs.tolist() == [[1, 2, 3], [4, 5, 50256]]
        assert targets.tolist() == [[2, 3, 50256], [5, 50256, -100]]
        loader = collate.make_loader([[1, 2, 3], [4, 5], [6]], 2, shuffle=False, drop_last=False)
        assert [len(b[0]) for b in loader] == [2, 1]
    """,
    "data.py": """
        import data
        tok = data.get_tokenizer()
        entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
        assert data.format_input(entry).endswith("### Instruction:\\nSay hi.")
        ds = data.InstructionDataset([entry], tok)
        assert tok.decode(ds[0]).endswith("### Response:\\nHi.")
        assert data.split_data(list(range(20))) == (list(range(17)), [19], [17, 18])
    """,
}


TRAIN_USE = """
    import torch, train
    from functools import partial
    from torch.utils.data import DataLoader
    from collate import custom_collate_fn
    from data import InstructionDataset, get_tokenizer
    from gpt import GPTModel, model_config
    tok = get_tokenizer()
    entries = [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}."}
               for i in range(12)]
    collate = partial(custom_collate_fn, allowed_max_length=64)
    loader = DataLoader(InstructionDataset(entries, tok), batch_size=4, collate_fn=collate)
    torch.manual_seed(123)
    model = GPTModel(model_config("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    train_losses, val_losses, tokens = train.train_model_simple(
        model, loader, loader, optimizer, "cpu", 2, 2, 1, "Add 3 and 1.", tok)
    assert len(train_losses) == len(val_losses) == len(tokens) == 3  # steps 0, 2, 4 of 6
    assert train_losses[-1] < train_losses[0] and tokens[0] == next(iter(loader))[0].numel()
    assert train.plot_losses([0, 1, 2], tokens, train_losses, val_losses, "plot.png") in (True, False)
"""


def test_train_py_works_copied_with_the_chapter_files_it_imports(tmp_path):
    for name in ("train.py", "gpt.py", "data.py", "collate.py", "generate.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(TRAIN_USE)
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Ep ") == 3  # the book's progress lines


@pytest.mark.parametrize("name", sorted(USES))
def test_core_file_works_copied_alone(name, tmp_path):
    shutil.copy(ROOT / name, tmp_path / name)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(USES[name])
    # -I: no PYTHONPATH, no current folder on the path; only the copy and installed packages
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
