"""Sample text from a checkpoint written by train_gpt.py.

    python sample.py logs/RUN_ID/CHECKPOINT --prompt="The meaning of life is" --max_tokens=100

The model reads one packed token sequence in which every document starts with <|endoftext|>
(BOS), so the prompt gets BOS in front, and a sampled BOS ends the document (and the sample).
The prompt is printed first, then each token as it is drawn. A KV cache keeps the context's keys
and values, so a new token runs the model on itself and the two tokens before it. The context
is kept to `max_seq_len` tokens, no document piece in training was longer: when it is full it
starts again from BOS and the newest half (one pass over those), so the model sees from half to
all of max_seq_len. The attention windows are those of the run's final validation.
"""
import argparse
import codecs
import dataclasses

import torch
import torch.nn.functional as F

import train_gpt as tg
from data.tokenize_corpus import gpt2_encoding

MAX_TOKENS = 10_000  # --max_tokens at most: about 7,500 words, minutes on a CPU
# a decoding step reruns this many cached tokens before the new one: the new token's key offset
# reads the previous token's raw key, which is exact only if that token's smear saw its own previous
RERUN = 2


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
    the raw head outputs through the training's softcap (and LogStableMax under --stablemax), so
    their softmax is the model's distribution."""
    x = model.hidden(idx, windows)
    return tg.predicted_logits(model.logits(x[-1:] if last_only else x), model.cfg)


class KVCache:
    """An attention backend for GPT.hidden that keeps every attention layer's keys and values of
    the context, so a new token costs a pass over a few tokens instead of the whole context.

    Besides attention, three things look back one token: the smear (the previous token's embedding),
    the bigram embedding (the previous token's id) and the key offset on long-window layers (the
    previous token's raw key at that layer, which depends on that token's own smear). So a step
    also runs the RERUN cached tokens before the new one: the first of them comes out wrong (it
    misses its predecessor), the second exact, and so the new token. All of them attend to the cached keys and values; only the new token's are added.
    """

    def __init__(self, model, windows):
        self.model, self.windows = model, windows
        # GPT.logits outside training, with the head cast to the compute dtype once: on a CPU that
        # stores it in fp32 the cast at every token took longer than the rest of a step
        self.head = model.lm_head.to(model.dtype)
        self.keys, self.values = [], []  # per attention layer: [max_seq_len, H, D], the first `length` rows kept
        self.length = 0  # tokens of the context whose keys and values are cached

    def clear(self):
        """Start a new context."""
        self.length = 0

    @torch.no_grad()
    def logits(self, context):
        """Softcapped fp32 logits [padded vocab] of the token after `context` (BOS-led ids, at most
        max_seq_len), which continues the context cached so far: softcapped_logits' last row."""
        model, cfg = self.model, self.model.cfg
        idx = torch.tensor(context, device=self.head.device)
        if cfg.dc_layers:  # DC (#85) mixes every head's attention over its window: keys and values are not enough
            return softcapped_logits(model, idx, self.windows, last_only=True)[0]
        self.start, self.end = max(0, self.length - RERUN), len(context)
        self.docs = (idx == tg.BOS_ID).cumsum(0)  # the model counts from the step's first token
        self.layer = 0
        x = model.hidden(idx[self.start :], self.windows, self, self.start)[-1:]
        self.length = self.end
        return tg.predicted_logits(F.linear(x.to(model.dtype), self.head), cfg)[0]

    def mask(self, docs, window):
        """[step's tokens, context so far]: the keys each query sees, those of its document at most
        `window` tokens back (FlexAttention's rule), by the context's documents, not `docs`. For a
        paired layer (#58) `docs` holds each token twice, and so do the rows and columns here."""
        pair = docs.numel() // (self.end - self.start)
        ids = self.docs.repeat_interleave(pair)
        q = torch.arange(pair * self.start, pair * self.end, device=ids.device)
        k = torch.arange(pair * self.end, device=ids.device)
        back = q[:, None] - k
        return (ids[q][:, None] == ids[k]) & (back >= 0) & (back <= window)

    def __call__(self, q, k, v, mask, scale, need_lse):
        """The step's queries q [n, H, D] against the cached keys and values and the new tokens'
        own (the last rows of k and v [n, H, D]); layers call in order, one call each per step. A
        paired layer (#58) calls with two rows per token, [2n, H/2, D], and caches two per token."""
        pair = q.size(0) // (self.end - self.start)
        if self.layer == len(self.keys):  # the first pass: make this layer's room
            room = (pair * self.model.cfg.max_seq_len, *k.shape[1:])
            self.keys.append(k.new_empty(room))
            self.values.append(v.new_empty(room))
        keys, values = self.keys[self.layer], self.values[self.layer]
        self.layer += 1
        cached, length, end = (pair * n for n in (self.length - self.start, self.length, self.end))
        keys[length:end] = k[cached:]
        values[length:end] = v[cached:]
        s = torch.einsum("qhd,khd->hqk", q, keys[:end]).float() * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = s.logsumexp(-1)
        y = torch.einsum("hqk,khd->qhd", (s - lse[..., None]).exp().to(v.dtype), values[:end])
        return y, (lse.T if need_lse else None)


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
    """Yield up to `max_tokens` new token ids after BOS + `prompt` (ids), each as soon as it is
    drawn; stops early at a sampled BOS."""
    cfg = model.cfg
    cache = KVCache(model, final_windows(cfg))
    context = within_context([tg.BOS_ID, *prompt], cfg.max_seq_len)
    for _ in range(max_tokens):
        # the padded vocabulary's extra ids are no tokens: never sample them
        token = pick(cache.logits(context)[: cfg.vocab_size], temperature, top_k, generator)
        if token == tg.BOS_ID:
            return
        yield token
        context.append(token)
        if len(context) > cfg.max_seq_len:  # full: BOS and the newest half, computed afresh
            context = within_context(context, cfg.max_seq_len // 2 + 1)
            cache.clear()


def stream(enc, prompt, tokens):
    """Print the text `prompt`, then each token's text as it comes (a character that spans tokens
    once it is whole), then a newline, also when Ctrl-C cuts the tokens short."""
    print(prompt, end="", flush=True)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for token in tokens:
            print(text.decode(enc.decode_single_token_bytes(token)), end="", flush=True)
    finally:
        print(text.decode(b"", final=True), flush=True)


def bounded(kind, low, high=None):
    """An argparse type: a number of `kind` that is at least `low` (and at most `high`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value >= low and (high is None or value <= high)):
            number = "an integer" if kind is int else "a number"
            expected = f"{number} >= {low}" if high is None else f"{number} from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Continue a prompt with a model trained by train_gpt.py.")
    parser.add_argument("checkpoint", help="a checkpoint written by a run")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max_tokens", type=bounded(int, 1, MAX_TOKENS), default=100,
                        help=f"new tokens at most per sample (at most {MAX_TOKENS:,})")
    parser.add_argument("--temperature", type=bounded(float, 0), default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top_k", type=bounded(int, 0), default=50, help="draw from the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=bounded(int, 0), default=0, help="seed of the draws: the same seed, the same text")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is one")
    parser.add_argument("--num_samples", type=bounded(int, 1), default=1, help="continuations of the prompt, one after another")
    return parser.parse_args(argv)


def print_samples(args):
    """The prompt and its continuations, printed as they come."""
    try:
        _, model = load_model(args.checkpoint, args.device)
    except tg.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    enc = gpt2_encoding()
    generator = torch.Generator(device=model.lm_head.device).manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt)  # "<|endoftext|>" in a prompt is plain text
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        stream(enc, args.prompt, generate(model, prompt, args.max_tokens, args.temperature, args.top_k, generator))


def main(argv=None):
    """A bad flag: argparse's error, exit 2; a bad checkpoint: one error line, exit 1; Ctrl-C:
    what was printed stays (the line ended), exit 130."""
    args = parse_args(argv)
    try:
        print_samples(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
