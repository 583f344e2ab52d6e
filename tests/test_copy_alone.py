"""The core files that a reader may copy alone (gpt.py, collate.py, data.py) work alone: each is
copied into an empty folder and used there by a fresh interpreter that cannot see the project."""
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


@pytest.mark.parametrize("name", sorted(USES))
def test_core_file_works_copied_alone(name, tmp_path):
    shutil.copy(ROOT / name, tmp_path / name)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(USES[name])
    # -I: no PYTHONPATH, no current folder on the path; only the copy and installed packages
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
