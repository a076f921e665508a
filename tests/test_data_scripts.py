"""Tests of the data tools: the FineWeb downloader (against a local stand-in for the hub), the
offline GPT-2 tokenizer, and the bundled sample shards."""
import hashlib
import http.server
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tiktoken_ext.openai_public

from train_gpt import BOS_ID, HEADER_BYTES, read_shard, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
DOWNLOADER = os.path.join(DATA, "cached_fineweb10B.py")
TOKENIZER = os.path.join(DATA, "tokenize_corpus.py")
BUILD_SAMPLE = os.path.join(DATA, "build_sample.py")
GPT2_VOCAB = 50257
SCRIPT_TIMEOUT = 60  # seconds for one run of a script
SERVER_LIFETIME = 90  # the fake hub shuts itself down after this many seconds at the latest
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def load_script(name, path):
    """Import a script by path, registered in sys.modules so multiprocessing can pickle its objects."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tokenize_corpus = load_script("tokenize_corpus", TOKENIZER)
fineweb = load_script("cached_fineweb10B", DOWNLOADER)
build_sample = load_script("build_sample", BUILD_SAMPLE)


def run_script(path, *args, env=None):
    return subprocess.run(
        [sys.executable, path, *map(str, args)],
        capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, env={**os.environ, **(env or {})},
    )


def split_documents(tokens):
    """Cut a token stream at its BOS tokens; every piece starts with BOS."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return [tokens[a:b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


# ------------------------------------------------------------------------------------------------
# The downloader, against a local HTTP server that answers like the Hugging Face hub
# ------------------------------------------------------------------------------------------------


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves `files` (name -> bytes) the way huggingface_hub 2.4 expects: HEAD and GET on
    /datasets/<repo>/resolve/<revision>/<name>, with X-Repo-Commit, ETag and Content-Length; a
    missing file gets 404 with X-Error-Code: EntryNotFound. Records every request."""

    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.files = files
        self.requests = []


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a handler thread forever

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        self.server.requests.append((self.command, self.path))
        prefix = f"/datasets/{fineweb.REPO_ID}/resolve/main/"
        name = self.path[len(prefix) :] if self.path.startswith(prefix) else None
        body = self.server.files.get(name)
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", FAKE_COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    """A FakeHub serving in a thread of this process, stopped after the test (or by its deadline)."""
    hub = FakeHub({})
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    deadline = threading.Timer(SERVER_LIFETIME, hub.shutdown)
    deadline.daemon = True
    thread.start()
    deadline.start()
    try:
        yield hub
    finally:
        deadline.cancel()
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)


def shard_bytes(tmp_path, name, tokens):
    path = tmp_path / f"served_{name}"
    write_shard(path, np.asarray(tokens, dtype=np.uint16))
    return path.read_bytes()


def run_downloader(hub_or_url, num_train, folder, tmp_path):
    endpoint = hub_or_url if isinstance(hub_or_url, str) else f"http://127.0.0.1:{hub_or_url.server_port}"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    return run_script(DOWNLOADER, num_train, "--dir", folder, env=env)


def shard_requests(hub):
    """(method, file name) of the requests for files of the dataset; huggingface_hub also asks
    the hub for other things, such as /api/agent-harnesses, which the test does not care about."""
    prefix = f"/datasets/{fineweb.REPO_ID}/resolve/main/"
    return [(method, path[len(prefix) :]) for method, path in hub.requests if path.startswith(prefix)]


def test_downloader_fetches_verifies_and_skips_complete_files(fake_hub, tmp_path):
    rng = np.random.default_rng(0)
    names = fineweb.shard_names(2)
    assert names == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    fake_hub.files = {name: shard_bytes(tmp_path, name, rng.integers(0, GPT2_VOCAB, 300 + 100 * i)) for i, name in enumerate(names)}
    out = tmp_path / "fineweb"

    first = run_downloader(fake_hub, 2, out, tmp_path)
    assert first.returncode == 0, first.stderr
    for name in names:
        assert (out / name).read_bytes() == fake_hub.files[name]
        assert shard_requests(fake_hub).count(("GET", name)) == 1

    # A complete file is not asked for again; a truncated one is fetched again.
    broken = out / names[2]
    broken.write_bytes(fake_hub.files[names[2]][:-10])
    fake_hub.requests.clear()
    second = run_downloader(fake_hub, 2, out, tmp_path)
    assert second.returncode == 0, second.stderr
    assert {name for _, name in shard_requests(fake_hub)} == {names[2]}
    assert broken.read_bytes() == fake_hub.files[names[2]]
    assert "2 of 3 shards already in" in second.stdout

    fake_hub.requests.clear()
    third = run_downloader(fake_hub, 2, out, tmp_path)
    assert third.returncode == 0 and shard_requests(fake_hub) == []


def test_downloader_reports_a_file_missing_on_the_hub(fake_hub, tmp_path):
    fake_hub.files = {fineweb.VAL_FILE: shard_bytes(tmp_path, "val", [BOS_ID, 1, 2, 3])}
    result = run_downloader(fake_hub, 1, tmp_path / "fw", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: fineweb_train_000001.bin is not on http://127.0.0.1" in result.stderr
    assert "404" in result.stderr
    assert read_shard(tmp_path / "fw" / fineweb.VAL_FILE).tolist() == [BOS_ID, 1, 2, 3]


def test_downloader_deletes_and_reports_a_corrupt_download(fake_hub, tmp_path):
    good = shard_bytes(tmp_path, "val", np.arange(100))
    fake_hub.files = {fineweb.VAL_FILE: good[: HEADER_BYTES + 2 * 60]}  # header promises 100 tokens, body has 60
    result = run_downloader(fake_hub, 0, tmp_path / "fw", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: downloaded {fineweb.VAL_FILE} is corrupt and was deleted" in result.stderr
    assert "header promises 100 tokens" in result.stderr
    assert not (tmp_path / "fw" / fineweb.VAL_FILE).exists()


def test_downloader_reports_an_unreachable_hub(tmp_path):
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_downloader(f"http://127.0.0.1:{port}", 1, tmp_path / "fw", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: cannot reach http://127.0.0.1:{port} (dataset kjj0/fineweb10B-gpt2)" in result.stderr


def test_downloader_keeps_a_corrupt_local_file_when_the_hub_is_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "fw"
    folder.mkdir()
    partial = shard_bytes(tmp_path, "val", np.arange(100))[:-10]
    (folder / fineweb.VAL_FILE).write_bytes(partial)
    result = run_downloader(f"http://127.0.0.1:{port}", 0, folder, tmp_path)
    assert result.returncode == 1 and "error: cannot reach" in result.stderr
    assert (folder / fineweb.VAL_FILE).read_bytes() == partial  # still there: maybe more than nothing


def test_downloader_rejects_a_bad_shard_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        fineweb.main(["104", "--dir", str(tmp_path)])
    assert exit.value.code == 2
    assert "num_train must be between 0 and 103, got 104" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------

TRICKY_TEXT = (
    "Hello world! It's 2024; they'll say \"we've\" paid $3.50 for 12,000 caf\u00e9s.\n\n"
    "  Indented\tline \u2014 with em dash, \u65e5\u672c\u8a9e and emoji \U0001F600 \r\n trailing   \n"
)


@pytest.fixture(scope="module")
def encoding():
    return tokenize_corpus.gpt2_encoding()


def test_encoding_gives_gpt2_ids(encoding):
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [BOS_ID]
    assert encoding.n_vocab == GPT2_VOCAB
    assert encoding.decode(encoding.encode(TRICKY_TEXT)) == TRICKY_TEXT


def test_split_pattern_agrees_with_tiktokens_gpt2_pattern(encoding):
    """tiktoken's own (possessive-quantifier) GPT-2 pattern must split text the same way."""
    reference = tokenize_corpus.tiktoken.Encoding(
        name="reference",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=tokenize_corpus.load_ranks(tokenize_corpus.DEFAULT_RANKS),
        special_tokens={"<|endoftext|>": BOS_ID},
    )
    text = TRICKY_TEXT * 3 + "   \n\n\n x  y   'S 'LL don't I'm   "
    assert encoding.encode_ordinary(text) == reference.encode_ordinary(text)


def test_encode_document_puts_bos_first_and_keeps_literal_end_of_text_as_text(encoding):
    tokens = tokenize_corpus.encode_document(encoding, "a <|endoftext|> b")
    assert tokens.dtype == np.uint16
    assert tokens[0] == BOS_ID and (tokens == BOS_ID).sum() == 1
    assert encoding.decode(tokens[1:].tolist()) == "a <|endoftext|> b"


def test_tokenize_cli_directory_and_jsonl_with_val_split(tmp_path, encoding):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {
        "a.txt": "First document, kept whole for val.",
        "b.txt": TRICKY_TEXT,
        "skip.md": "not a .txt or .jsonl file, so a directory scan leaves it out",
    }
    for name, text in texts.items():
        (corpus / name).write_text(text, encoding="utf-8", newline="")
    lines = ["Line one of the jsonl.", "Line two, with <|endoftext|> inside."]
    (corpus / "sub" / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)) + "\n\n")
    out = tmp_path / "out"

    result = run_script(TOKENIZER, corpus, "--out_dir", out, "--prefix", "tiny", "--val_every", 4, "--shard_tokens", 20, "--workers", 2)
    assert result.returncode == 0, result.stderr

    val_files = sorted(out.glob("tiny_val_*.bin"))
    train_files = sorted(out.glob("tiny_train_*.bin"))
    assert [f.name for f in val_files] == ["tiny_val_000000.bin"]
    train_shards = [read_shard(f, vocab_size=GPT2_VOCAB) for f in train_files]
    assert all(len(s) == 20 for s in train_shards[:-1]) and 0 < len(train_shards[-1]) <= 20
    val_docs = split_documents(read_shard(val_files[0]))
    train_docs = split_documents(np.concatenate(train_shards))
    assert [encoding.decode(d[1:].tolist()) for d in val_docs] == [texts["a.txt"]]
    assert [encoding.decode(d[1:].tolist()) for d in train_docs] == [TRICKY_TEXT] + lines
    assert train_shards[0][0] == BOS_ID
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]  # no staging folder left behind


def jsonl_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tokenize(*args):
    return tokenize_corpus.main([*map(str, args), "--workers", "1"])


def decoded(encoding, paths):
    return [encoding.decode(d[1:].tolist()) for p in paths for d in split_documents(read_shard(p))]


def test_tokenize_skips_empty_documents_and_splits_every_nth_to_val(tmp_path, encoding, capsys):
    texts = ["d0", "", "d1", "d2", " \n\t ", "d3", "d4"]
    tokenize(jsonl_corpus(tmp_path / "c.jsonl", texts), "--out_dir", tmp_path / "out", "--val_every", 3)
    out = tmp_path / "out"
    assert decoded(encoding, sorted(out.glob("corpus_val_*.bin"))) == ["d0", "d3"]  # kept documents 0 and 3
    assert decoded(encoding, sorted(out.glob("corpus_train_*.bin"))) == ["d1", "d2", "d4"]
    assert "skipped 2 empty documents" in capsys.readouterr().err  # whitespace alone counts as empty


def test_tokenize_one_document_says_how_to_train_on_it(tmp_path, encoding):
    """The first document always goes to val, whatever --val_every: only 0 keeps it for training."""
    corpus = jsonl_corpus(tmp_path / "c.jsonl", ["the only document"])
    with pytest.raises(SystemExit) as e:
        tokenize(corpus, "--out_dir", tmp_path / "out", "--val_every", 1000)
    assert "--val_every=0 puts none there" in str(e.value.code)
    tokenize(corpus, "--out_dir", tmp_path / "out", "--val_every", 0)
    assert decoded(encoding, sorted((tmp_path / "out").glob("corpus_train_*.bin"))) == ["the only document"]


def test_tokenize_writes_a_val_split_by_default(tmp_path, encoding):
    texts = [f"document {i}" for i in range(2 * tokenize_corpus.DEFAULT_VAL_EVERY + 1)]
    tokenize(jsonl_corpus(tmp_path / "c.jsonl", texts), "--out_dir", tmp_path / "out")
    val = decoded(encoding, sorted((tmp_path / "out").glob("corpus_val_*.bin")))
    assert val == ["document 0", "document 100", "document 200"]


def test_tokenize_refuses_a_used_out_dir_and_force_replaces_only_its_shards(tmp_path, encoding):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    write_shard(out / "corpus_train_000007.bin", np.array([BOS_ID, 1], dtype=np.uint16))  # an earlier, larger run
    write_shard(out / "other_train_000000.bin", np.array([BOS_ID, 2], dtype=np.uint16))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    corpus = jsonl_corpus(tmp_path / "c.jsonl", ["new val", "new train"])
    with pytest.raises(SystemExit) as exit:
        tokenize(corpus, "--out_dir", out, "--val_every", 2)
    assert str(exit.value).startswith(f"error: --out_dir {out} is not empty (1 corpus_* shards of an earlier run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    tokenize(corpus, "--out_dir", out, "--val_every", 2, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["corpus_train_000000.bin", "corpus_val_000000.bin", "notes.txt",
                                                    "other_train_000000.bin"]
    assert (out / "other_train_000000.bin").read_bytes() == before["other_train_000000.bin"]
    assert decoded(encoding, [out / "corpus_train_000000.bin"]) == ["new train"]


def test_tokenize_failure_leaves_nothing_half_made(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    jsonl_corpus(corpus / "a.jsonl", [f"good document number {i}" for i in range(20)])  # several shards of 8 tokens
    (corpus / "b.txt").write_bytes(b"\xff not UTF-8")
    with pytest.raises(SystemExit) as exit:
        tokenize(corpus, "--out_dir", tmp_path / "out", "--shard_tokens", 8)
    assert "b.txt: not UTF-8 text" in str(exit.value)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # neither out nor a staging folder


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"txt": "no text field"}\n', 'bad.jsonl:2: expected a JSON object with a string "text" field'),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl:2: not a valid UTF-8 JSON line"),
        ("bad.txt", b"\xff\xfe latin-1 bytes", "bad.txt: not UTF-8 text"),
    ],
)
def test_tokenize_cli_names_the_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit:
        tokenize_corpus.main([str(path), "--out_dir", str(tmp_path / "out"), "--workers", "1"])
    assert str(exit.value).startswith("error: ") and message in str(exit.value)


def test_tokenize_cli_rejects_a_bad_ranks_file(tmp_path):
    ranks = tmp_path / "short.tiktoken"
    ranks.write_text("SGVsbG8= 0\n")
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(SystemExit) as exit:
        tokenize_corpus.main([str(tmp_path / "a.txt"), "--out_dir", str(tmp_path / "out"), "--ranks", str(ranks)])
    assert str(exit.value) == f"error: --ranks {ranks}: 1 ranks, expected GPT-2's 50256 (ids 0..50255)"


# ------------------------------------------------------------------------------------------------
# The bundled sample corpus
# ------------------------------------------------------------------------------------------------

SAMPLE_TRAIN = os.path.join(DATA, "sample", "sample_train_000000.bin")
SAMPLE_VAL = os.path.join(DATA, "sample", "sample_val_000000.bin")
MIN_SAMPLE_TRAIN_TOKENS = 2_500_000
MIN_SAMPLE_VAL_TOKENS = 150_000
MAX_SAMPLE_BYTES = 20 * 2**20
LEAK_WINDOW = 64  # tokens of each val document looked for in train
CPU_MAX_SEQ_LEN = 512  # the cpu preset's max_seq_len
MIN_SERVABLE = 0.6  # share of the sample's tokens in documents' first CPU_MAX_SEQ_LEN tokens


def test_sample_shards_are_valid_and_big_enough():
    train = read_shard(SAMPLE_TRAIN, vocab_size=GPT2_VOCAB)
    val = read_shard(SAMPLE_VAL, vocab_size=GPT2_VOCAB)
    assert len(train) >= MIN_SAMPLE_TRAIN_TOKENS
    assert len(val) >= MIN_SAMPLE_VAL_TOKENS
    assert train[0] == BOS_ID and val[0] == BOS_ID
    assert os.path.getsize(SAMPLE_TRAIN) + os.path.getsize(SAMPLE_VAL) < MAX_SAMPLE_BYTES


def test_sample_val_documents_are_not_in_train():
    train_bytes = read_shard(SAMPLE_TRAIN).tobytes()
    for doc in split_documents(read_shard(SAMPLE_VAL)):
        window = doc[:LEAK_WINDOW].tobytes()
        at = train_bytes.find(window)
        while at >= 0 and at % 2:  # only token-aligned matches count
            at = train_bytes.find(window, at + 1)
        assert at < 0, f"a val document's first {LEAK_WINDOW} tokens occur in train"


@pytest.mark.parametrize("path", [SAMPLE_TRAIN, SAMPLE_VAL])
def test_sample_documents_are_short_enough_for_the_cpu_preset(path):
    """The train loader drops what a document holds beyond max_seq_len, so the sample is cut into short documents."""
    tokens = read_shard(path)
    lengths = np.diff(np.append(np.flatnonzero(tokens == BOS_ID), len(tokens)))
    servable = np.minimum(lengths, CPU_MAX_SEQ_LEN).sum() / len(tokens)
    assert servable >= MIN_SERVABLE, f"only {servable:.1%} of {path}'s tokens are servable at max_seq_len={CPU_MAX_SEQ_LEN}"


def test_build_sample_cuts_units_between_lines_within_the_limit():
    def count(line):  # one token per word, one for the newline
        return len(line.split()) + 1

    para = lambda n, w: "\n".join(" ".join(["w"] * w) for _ in range(n))  # n lines of w words
    overlong = " ".join(["x"] * 60)
    text = "\n\n".join(["HEAD", para(3, 4), para(5, 9), "  " + para(4, 9), overlong, para(2, 3), "END"])
    pieces = build_sample.cut_unit(text, count, limit=40)
    assert [line for piece in pieces for line in piece.split("\n") if line.strip()] == [
        line for line in text.split("\n") if line.strip()
    ]  # every line once, in order, none cut
    for piece in pieces:
        size = 1 + sum(count(line) for line in piece.split("\n"))
        assert size <= 40 or piece == overlong
    assert pieces[0].startswith("HEAD\n")  # the short heading is not a piece of its own
    assert build_sample.cut_unit("short\n\ntext", count, limit=40) == ["short\n\ntext"]
    heading = build_sample.PLAY_OR_POEM_HEADING
    play = "TITLE\n\nACT I.\n\nScene I. A room.\n\nA.\nHi.\n\nScene II. A hall.\n\nB.\nI\n\nACT II.\n\nScene I.\nC."
    assert build_sample.natural_units(play, heading) == [
        "TITLE", "ACT I.\n\nScene I. A room.\n\nA.\nHi.", "Scene II. A hall.\n\nB.\nI", "ACT II.\n\nScene I.\nC."
    ]


# the model part of a run made tiny; appended to a command, these win over its preset (later flags do)
TINY_MODEL = ["--n_layer=2", "--value_embeds=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128", "--long_window_layers=1",
              "--skip_from=0", "--skip_to=1", "--backout_layer=0", "--progress=false", "--save_final=false"]


def readme_commands(section):
    """The command lines of the README section `section`'s code block."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = text.split("```\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_readmes_own_text_example_works_on_a_small_corpus(tmp_path, encoding):
    """The README's two commands for one's own text, as written, on a corpus of about 220,000 tokens
    (the size it names): the tokenizer splits it, the trainer's start checks pass, and its loaders
    hand out every batch of the shortened schedule and the validation tokens (the model made tiny
    and not trained, so the test is quick; the data and schedule flags are the README's)."""
    import torch

    import train_gpt as tg

    tokenize_cmd, train_cmd = readme_commands("Training on your own text")
    rng = np.random.default_rng(0)
    words = [encoding.decode([int(t)]) for t in rng.integers(300, 20000, 3000)]
    texts = [" ".join(rng.choice(words, int(rng.integers(40, 200)))) for _ in range(950)]
    (tmp_path / "my_texts").mkdir()
    for i, text in enumerate(texts[:400]):
        (tmp_path / "my_texts" / f"doc{i}.txt").write_text(text)
    jsonl_corpus(tmp_path / "more.jsonl", texts[400:])
    assert tokenize_cmd[:2] == ["python", "data/tokenize_corpus.py"] and train_cmd[:2] == ["python", "train_gpt.py"]
    tokenize_args = [a.replace("data/mine", str(tmp_path / "mine")) for a in tokenize_cmd[2:]]
    tokenized = subprocess.run([sys.executable, TOKENIZER, *tokenize_args, "--workers", "1"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert tokenized.returncode == 0, tokenized.stderr
    total = sum(read_shard(p).size for p in (tmp_path / "mine").glob("*.bin"))
    assert 180_000 < total < 260_000, total
    train_args = [a.replace("data/mine", str(tmp_path / "mine")) for a in train_cmd[2:]]
    cfg = tg.parse_args([*train_args, *TINY_MODEL, f"--log_dir={tmp_path}/logs", "--run_id=mine"])
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    trainer = tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))
    for step in range(trainer.schedule.total):
        for _ in range(trainer.accum):
            trainer.train_loader.next_batch(trainer.schedule.batch_tokens(step) // trainer.parts, cfg.max_seq_len)
    assert sum(x.numel() for x, _ in trainer.val_loader) == cfg.val_tokens == 16384
