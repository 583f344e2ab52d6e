"""Preference tuning with DPO (Direct Preference Optimization), the book's chapter-7 bonus.

Starts from a model written by train.py and a preference file of {instruction, input, chosen,
rejected} entries; trains the policy to prefer `chosen` over `rejected` more than a frozen
reference does (the starting model; with --lora-rank, the same model with its adapters off).
Book names: `compute_logprobs`, `compute_dpo_loss`, `compute_dpo_loss_batch`. Outputs as train.py.
"""
import argparse
import copy
import hashlib
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run by path (python extras/dpo.py): the chapter's files

from data import (ArgumentParser, cli_main, get_tokenizer, input_file, non_negative_float,  # noqa: E402
                  non_negative_int, positive_float, positive_int, split_data, write_json)
# the preference data lives in dpo_data.py; all of it is imported so `dpo.collate_pairs` etc. still work
from extras.dpo_data import (PreferenceDataset, collate_pairs, load_preferences,  # noqa: E402, F401
                             make_pair_loader, pad_with_mask, preference_problem)
from fast.step import use_bf16  # noqa: E402
from generate import generate_responses  # noqa: E402
from extras.book_format import load_any_model as load_model  # noqa: E402
from gpt import atomic_save, pick_device, read_checkpoint, save_model  # noqa: E402
from train import (Interrupted, RunState, StopRequested, copy_weights,  # noqa: E402
                   format_duration, plot_losses, save_due, stop_reason)
from training.run import add_run_flags, check_out_dir, data_file_or_url, make_optimizer  # noqa: E402

DEFAULT_DATA = str(ROOT / "data" / "preference-data.json")
BOOK_DEFAULTS = dict(lr=5e-6, eval_every=5)  # the book's DPO run on gpt2-medium
TINY_DEFAULTS = dict(lr=1e-4, eval_every=20)  # the from-scratch demo model moves less easily


# ---- the DPO loss --------------------------------------------------------------------------
def compute_logprobs(logits, labels, selection_mask=None) -> torch.Tensor:
    """Mean log-probability of each row's selected tokens (B,), as the book.

    logits (B, T, V) predict labels (B, T) shifted by one; selection_mask (B, T) marks the
    response tokens (prompt and padding excluded). Without a mask: every token.
    """
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if selection_mask is None:
        return selected.mean(-1)
    mask = selection_mask[:, 1:].to(selected.dtype)
    return (selected * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                     reference_rejected_logprobs, beta: float = 0.1):
    """The book's DPO loss, -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), batch-mean.

    Returns (loss, chosen reward, rejected reward); a reward is beta * (policy - reference)
    log-probability, as in the DPO paper (the book logs it without beta), for logging only.
    """
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    losses = -F.logsigmoid(beta * (model_logratios - reference_logratios))
    chosen_rewards = (beta * (model_chosen_logprobs - reference_chosen_logprobs)).detach()
    rejected_rewards = (beta * (model_rejected_logprobs - reference_rejected_logprobs)).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def response_logprobs(model, ids, mask) -> torch.Tensor:
    """`compute_logprobs(model(ids), ids, mask)`, with the output head run only where a response
    token is predicted: prompt and padding positions never pay for the 50257-wide logits."""
    keep = mask[:, 1:]
    hidden = model.hidden(ids)[:, :-1][keep]  # (N, emb_dim), N response tokens in the batch
    log_probs = F.log_softmax(model.out_head(hidden).float(), dim=-1)
    selected = log_probs.gather(-1, ids[:, 1:][keep].unsqueeze(-1)).squeeze(-1)  # (N,)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(ids), device=ids.device).index_add_(0, rows, selected)
    return sums / keep.sum(-1).clamp(min=1)


class FrozenReference:
    """The reference model: a frozen copy, or the policy itself with its LoRA adapters off."""

    def __init__(self, model, lora_module=None):
        self.lora = lora_module
        self.model = model if lora_module else copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def logprobs(self, ids, mask) -> torch.Tensor:
        with self.lora.adapters_disabled(self.model) if self.lora else nullcontext():
            return response_logprobs(self.model, ids, mask)


def batch_logprobs(batch: dict, policy_model, reference_model: FrozenReference):
    """Policy (with gradients) and reference (without) log-probabilities of both responses."""
    keys = ("chosen", "rejected")
    policy = [response_logprobs(policy_model, batch[k], batch[f"{k}_mask"]) for k in keys]
    reference = [reference_model.logprobs(batch[k], batch[f"{k}_mask"]) for k in keys]
    return policy, reference


def compute_dpo_loss_batch(batch: dict, policy_model, reference_model, beta: float):
    """The book's per-batch step: four forward passes, then `compute_dpo_loss`."""
    policy, reference = batch_logprobs(batch, policy_model, reference_model)
    return compute_dpo_loss(*policy, *reference, beta=beta)


@torch.no_grad()
def evaluate_dpo(loader, policy_model, reference_model, beta, num_batches, autocast) -> dict:
    """Loss, rewards and margin over the first `num_batches` batches, and two accuracies: the
    share of pairs whose chosen reward beats the rejected one (`reward_accuracy`: the policy
    moved towards the chosen response more than the reference; 0 at the start, all ties), and
    the share whose chosen response has the higher mean log-probability (`accuracy`)."""
    totals, pairs, correct = dict(loss=0.0, chosen_reward=0.0, rejected_reward=0.0), 0, 0
    reward_correct = 0
    was_training = policy_model.training
    policy_model.eval()
    for i, batch in enumerate(loader):
        if num_batches and i >= num_batches:
            break
        with autocast():
            (pi_c, pi_r), (ref_c, ref_r) = batch_logprobs(batch, policy_model, reference_model)
        loss, chosen, rejected = compute_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
        for key, value in zip(totals, (loss, chosen, rejected)):
            totals[key] += value.item() * len(pi_c)
        pairs, correct = pairs + len(pi_c), correct + int((pi_c > pi_r).sum())
        reward_correct += int((pi_c - ref_c > pi_r - ref_r).sum())
    policy_model.train(was_training)
    out = {k: v / pairs for k, v in totals.items()} if pairs else dict.fromkeys(totals, math.nan)
    out["margin"] = out["chosen_reward"] - out["rejected_reward"]
    out["accuracy"] = correct / pairs if pairs else math.nan
    out["reward_accuracy"] = reward_correct / pairs if pairs else math.nan
    return out



# ---- training ------------------------------------------------------------------------------
def train_dpo(policy, reference, optimizer, train_loader, val_loader, args, state: RunState,
              best: dict, autocast, on_save, log=print) -> tuple[str, dict]:
    """The book's DPO loop with train.py's habits: evaluation every `args.eval_every` steps (and
    before the first and after the last), the best validation loss's weights kept, `on_save` every
    `args.save_every` (steps or minutes) and after each epoch, Ctrl-C between steps raises `Interrupted`."""
    steps_per_epoch = len(train_loader)
    if not steps_per_epoch:
        raise ValueError(f"the training split has fewer pairs than --batch-size {args.batch_size}")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    start, start_step = time.perf_counter(), state.step
    last_save = start

    def evaluate() -> bool:
        metrics = [evaluate_dpo(loader, policy, reference, args.beta, args.eval_batches, autocast)
                   for loader in (train_loader, val_loader)]
        (train_m, val_m), done = metrics, state.step - start_step
        state.history.append({"step": state.step, "epoch": state.step / steps_per_epoch,
                              "tokens": state.tokens_seen, "train_loss": train_m["loss"],
                              "val_loss": val_m["loss"], "train_margin": train_m["margin"],
                              **{f"val_{k}": v for k, v in val_m.items() if k != "loss"}})
        improved = val_m["loss"] < state.best_val
        if improved:
            state.best_val, state.best_step, state.evals_since_best = val_m["loss"], state.step, 0
        else:
            state.evals_since_best += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total_steps - state.step) if done else 0.0
        log(f"ep {min(state.epoch + 1, args.epochs)} step {state.step:4d}/{total_steps} | loss "
            f"train {train_m['loss']:.3f} val {val_m['loss']:.3f}{' *' if improved else ''} | val "
            f"reward chosen {val_m['chosen_reward']:+.3f} rejected {val_m['rejected_reward']:+.3f} "
            f"margin {val_m['margin']:+.3f} | val accuracy reward {val_m['reward_accuracy']:.0%} "
            f"log-prob {val_m['accuracy']:.0%} | "
            f"ETA {format_duration(eta)}")
        return improved

    reason = None
    with StopRequested() as stop:  # from the start: a Ctrl-C during the first evaluation counts
        if not state.history:
            evaluate()
        policy.train()
        while state.epoch < args.epochs and reason is None:
            train_loader.batch_sampler.set_epoch(state.epoch)
            for i, batch in enumerate(train_loader):
                if i < state.batch:  # resuming: these batches were trained on already
                    continue
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss, _, _ = compute_dpo_loss_batch(batch, policy, reference, args.beta)
                if not torch.isfinite(loss):
                    raise ValueError(f"loss became {loss.item()} at step {state.step + 1}; "
                                     f"the last good checkpoint is kept (try a lower --lr)")
                loss.backward()
                optimizer.step()
                state.step, state.batch = state.step + 1, i + 1
                state.tokens_seen += int(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())
                if state.step % args.eval_every == 0 and evaluate():
                    best = copy_weights(policy, into=best)
                if save_due(args.save_every, state.step, time.perf_counter() - last_save):
                    on_save(state, best)
                    last_save = time.perf_counter()
                if stop.requested:
                    raise Interrupted(f"interrupted at step {state.step}", best)
                if reason := stop_reason(state, args.patience, args.max_steps):
                    break
            else:
                state.epoch, state.batch = state.epoch + 1, 0
                on_save(state, best)
                last_save = time.perf_counter()
    if state.history[-1]["step"] != state.step and evaluate():
        best = copy_weights(policy, into=best)
    return reason or f"completed {args.epochs} epochs", best


# ---- checkpoints: the trained weights only, and which start they belong to -----------------
CKPT_FORMAT = "gpt2-instruct-dpo-checkpoint"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def trained_part(weights: dict, model) -> dict:
    """The entries of `weights` that training changes (all, or a LoRA run's adapters)."""
    names = {k for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}
    return {k: v for k, v in weights.items() if k in names}


def save_dpo_checkpoint(path, model, optimizer, state: RunState, best: dict, source: dict) -> None:
    atomic_save({"format": CKPT_FORMAT, "source": source,
                 "policy": trained_part(model.state_dict(), model),
                 "best": trained_part(best, model), "optimizer": optimizer.state_dict(),
                 "state": asdict(state), "torch_rng": torch.get_rng_state()}, path)


def load_dpo_checkpoint(path, model, optimizer, source: dict) -> tuple[RunState, dict]:
    """Continue a run; refused when the starting model file or the LoRA settings changed."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT):
        raise ValueError(f"{path}: not a DPO checkpoint of this project")
    saved = ckpt.get("source") if isinstance(ckpt.get("source"), dict) else {}
    if any(saved.get(k) != source[k] for k in ("sha256", "lora")):  # the path may be spelt anew
        raise ValueError(f"{path}: written for another start ({saved}); this run is {source}")
    try:
        best = dict(copy_weights(model), **ckpt["best"])
        model.load_state_dict(dict(copy_weights(model), **ckpt["policy"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        return RunState(**ckpt["state"]), best
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: damaged DPO checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None


# ---- command line --------------------------------------------------------------------------
def model_default(key: str) -> str:
    """The help's words for a default that depends on the model: "default: 5e-06, tiny 0.0001"."""
    return f"default: {BOOK_DEFAULTS[key]}, tiny {TINY_DEFAULTS[key]}"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="dpo.py")
    p.add_argument("--model-path", type=input_file, default="out/model.pt",
                   help="model.pt written by train.py (or the book's .pth)")
    p.add_argument("--data", type=data_file_or_url, default=DEFAULT_DATA,
                   help="preference pairs {instruction, input, chosen, rejected}: JSON file or URL")
    p.add_argument("--beta", type=positive_float, default=0.1,
                   help="how far the policy may move from the reference (the book's 0.1)")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over the training split")
    p.add_argument("--max-steps", type=non_negative_int, default=0,
                   help="stop after this many steps, 0: no limit")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    p.add_argument("--lr", type=non_negative_float,
                   help=f"AdamW learning rate, 0: the policy stays as it is "
                        f"({model_default('lr')})")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01,
                   help="AdamW weight decay")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"evaluate every N steps, and before the first and after the last; more "
                        f"than the run's steps: only then ({model_default('eval_every')})")
    p.add_argument("--eval-batches", type=non_negative_int, default=5,
                   help="batches per estimate, 0: all of them")
    p.add_argument("--patience", type=non_negative_int, default=0,
                   help="stop after N evaluations without a new best validation loss, 0: never")
    p.add_argument("--max-length", type=positive_int,
                   help="cut rows to N tokens, at most the model's context length (default: "
                        "that length)")
    p.add_argument("--lora-rank", type=non_negative_int, default=0,
                   help="train LoRA adapters of this rank; the reference is then the base with "
                        "the adapters off, no second copy, 0: every weight trains")
    p.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA scale")
    p.add_argument("--lora-targets", nargs="+", metavar="LAYER",
                   help="layers that get adapters: qkv out_proj fc proj out_head (default: all)")
    add_run_flags(p, "out-dpo")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else partial(print, flush=True)  # seen as it happens
    out_dir, device = Path(args.out_dir), torch.device(pick_device(args.device))
    data = load_preferences(args.data, log=lambda message: print(message, file=sys.stderr))
    model, cfg = load_model(args.model_path, device)
    if (args.max_length or 0) > cfg["context_length"]:
        raise ValueError(f"--max-length {args.max_length} is more than {args.model_path}'s "
                         f"context length {cfg['context_length']}")
    check_out_dir(out_dir)  # the flags and the files are right: now the folder is made
    for key, value in (TINY_DEFAULTS if cfg.get("name") == "tiny" else BOOK_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    lora = None
    if args.lora_rank:  # imported only for a LoRA run
        from extras import lora
        targets = args.lora_targets or lora.TARGETS
        n = lora.add_lora(model, args.lora_rank, args.lora_alpha, targets)
        log(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha} on {', '.join(targets)}: "
            f"{n:,} trainable parameters; the reference is the base without them")
        model.to(device)  # the new adapters were made on the CPU
    reference = FrozenReference(model, lora)
    style, tokenizer = cfg.get("prompt_style", "alpaca"), get_tokenizer()
    train_data, val_data, test_data = split_data(data)
    log(f"data: {len(train_data)} train / {len(val_data)} validation / {len(test_data)} test pairs")
    max_length = args.max_length or cfg["context_length"]
    train_loader, val_loader = (make_pair_loader(part, tokenizer, style, args.batch_size, shuffle,
                                                 args.seed, max_length, device)
                                for part, shuffle in ((train_data, True), (val_data, False)))
    bf16 = use_bf16(args.precision, device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    source = {"model_path": str(args.model_path), "sha256": file_sha256(args.model_path),
              "lora": [args.lora_rank, args.lora_alpha, args.lora_targets] if lora else None}
    ckpt_path, state, best = out_dir / "checkpoint.pt", RunState(), None
    if args.resume:
        state, best = load_dpo_checkpoint(ckpt_path, model, optimizer, source)
        log(f"resumed from {ckpt_path} at epoch {state.epoch + 1}, step {state.step}")
    log(f"settings: beta {args.beta}, epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, "
        f"eval every {args.eval_every} steps, {'bf16 autocast' if bf16 else 'fp32'} on {device}")
    save = partial(save_dpo_checkpoint, ckpt_path, model, optimizer, source=source)
    start = time.perf_counter()
    try:
        reason, best = train_dpo(model, reference, optimizer, train_loader, val_loader, args,
                                 state, best or copy_weights(model), autocast, save, log)
    except Interrupted as stop:
        save(state, stop.best)
        print(f"{stop}; checkpoint written to {ckpt_path}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best)
    log(f"{reason}; restored the best weights (step {state.best_step}, val loss "
        f"{state.best_val:.3f}); training took {format_duration(train_seconds)}")
    if lora:  # a plain model, as train.py writes
        model = lora.merge_lora(model)
    save_model(model, cfg, out_dir / "model.pt")
    if not args.no_generate:
        log(f"generating responses for {len(test_data)} test entries")
        responses = generate_responses(model.eval(), test_data, tokenizer, style=style,
                                       max_new_tokens=args.max_new_tokens, progress=not args.quiet)
        write_json(out_dir / "preference-data-with-response.json",
                   [dict(e, model_response=r) for e, r in zip(test_data, responses)])
    write_json(out_dir / "metrics.json", {
        "settings": vars(args), "model_config": cfg, "source": source, "history": state.history,
        "best_step": state.best_step, "best_val_loss": state.best_val, "stop_reason": reason,
        "steps": state.step, "response_tokens_seen": state.tokens_seen,
        "train_seconds": train_seconds})
    if not plot_losses(*([h[k] for h in state.history] for k in ("epoch", "tokens", "train_loss",
                                                                 "val_loss")),
                       out_dir / "loss-plot.png"):
        log("loss-plot.png skipped: pip install matplotlib to get the plot")
    log(f"outputs written to {out_dir}/")


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
