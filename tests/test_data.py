"""Data: the shard format and its errors, the BOS-aligned TrainLoader and the ValLoader.

Loader invariants are checked by locating every piece a rank receives in the shard's token array
(each piece must be the start of one document), so overlaps, skipped documents and pieces that do
not start at a BOS are all caught without trusting the loader's own bookkeeping.
"""
import os

import numpy as np
import pytest
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_TRAIN = os.path.join(ROOT, "data", "sample", "sample_train_*.bin")
SAMPLE_VAL = os.path.join(ROOT, "data", "sample", "sample_val_*.bin")
VOCAB = 50257
BOS = 50256


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def raw_shard(path, header, body=b""):
    with open(path, "wb") as f:
        f.write(np.asarray(header, dtype="<i4").tobytes())
        f.write(body)
    return str(path)


def header(magic=20240520, version=1, count=0):
    h = np.zeros(256, dtype="<i4")
    h[:3] = magic, version, count
    return h


def test_shard_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, 5000).astype(np.uint16)
    path = str(tmp_path / "a.bin")
    tg.write_shard(path, tokens)
    # the on-disk layout is the SPEC's: 256 int32 header (magic, version, count), then uint16 tokens
    data = open(path, "rb").read()
    assert len(data) == 1024 + 2 * 5000
    head = np.frombuffer(data[:1024], dtype="<i4")
    assert list(head[:3]) == [20240520, 1, 5000] and not head[3:].any()
    assert np.array_equal(np.frombuffer(data[1024:], dtype="<u2"), tokens)
    back = tg.read_shard(path, VOCAB)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert tg.read_shard_header(path) == 5000
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file left behind
    # an empty shard is legal
    tg.write_shard(str(tmp_path / "e.bin"), np.array([], dtype=np.uint16))
    assert tg.read_shard(str(tmp_path / "e.bin"), VOCAB).size == 0


def test_write_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(tg.ShardError, match="uint16"):
        tg.write_shard(str(tmp_path / "x.bin"), np.array([1, 70000]))


def shard_error(path, vocab=VOCAB):
    with pytest.raises(tg.ShardError) as e:
        tg.read_shard(path, vocab)
    msg = str(e.value)
    assert path in msg
    return msg


def test_bad_magic(tmp_path):
    path = raw_shard(tmp_path / "m.bin", header(magic=12345, count=2), b"\0\0\0\0")
    msg = shard_error(path)
    assert "magic" in msg and "12345" in msg


def test_wrong_version(tmp_path):
    path = raw_shard(tmp_path / "v.bin", header(version=7, count=2), b"\0\0\0\0")
    msg = shard_error(path)
    assert "version" in msg and "7" in msg


def test_empty_file(tmp_path):
    path = str(tmp_path / "empty.bin")
    open(path, "wb").close()
    assert "empty" in shard_error(path)


def test_truncated_header(tmp_path):
    path = str(tmp_path / "h.bin")
    with open(path, "wb") as f:
        f.write(header(count=10).tobytes()[:500])
    msg = shard_error(path)
    assert "truncated" in msg and "header" in msg and "500" in msg


def test_truncated_body(tmp_path):
    path = raw_shard(tmp_path / "b.bin", header(count=10), np.arange(7, dtype="<u2").tobytes())
    msg = shard_error(path)
    assert "truncated" in msg and "10 tokens" in msg


def test_trailing_bytes(tmp_path):
    path = raw_shard(tmp_path / "t.bin", header(count=3), np.arange(3, dtype="<u2").tobytes() + b"\x01")
    msg = shard_error(path)
    assert "trailing" in msg


def test_token_out_of_vocab(tmp_path):
    tokens = np.array([BOS, 5, 6, VOCAB, 7], dtype=np.uint16)
    path = str(tmp_path / "o.bin")
    tg.write_shard(path, tokens)
    msg = shard_error(path)
    assert str(VOCAB) in msg and "position 3" in msg and "vocab" in msg
    assert tg.read_shard(path, VOCAB + 1)[3] == VOCAB  # fine with a larger vocabulary


def test_missing_directory_and_no_matches(tmp_path):
    missing = str(tmp_path / "nowhere" / "train_*.bin")
    with pytest.raises(SystemExit) as e:
        tg.TrainLoader(missing, 0, 1, VOCAB)
    msg = str(e.value.code)
    assert missing in msg and "does not exist" in msg and str(tmp_path / "nowhere") in msg
    empty = str(tmp_path / "train_*.bin")  # the directory exists, nothing matches
    with pytest.raises(SystemExit) as e:
        tg.TrainLoader(empty, 0, 1, VOCAB)
    msg = str(e.value.code)
    assert empty in msg and "no training shards" in msg and "does not exist" not in msg
    with pytest.raises(SystemExit) as e:
        tg.ValLoader(missing, 1024, 256, 0, 1, VOCAB)
    assert "no validation shards" in str(e.value.code)


def test_loader_raises_shard_error_for_a_bad_shard(tmp_path):
    tg.write_shard(str(tmp_path / "d_000.bin"), [BOS, 1, 2, 3] * 50)
    raw_shard(tmp_path / "d_001.bin", header(magic=1, count=4), b"\0" * 8)
    with pytest.raises(tg.ShardError, match="d_001.bin"):
        tg.TrainLoader(str(tmp_path / "d_*.bin"), 0, 1, VOCAB)  # headers are all checked up front


# ------------------------------------------------------------------------------------------------
# TrainLoader
# ------------------------------------------------------------------------------------------------


class Corpus:
    """The concatenated tokens of a set of shards, with a lookup from a piece to its document."""

    def __init__(self, paths):
        self.tokens = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in paths])
        self.bos = np.flatnonzero(self.tokens == BOS)
        self.ends = np.append(self.bos[1:], self.tokens.size)
        self.by_prefix = {}
        for i, s in enumerate(self.bos):
            self.by_prefix.setdefault(self.tokens[s : s + 16].tobytes(), []).append(i)
        self.used = set()

    def locate(self, piece):
        """Index of the unused document that `piece` is a prefix of (AssertionError if none)."""
        assert piece.min() >= 0 and piece.max() < 2**16
        piece = piece.astype(np.uint16)
        candidates = self.by_prefix.get(piece[:16].tobytes(), []) if piece.size >= 16 else range(len(self.bos))
        for i in candidates:
            s = self.bos[i]
            if i not in self.used and s + piece.size <= self.ends[i] and np.array_equal(self.tokens[s : s + piece.size], piece):
                self.used.add(i)
                return i
        raise AssertionError("a piece is not the start of any unused document (overlap or not BOS-aligned)")


def check_step(corpus, batches, tokens, max_seq_len):
    """batches: one (inputs, targets, cu_seqlens) per rank for one step; returns the document ids used."""
    docs_by_rank = []
    for inputs, targets, cu in batches:
        assert inputs.dtype == torch.int64 and targets.dtype == torch.int64
        assert inputs.numel() == tokens and targets.numel() == tokens
        assert torch.equal(targets[:-1], inputs[1:])  # targets are the inputs shifted by one
        buf = torch.cat([inputs, targets[-1:]]).numpy()
        cu = cu.tolist()
        assert cu[0] == 0 and cu[-1] == buf.size and all(b > a for a, b in zip(cu, cu[1:]))
        docs = []
        for k, (a, b) in enumerate(zip(cu, cu[1:])):
            piece = buf[a:b]
            assert piece[0] == BOS
            assert piece.size <= max_seq_len
            d = corpus.locate(piece)
            full = min(corpus.ends[d] - corpus.bos[d], max_seq_len)
            if k < len(cu) - 2:  # only the last piece of a buffer may be cut short by the batch size
                assert piece.size == full
            docs.append(d)
        docs_by_rank.append(docs)
    # ranks take consecutive runs of documents, rank 0 first, with nothing skipped
    flat = [d for docs in docs_by_rank for d in docs]
    assert flat == list(range(flat[0], flat[0] + len(flat)))
    return flat


def loaders(pattern, world):
    return [tg.TrainLoader(pattern, r, world, VOCAB) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_train_loader_invariants_on_sample(world):
    corpus = Corpus(sorted(__import__("glob").glob(SAMPLE_TRAIN)))
    ranks = loaders(SAMPLE_TRAIN, world)
    # (tokens per rank, max_seq_len) per step: batch size and max_seq_len change mid-stream
    plan = [(1000, 256), (1000, 256), (3000, 1024), (500, 64), (2047, 4096)]
    used = []
    for tokens, msl in plan:
        batches = [ld.next_batch(tokens, msl) for ld in ranks]
        used += check_step(corpus, batches, tokens, msl)
    assert used == list(range(len(used)))  # the whole stream: document 0, 1, 2, ... each once
    for ld in ranks:
        assert ld.consumed == sum((t + 1) * world for t, _ in plan)


def test_train_loader_across_shards(tmp_path):
    """Documents of random lengths over three shards, world size 2: every batch comes from one shard,
    and where it moves on it starts at the next shard's first document, having skipped only a rest
    of the shard too short to fill the batch."""
    rng = np.random.default_rng(1)
    paths, shard_of = [], []
    for s in range(3):
        docs = [np.concatenate([[BOS], rng.integers(0, BOS, rng.integers(1, 300))]) for _ in range(40)]
        paths.append(str(tmp_path / f"tr_{s:03d}.bin"))
        tg.write_shard(paths[-1], np.concatenate(docs))
        shard_of += [s] * len(docs)
    corpus = Corpus(paths)
    ranks = loaders(str(tmp_path / "tr_*.bin"), 2)
    last, skips = -1, 0
    for step in range(12):
        tokens, msl = (300, 128) if step % 2 else (511, 200)
        used = check_step(corpus, [ld.next_batch(tokens, msl) for ld in ranks], tokens, msl)
        assert shard_of[used[0]] == shard_of[used[-1]]  # one shard per batch
        if used[0] != last + 1:
            assert shard_of[used[0]] > shard_of[last] and shard_of[used[0] - 1] < shard_of[used[0]]
            rest = sum(min(corpus.ends[d] - corpus.bos[d], msl) for d in range(last + 1, len(shard_of))
                       if shard_of[d] == shard_of[last])
            # what it skipped could not have served both ranks: rank 0 would have taken at most
            # tokens + 1 + max_seq_len - 1 of it (its last document cut), leaving rank 1 enough
            assert rest < 2 * (tokens + 1) + msl - 1
            skips += rest > 0
        last = used[-1]
    assert shard_of[last] == 2 and skips >= 1  # reached the third shard, skipping a shard's tail


def story_doc(shard, i, length):
    """Document i of a shard: a BOS, then tokens that say where they come from."""
    return [BOS] + [1000 * shard + 20 * i + j for j in range(1, length)]


@pytest.mark.parametrize("world, accum", [(2, 1), (1, 2)])
def test_train_loader_drops_a_shard_tail_like_the_record(tmp_path, world, accum):
    """The record's rule at shard ends, by hand: a step whose two parts the rest of a shard cannot
    fill drops that rest (also what would have filled the first part) and starts at the next
    shard's first document; tokens before a shard's first BOS are never read. The same parts
    whether they go to two ranks or to one rank's two micro-batches."""
    lengths = {0: [4, 9, 3, 5, 7, 2], 1: [6, 2, 8, 4, 3], 2: [5, 5, 5, 5]}
    for s, docs in lengths.items():
        tokens = [7, 7] if s == 1 else []  # shard 1 starts in the middle of a document
        for i, n in enumerate(docs):
            tokens += story_doc(s, i, n)
        tg.write_shard(str(tmp_path / f"st_{s:03d}.bin"), tokens)

    def piece(s, i, n):
        return story_doc(s, i, lengths[s][i])[:n]

    # 5 tokens + 1 target per part, max_seq_len 4: (part 0, part 1) per step
    want = [
        (piece(0, 0, 4) + piece(0, 1, 2), piece(0, 2, 3) + piece(0, 3, 3)),
        # shard 0's documents 4 and 5 (7 -> 4 tokens, 2) would fill rank 0, none are left for rank 1
        (piece(1, 0, 4) + piece(1, 1, 2), piece(1, 2, 4) + piece(1, 3, 2)),
        # shard 1's document 4 (3 tokens) cannot fill rank 0
        (piece(2, 0, 4) + piece(2, 1, 2), piece(2, 2, 4) + piece(2, 3, 2)),
    ]
    cuts = [([0, 4, 6], [0, 3, 6]), ([0, 4, 6], [0, 4, 6]), ([0, 4, 6], [0, 4, 6])]
    pattern = str(tmp_path / "st_*.bin")

    def step_of(ranks):
        """[(inputs, targets, cu_seqlens)] of a step's two parts: two ranks' micro-batch or one rank's two."""
        return [ld.next_batch(5, 4) for ld in ranks for _ in range(accum)]

    ranks = [tg.TrainLoader(pattern, r, world, VOCAB, accum=accum) for r in range(world)]
    positions = []
    for step, (bufs, cus) in enumerate(zip(want, cuts)):
        positions.append(ranks[0].position())
        for (inputs, targets, cu_seqlens), buf, cu in zip(step_of(ranks), bufs, cus):
            assert inputs.tolist() == buf[:-1] and targets.tolist() == buf[1:], step
            assert cu_seqlens.tolist() == cu, step
        assert all(ld.position() == ranks[0].position() for ld in ranks)
    with pytest.raises(SystemExit) as e:
        ranks[0].next_batch(5, 4)  # shard 2 is used up and there is no shard 3
    assert "ran out" in str(e.value.code) and "after 36 tokens" in str(e.value.code)
    # loaders sought to any step's position (as a resumed run's are) continue with that step's parts
    for step, pos in enumerate(positions):
        fresh = [tg.TrainLoader(pattern, r, world, VOCAB, accum=accum) for r in range(world)]
        for ld in fresh:
            ld.seek(pos)
        for later, bufs in enumerate(want[step:]):
            assert [b[0].tolist() for b in step_of(fresh)] == [buf[:-1] for buf in bufs], (step, later)
        assert fresh[0].consumed == 36


def test_train_loader_runs_out(tmp_path):
    tg.write_shard(str(tmp_path / "s_000.bin"), np.tile([BOS, 1, 2, 3, 4, 5, 6, 7], 20))  # 20 docs of 8
    tg.write_shard(str(tmp_path / "s_001.bin"), np.tile([BOS, 9, 9, 9], 10))  # 10 docs of 4
    ranks = loaders(str(tmp_path / "s_*.bin"), 2)
    # 30 documents, 200 tokens; each rank-batch of 15 + 1 tokens uses 2 documents of 8
    handed = 0
    for _ in range(5):
        for ld in ranks:
            ld.next_batch(15, 64)
        handed += 16 * 2
    ranks[0].next_batch(15, 64)  # shard 1 serves one more step: 4 + 4 of its 10 documents
    handed += 16 * 2
    with pytest.raises(SystemExit) as e:
        ranks[0].next_batch(15, 64)  # 2 documents (8 tokens) left, 2 x 16 needed
    msg = str(e.value.code)
    assert "ran out" in msg and f"after {handed:,} tokens" in msg and "200 tokens" in msg


def test_cpu_preset_schedule_fits_the_bundled_sample():
    """The cpu preset's whole schedule must be servable by the bundled sample (one pass, no cycling)."""
    cfg = tg.parse_args(["--preset=cpu"])
    sched = tg.Schedule(cfg)
    ld = tg.TrainLoader(os.path.join(ROOT, cfg.train_files), 0, 1, VOCAB)
    for step in range(sched.total):
        try:
            ld.next_batch(sched.batch_tokens(step) // cfg.accum_world_size, cfg.max_seq_len)
        except SystemExit as e:
            pytest.fail(f"cpu preset runs out of bundled training data at step {step}/{sched.total}: {e.code}")


# ------------------------------------------------------------------------------------------------
# ValLoader
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def val_files(tmp_path):
    # token value == position, so every token says where it came from
    tg.write_shard(str(tmp_path / "va_000.bin"), np.arange(0, 1000))
    tg.write_shard(str(tmp_path / "va_001.bin"), np.arange(1000, 3000))
    return str(tmp_path / "va_*.bin")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_val_loader_covers_first_tokens(val_files, world):
    val_tokens, slice_tokens = 2048, 256
    seen = []
    for rank in range(world):
        vl = tg.ValLoader(val_files, val_tokens, slice_tokens, rank, world, VOCAB)
        for x, y in vl:
            assert x.numel() == slice_tokens and torch.equal(y, x + 1)
            assert torch.equal(x, torch.arange(int(x[0]), int(x[0]) + slice_tokens))  # contiguous slices
            seen.append(x)
        # every rank does the same number of forward passes (the all-reduce needs it)
        assert len(list(vl)) == val_tokens // (slice_tokens * world)
    positions = torch.cat(seen).sort().values
    assert torch.equal(positions, torch.arange(val_tokens))  # each of the first val_tokens exactly once
    # on the real sample too: rank slices are disjoint and rebuild the first tokens
    sample = np.fromfile(sorted(__import__("glob").glob(SAMPLE_VAL))[0], dtype="<u2", offset=1024)
    parts = {}
    for rank in range(world):
        vl = tg.ValLoader(SAMPLE_VAL, 16384, 1024, rank, world, VOCAB)
        for x, y in vl:
            start = next(s for s in range(0, 16384, 1024) if np.array_equal(sample[s : s + 1024], x.numpy()))
            assert start not in parts and np.array_equal(y.numpy(), sample[start + 1 : start + 1025])
            parts[start] = rank
    assert sorted(parts) == list(range(0, 16384, 1024))
    assert all(parts[s] == (s // 1024) % world for s in parts)


def test_val_loader_errors(val_files):
    with pytest.raises(SystemExit) as e:
        tg.ValLoader(val_files, 3072, 256, 0, 1, VOCAB)  # only 3000 tokens
    msg = str(e.value.code)
    assert "3,000 tokens" in msg and "3,072" in msg and val_files in msg
    with pytest.raises(SystemExit) as e:
        tg.ValLoader(val_files, 3000, 256, 0, 1, VOCAB)  # needs val_tokens + 1 for the last target
    assert "3,001" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        tg.ValLoader(val_files, 2048, 256, 0, 3, VOCAB)
    assert "multiple of 768" in str(e.value.code)
