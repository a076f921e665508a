"""Sample text from a checkpoint written by train_gpt.py.

    python sample.py logs/RUN_ID/CHECKPOINT --prompt="The meaning of life is" --max_tokens=100

The model reads one packed token sequence in which every document starts with <|endoftext|>
(BOS), so the prompt gets BOS in front, and a sampled BOS ends the document (and the sample).
There is no KV cache: every new token reruns the model on the whole context, which is kept to
the last `max_seq_len` tokens (BOS, then the newest ones): no document piece in training was
longer. The attention windows are those of the run's final validation.
"""
import argparse
import dataclasses

import torch
import torch.nn.functional as F

import train_gpt as tg
from data.tokenize_corpus import gpt2_encoding

def config_from_dict(path, values):
    """Rebuild the Config saved as dataclasses.asdict (lists stand for tuples once it went through JSON)."""
    if not isinstance(values, dict):
        raise tg.CheckpointError(f"{path}: its 'config' is a {type(values).__name__}, expected dataclasses.asdict of a Config")
    known = {f.name for f in dataclasses.fields(tg.Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise tg.CheckpointError(f"{path}: config fields {', '.join(unknown)} are unknown to this train_gpt.py "
                              "(the checkpoint comes from another version of it)")
    return tg.Config(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def load_model(path, device="auto"):
    """(cfg, model): the checkpoint's model on `device` (auto | cpu | cuda), in eval mode, with the
    backend train_gpt.py would pick there (on CPU: the torch ops and the blocked attention)."""
    ckpt = tg.read_checkpoint(path)
    cfg = config_from_dict(path, ckpt["config"])
    cfg.device = device
    backend = tg.setup_backend(cfg)
    model = tg.GPT(cfg, backend.ops, backend.attention, backend.compute_dtype, backend.table_dtype)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise tg.CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({str(e).strip().splitlines()[0]})") from None
    model.tied = bool(ckpt["tied"])
    return cfg, model.to(backend.device).eval()


def final_windows(cfg):
    """The (long, short) attention windows in tokens of the run's final validation."""
    schedule = tg.Schedule(cfg)
    return schedule.windows(schedule.final_window_blocks())


def within_context(tokens, limit):
    """BOS-led `tokens` cut to at most `limit`: BOS and the newest limit - 1 tokens."""
    return tokens if len(tokens) <= limit else tokens[:1] + tokens[len(tokens) - limit + 1 :]


@torch.no_grad()
def softcapped_logits(model, idx, windows, last_only=False):
    """fp32 logits [T, padded vocab] (or [1, ...] for the last position) as the loss sees them:
    the raw head outputs through the training's softcap."""
    cfg = model.cfg
    x = model.hidden(idx, windows)
    z = model.logits(x[-1:] if last_only else x).float()
    return tg.softcap(z, cfg.softcap, cfg.softcap_temp)


def pick(logits, temperature, top_k, generator):
    """The next token from logits [vocab]: the argmax at temperature 0, else a draw from the
    softmax of logits / temperature over the top_k largest (top_k 0: over all)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


def generate(model, prompt, max_tokens, temperature=0.8, top_k=50, generator=None):
    """Up to `max_tokens` new token ids after BOS + `prompt` (ids); stops early at a sampled BOS."""
    cfg = model.cfg
    windows = final_windows(cfg)
    device = model.lm_head.device
    tokens, new = [tg.BOS_ID, *prompt], []
    for _ in range(max_tokens):
        idx = torch.tensor(within_context(tokens, cfg.max_seq_len), device=device)
        # the padded vocabulary's extra ids are no tokens: never sample them
        logits = softcapped_logits(model, idx, windows, last_only=True)[0, : cfg.vocab_size]
        token = pick(logits, temperature, top_k, generator)
        if token == tg.BOS_ID:
            break
        tokens.append(token)
        new.append(token)
    return new


def bounded(kind, low):
    """An argparse type: a number of `kind` that is at least `low`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= low:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {low}, got {text!r}")
        return value
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Continue a prompt with a model trained by train_gpt.py.")
    parser.add_argument("checkpoint", help="a checkpoint written by a run")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max_tokens", type=bounded(int, 1), default=100, help="new tokens at most per sample")
    parser.add_argument("--temperature", type=bounded(float, 0), default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top_k", type=bounded(int, 0), default=50, help="draw from the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=bounded(int, 0), default=0, help="seed of the draws: the same seed, the same text")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is one")
    parser.add_argument("--num_samples", type=bounded(int, 1), default=1, help="continuations of the prompt, one after another")
    return parser.parse_args(argv)


def main(argv=None):
    """Print the continuations. A bad flag: argparse's error, exit 2; a bad checkpoint: one error line, exit 1."""
    args = parse_args(argv)
    try:
        cfg, model = load_model(args.checkpoint, args.device)
    except tg.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    enc = gpt2_encoding()
    generator = torch.Generator(device=model.lm_head.device).manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt)  # "<|endoftext|>" in a prompt is plain text
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(enc.decode(generate(model, prompt, args.max_tokens, args.temperature, args.top_k, generator)), flush=True)


if __name__ == "__main__":
    main()
