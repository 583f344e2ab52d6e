"""What a run shows and writes besides the model: sample answers, the loss plot, durations.

`sample_response` (the book's per-epoch check), `show_examples` (test answers beside the expected
ones), `plot_losses` (the book's plot, with tokens seen on a second axis; needs matplotlib),
`check_out_dir` (fails before training, not after it) and `format_duration`.
"""
import io
from pathlib import Path

from data import atomic_write_bytes, format_input
from generate import generate_responses


def check_out_dir(out_dir: Path) -> None:
    """Fail before training, not after it, when results could not be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None


def sample_response(model, entry, tokenizer, style, max_new_tokens=35) -> str:
    """The book's per-epoch check: the model's answer to one validation prompt."""
    return generate_responses(model, [entry], tokenizer, style=style,
                              max_new_tokens=max_new_tokens, batch_size=1)[0]


def show_examples(entries: list[dict], responses: list[str], style: str, n: int = 3,
                  log=print) -> None:
    """The book's check by eye: a few test prompts, the expected answer and the model's."""
    for entry, response in list(zip(entries, responses))[:n]:
        log(f"\n{format_input(entry, style)}\n\nCorrect response:\n>> {entry['output']}"
            f"\n\nModel response:\n>> {response.strip()}\n" + "-" * 40)


def plot_losses(history: list, path: Path) -> bool:
    """Train and validation loss against epochs, tokens seen on a second axis (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="Training loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # same curves, read against tokens seen
    ax2.plot([h["tokens"] for h in history], [h["train_loss"] for h in history], alpha=0)
    ax2.set_xlabel("Target tokens seen")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"
