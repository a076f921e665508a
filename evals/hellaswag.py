"""HellaSwag accuracy of a checkpoint written by train_gpt.py, scored the usual way for base models.

    python evals/hellaswag.py logs/RUN_ID/CHECKPOINT --data=hellaswag_val.jsonl [--limit=N] [--out=FILE]

Each example is a context and four endings, one of them right. Every ending is scored by the
cross-entropy of its tokens given BOS + the context (the ending tokenized with a leading space,
as it follows the context's last word), averaged over the ending's tokens; the prediction is the
ending with the lowest mean (the accuracy also shown by summed loss favours short endings). The
input is one JSON object per line with at least `ctx` (text), `endings` (4 texts) and `label`
(0-3), as in HellaSwag's own files; the validation set is at DATA_URL (below).
"""
import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from data.tokenize_corpus import gpt2_encoding  # noqa: E402
from train_gpt import BOS_ID, CheckpointError  # noqa: E402

NUM_ENDINGS = 4  # HellaSwag's endings per example
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"  # 10,042 examples


class DataError(ValueError):
    """A line of the data file that is not a HellaSwag example, named by file:line."""


def check_example(where, example):
    """Raise DataError, naming `where` (file:line) and the field, unless `example` has a usable
    ctx, endings and label."""
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
    if not isinstance(example.get("ctx"), str):
        raise DataError(f"{where}: field 'ctx' must be a string, got {example.get('ctx')!r:.60}")
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise DataError(f"{where}: field 'endings' must be a list of {NUM_ENDINGS} strings, got {endings!r:.60}")
    label = example.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise DataError(f"{where}: field 'label' must be an integer 0-{NUM_ENDINGS - 1}, got {label!r}")


def read_examples(path, limit=None):
    """The first `limit` (None: all) examples of a jsonl file, each checked; blank lines are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"--data={path}: no such file; HellaSwag's validation set is one download: curl -LO {DATA_URL}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            check_example(where, example)
            examples.append(example)
    return examples


def ending_losses(model, windows, context, ending):
    """Per-token cross-entropy [len(ending)] of the `ending` token ids after BOS + `context` ids."""
    tokens = [BOS_ID, *context, *ending]
    idx = torch.tensor(sample.within_context(tokens[:-1], model.cfg.max_seq_len), device=model.lm_head.device)
    logits = sample.softcapped_logits(model, idx, windows)[-len(ending) :]
    return F.cross_entropy(logits, torch.tensor(ending, device=logits.device), reduction="none")


def score(model, windows, enc, example):
    """Mean and summed loss of each ending, and the predictions by each."""
    context = enc.encode_ordinary(example["ctx"])
    losses = [ending_losses(model, windows, context, enc.encode_ordinary(" " + e)) for e in example["endings"]]
    mean = [l.mean().item() for l in losses]
    total = [l.sum().item() for l in losses]
    return dict(label=example["label"], pred=mean.index(min(mean)), pred_sum=total.index(min(total)),
                mean_loss=mean, sum_loss=total)


def evaluate(model, examples, enc):
    """score() of every example, in order."""
    windows = sample.final_windows(model.cfg)
    return [score(model, windows, enc, ex) for ex in tqdm(examples, desc="hellaswag", disable=None)]


def check_writable(path):
    """Refuse an --out that cannot be written before scoring, not after: its folder must exist and
    take a new file, and an existing file must be writable."""
    folder = os.path.dirname(os.path.abspath(path))
    why = None
    if os.path.isdir(path):
        why = "it is a directory"
    elif not os.path.isdir(folder):
        why = f"no such directory {folder}"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        why = "the file is read-only"
    else:
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            why = f"cannot create a file in {folder}: {e.strerror or e}"
    if why:
        raise SystemExit(f"error: --out={path}: cannot write there ({why})")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a checkpoint written by train_gpt.py.")
    parser.add_argument("checkpoint", help="a checkpoint written by a run")
    parser.add_argument("--data", required=True, help=f"HellaSwag jsonl (ctx, endings, label per line), e.g. {DATA_URL}")
    parser.add_argument("--limit", type=sample.bounded(int, 1), default=None, help="score only the first N examples")
    parser.add_argument("--out", default=None, help="write one JSON line per example (losses, prediction) here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is one")
    return parser.parse_args(argv)


def main(argv=None):
    """Print the accuracy; return (accuracy by mean loss, accuracy by summed loss).
    A bad flag: argparse's error, exit 2; a bad checkpoint, data file or line, or an --out that
    cannot be written: one error line, exit 1, before any scoring."""
    args = parse_args(argv)
    if args.out:
        check_writable(args.out)
    try:
        examples = read_examples(args.data, args.limit)
        _, model = sample.load_model(args.checkpoint, args.device)
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if not examples:
        raise SystemExit(f"error: --data={args.data}: no examples in the file")
    results = evaluate(model, examples, gpt2_encoding())
    if args.out:
        with open(args.out, "w") as f:
            for example, result in zip(examples, results):
                f.write(json.dumps({"ind": example.get("ind"), **result}) + "\n")
    n = len(results)
    acc = sum(r["pred"] == r["label"] for r in results) / n
    acc_sum = sum(r["pred_sum"] == r["label"] for r in results) / n
    print(f"hellaswag: {n} examples of {args.data}: acc {acc:.4f} ({round(acc * n)}/{n}) by mean loss per token, "
          f"acc {acc_sum:.4f} by summed loss")
    return acc, acc_sum


if __name__ == "__main__":
    main()
