"""What the benchmark tests share: a tiny model that always says the same token, and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def save_forced_model(path: Path, text: str) -> Path:
    """A tiny model whose next token is always `text` (one GPT-2 token): the final LayerNorm
    outputs a constant vector (weight 0, bias = 100 x that token's embedding), and the tied head
    scores every token by its dot product with it, so that token wins whatever the prompt."""
    import torch

    from data import get_tokenizer
    from gpt import GPTModel, model_config, save_model
    ids = get_tokenizer().encode(text)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(100 * model.tok_emb.weight[ids[0]])
    save_model(model, cfg, path)
    return path


def run_evaluate(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run_here(capsys, *args) -> subprocess.CompletedProcess:
    """`python evaluate.py ARGS` run in this process (no second torch import): the same main()
    through the same cli_main, so errors still end as one line on stderr and exit code 2."""
    import evaluate
    from data import cli_main
    capsys.readouterr()  # drop what earlier steps printed
    try:
        cli_main(lambda: evaluate.main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)
