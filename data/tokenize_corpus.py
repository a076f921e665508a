"""Tokenize plain text into GPT-2 token shards in the format train_gpt.py reads, offline.

Inputs are text files (one document each), directories (their .txt and .jsonl files, recursively,
in sorted order) and .jsonl files (one document per line, taken from its "text" field). Every
document gets <|endoftext|> (BOS) in front; empty (or whitespace-only) documents are skipped (and
counted). Every --val_every-th document (the 1st, the 1+N-th, ...) goes, whole, to the val split; the
rest go to train. Each split is cut into shards of exactly --shard_tokens tokens (the last one shorter), named
PREFIX_train_000000.bin, PREFIX_val_000000.bin, ...

    python data/tokenize_corpus.py books/ extra.jsonl --out_dir data/mine --prefix mine

The shards are written into a temporary folder beside --out_dir and moved in at the end, so a
failure leaves --out_dir as it was. A non-empty --out_dir is refused unless --force, which replaces
only its PREFIX_train_*/PREFIX_val_* shards (shards of an earlier run would match the trainer's glob).

The GPT-2 ranks come from a local .tiktoken file (--ranks, default data/gpt2.tiktoken), so no
download is needed; documents are encoded on all cores.
"""
import argparse
import base64
import glob
import json
import multiprocessing
import os
import shutil
import sys
import tempfile

import numpy as np
import tiktoken
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt import BOS_ID, write_shard  # noqa: E402

DEFAULT_RANKS = os.path.join(ROOT, "data", "gpt2.tiktoken")
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs, whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = BOS_ID + 1  # 50256 merge ranks plus <|endoftext|>
DEFAULT_SHARD_TOKENS = 10**8  # the size of a FineWeb shard
DEFAULT_VAL_EVERY = 100  # 1% of the documents go to val, as FineWeb's val shard is 1% of its tokens
DOCS_PER_TASK = 16  # documents handed to a worker at a time
DIR_SUFFIXES = (".txt", ".jsonl")


class CorpusError(ValueError):
    """An input or ranks file that cannot be used, with the file named in the message."""


def load_ranks(path):
    """Read a .tiktoken file: one 'base64(token bytes) rank' pair per line."""
    if not os.path.isfile(path):
        raise CorpusError(f"--ranks {path}: no such file (expected a .tiktoken ranks file, e.g. data/gpt2.tiktoken)")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise CorpusError(f"--ranks {path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
    return ranks


def gpt2_encoding(ranks_path=DEFAULT_RANKS):
    """GPT-2's tokenizer built from a local ranks file, so it works without a network."""
    ranks = load_ranks(ranks_path)
    if len(ranks) != BOS_ID or max(ranks.values()) != BOS_ID - 1:
        raise CorpusError(f"--ranks {ranks_path}: {len(ranks)} ranks, expected GPT-2's {BOS_ID} (ids 0..{BOS_ID - 1})")
    return tiktoken.Encoding(
        name="gpt2_local",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: BOS_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def encode_document(encoding, text):
    """BOS followed by the document's tokens; a literal '<|endoftext|>' in the text stays plain text.
    A document of whitespace alone gets no tokens: it is skipped as empty."""
    tokens = encoding.encode_ordinary(text) if text.strip() else []
    return np.array([BOS_ID] + tokens, dtype=np.uint16)


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": the text exactly as stored
            return f.read()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})")


def read_jsonl(path):
    """Yield the "text" field of every non-blank line of a .jsonl file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield json_text(path, lineno, line)


def json_text(path, lineno, line):
    try:
        record = json.loads(line)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise CorpusError(f"{path}:{lineno}: not a valid UTF-8 JSON line ({e})")
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise CorpusError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
    return record["text"]


def input_files(paths):
    """The files named by `paths`, directories expanded to their .txt/.jsonl files in sorted order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(path)
                for name in names
                if name.endswith(DIR_SUFFIXES)
            )
            if not found:
                raise CorpusError(f"{path}: directory holds no {' or '.join(DIR_SUFFIXES)} files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise CorpusError(f"{path}: no such file or directory")
    return files


def iter_documents(paths):
    """Document texts in input order: a whole text file, or one line of a .jsonl file."""
    for path in input_files(paths):
        if path.endswith(".jsonl"):
            yield from read_jsonl(path)
        else:
            yield read_text(path)


_worker_encoding = None


def _init_worker(ranks_path):
    global _worker_encoding
    _worker_encoding = gpt2_encoding(ranks_path)


def _encode_in_worker(text):
    return encode_document(_worker_encoding, text)


def encode_documents(texts, ranks_path=DEFAULT_RANKS, workers=None):
    """Yield each text's tokens (BOS first), in order, encoding on `workers` processes (default: all cores)."""
    workers = workers or os.cpu_count()
    gpt2_encoding(ranks_path)  # a bad ranks file fails here, not in every worker's initializer
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(ranks_path,)) as pool:
        yield from pool.imap(_encode_in_worker, texts, chunksize=DOCS_PER_TASK)


class ShardWriter:
    """Cut a stream of token arrays into shards of exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, out_dir, stem, shard_tokens):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
        self.out_dir, self.stem = out_dir, stem
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.paths = []

    def add(self, tokens):
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buffer):
                self._flush()

    def _flush(self):
        path = os.path.join(self.out_dir, f"{self.stem}_{len(self.paths):06d}.bin")
        write_shard(path, self.buffer[: self.fill])
        self.paths.append(path)
        self.fill = 0

    def close(self):
        """Write what is left; return the paths of all shards written."""
        if self.fill:
            self._flush()
        return self.paths


def write_splits(token_arrays, is_val, out_dir, prefix, shard_tokens=DEFAULT_SHARD_TOKENS):
    """Write documents to PREFIX_val_* when is_val(index) else PREFIX_train_*, skipping empty ones
    (index counts the others). Returns the train paths, the val paths and how many were skipped."""
    train = ShardWriter(out_dir, f"{prefix}_train", shard_tokens)
    val = ShardWriter(out_dir, f"{prefix}_val", shard_tokens)
    bar = tqdm(token_arrays, unit="doc", desc="tokenizing")
    total = kept = skipped = 0
    for tokens in bar:
        if len(tokens) == 1:  # BOS alone: the document had no text
            skipped += 1
            continue
        (val if is_val(kept) else train).add(tokens)
        kept += 1
        total += len(tokens)
        bar.set_postfix(tokens=total, refresh=False)
    return train.close(), val.close(), skipped


def output_shards(folder, prefix):
    """The shards a run with this prefix writes into folder (and the trainer's glob would pick up)."""
    stem = os.path.join(folder, glob.escape(prefix))
    return sorted(glob.glob(f"{stem}_train_*.bin") + glob.glob(f"{stem}_val_*.bin"))


def check_out_dir(out_dir, prefix, force):
    """Refuse a non-empty --out_dir without --force, before any work is done."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        old = len(output_shards(out_dir, prefix))
        raise CorpusError(f"--out_dir {out_dir} is not empty ({old} {prefix}_* shards of an earlier run among its files); "
                          f"use --force to replace its {prefix}_train_*/{prefix}_val_* shards (other files are kept), "
                          "or choose another --out_dir")


def write_corpus(token_arrays, is_val, out_dir, prefix, shard_tokens=DEFAULT_SHARD_TOKENS):
    """write_splits into a temporary folder beside out_dir, then move the shards in, replacing the
    prefix's old ones: a failure on the way leaves out_dir as it was. Returns the train paths, the val
    paths (both in out_dir) and how many empty documents were skipped."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp", dir=parent)
    try:
        train, val, skipped = write_splits(token_arrays, is_val, staging, prefix, shard_tokens)
        if not train:
            why = ("every document went to the val split (the 1st always does; --val_every=0 puts none there)"
                   if val else "the inputs hold no text")
            raise CorpusError(f"no training documents: {why}")
        os.makedirs(out_dir, exist_ok=True)
        for path in output_shards(out_dir, prefix):
            os.remove(path)
        for path in train + val:
            os.replace(path, os.path.join(out_dir, os.path.basename(path)))
        final = lambda paths: [os.path.join(out_dir, os.path.basename(p)) for p in paths]
        return final(train), final(val), skipped
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text files, .jsonl files, or directories of them")
    parser.add_argument("--out_dir", required=True, help="where the shards go (created if missing; must be empty)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out_dir, replacing only its PREFIX_train_*/PREFIX_val_* shards")
    parser.add_argument("--prefix", default="corpus", help="shard names start with this (default: corpus)")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--val_every", type=int, default=DEFAULT_VAL_EVERY,
                        help=f"every N-th document goes to the val split (default {DEFAULT_VAL_EVERY}; 0 = no val split)")
    parser.add_argument("--ranks", default=DEFAULT_RANKS, help="GPT-2 .tiktoken ranks file")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    args = parser.parse_args(argv)
    for flag in ("shard_tokens", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.val_every < 0:
        parser.error(f"--val_every must be 0 or more, got {args.val_every}")
    is_val = (lambda i: i % args.val_every == 0) if args.val_every else (lambda i: False)
    try:
        input_files(args.inputs)  # a missing input or a used --out_dir fails before any work starts
        check_out_dir(args.out_dir, args.prefix, args.force)
        tokens = encode_documents(iter_documents(args.inputs), args.ranks, args.workers)
        train, val, skipped = write_corpus(tokens, is_val, args.out_dir, args.prefix, args.shard_tokens)
    except (CorpusError, OSError) as e:  # OSError: e.g. an --out_dir that cannot be written
        raise SystemExit(f"error: {e}")
    if skipped:
        print(f"skipped {skipped} empty documents", file=sys.stderr)
    for path in val + train:
        print(path)


if __name__ == "__main__":
    main()
