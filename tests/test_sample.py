"""sample.py: loading a checkpoint, the logits it samples from, greedy and seeded sampling, the
context limit and the command line, on a tiny model that learnt a repeating pattern (conftest);
the KV cache against the full forward on a random model with every switch that shapes it."""
import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import sample
import train_gpt as tg
from data.tokenize_corpus import gpt2_encoding

ENC = gpt2_encoding()


def continuation(pattern, prompt, n):
    """The next n words of `pattern` repeated forever after `prompt` (which ends inside it), as text."""
    words = pattern.split()
    start = (words.index(prompt.split()[-1]) + 1) % len(words)
    return "".join(" " + w for w in itertools.islice(itertools.cycle(words[start:] + words[:start]), n))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return sample.load_model(tiny_checkpoint.path, "cpu")


def generate(model, prompt, n, **kw):
    return ENC.decode(list(sample.generate(model, ENC.encode_ordinary(prompt), n, **kw)))


def test_load_model_restores_what_training_left(tiny_checkpoint, loaded):
    cfg, model = loaded
    assert cfg == tiny_checkpoint.cfg  # tuples rebuilt as tuples, not lists
    assert not model.training and model.tied is False and tiny_checkpoint.model.tied is False
    # YaRN raised the attention scale at the window change: it travels as the Rotary's extra state
    assert model.rotary.attn_scale == tiny_checkpoint.model.rotary.attn_scale != cfg.attn_scale
    trained = tiny_checkpoint.model.state_dict()
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, trained[name]), name


def test_logits_are_what_the_loss_scores(tiny_checkpoint, loaded):
    """Cross-entropy of the sampler's logits equals the model's own loss (softcap inside it)."""
    cfg, model = loaded
    assert cfg.softcap > 0
    tokens = torch.tensor([tg.BOS_ID] + ENC.encode_ordinary("a b c d e f g h a b c x y"))
    windows = sample.final_windows(cfg)
    logits = sample.softcapped_logits(model, tokens[:-1], windows)
    ours = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="sum")
    with torch.no_grad():
        theirs = model(tokens[:-1], tokens[1:], windows, torch.ones(1))
    # fp32 sums over the 50,304 logits in another order: about 1e-4 per token apart
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-3 * len(tokens))


def test_stablemax_logits_are_what_its_validation_scores(loaded):
    """Under --stablemax the sampler draws from StableMax's distribution: the cross-entropy of the
    softmax of its logits equals the model's validation loss, which scores that distribution."""
    cfg, model = loaded
    model = copy.deepcopy(model)
    model.cfg = dataclasses.replace(cfg, stablemax=True)
    tokens = torch.tensor([tg.BOS_ID] + ENC.encode_ordinary("a b c d e f g h a b c x y"))
    windows = sample.final_windows(cfg)
    ours = torch.nn.functional.cross_entropy(sample.softcapped_logits(model, tokens[:-1], windows), tokens[1:],
                                             reduction="sum")
    with torch.no_grad():
        theirs = model(tokens[:-1], tokens[1:], windows, torch.ones(1))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-3 * len(tokens))


@pytest.mark.parametrize("prompt", ["a b c", "e f", "h a b c d e f g h a b c d e"])
def test_greedy_continues_the_pattern(tiny_checkpoint, loaded, prompt):
    _, model = loaded
    n = 12
    assert generate(model, prompt, n, temperature=0) == continuation(tiny_checkpoint.pattern, prompt, n)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(loaded):
    _, model = loaded

    def draw(seed, temperature=3.0, top_k=50):
        return generate(model, "a b", 8, temperature=temperature, top_k=top_k,
                        generator=torch.Generator().manual_seed(seed))

    assert draw(0) == draw(0)
    assert len({draw(seed) for seed in range(4)}) > 1  # at this temperature the seeds' draws differ
    assert draw(1, temperature=1.0, top_k=1) == generate(model, "a b", 8, temperature=0)


def test_context_keeps_bos_and_the_newest_tokens(loaded):
    """A prompt longer than max_seq_len: only its last max_seq_len - 1 tokens matter."""
    cfg, model = loaded
    tail = ENC.encode_ordinary(" ".join(["c d e f g h a b"] * 8))[: cfg.max_seq_len - 1]
    assert len(tail) == cfg.max_seq_len - 1
    outs = {tuple(sample.generate(model, ENC.encode_ordinary(junk) + tail, 6, temperature=0))
            for junk in ("x y z", "q r s t u v w")}
    assert len(outs) == 1
    assert sample.within_context([tg.BOS_ID, 1, 2, 3, 4], 3) == [tg.BOS_ID, 3, 4]


# ------------------------------------------------------------------------------------------------
# The KV cache: each step's logits are the full forward's
# ------------------------------------------------------------------------------------------------

# every switch of the speedrun preset that shapes the forward pass (smear, key offset, value
# embeddings, the attention gate and lambdas, softcap, x0, skip, backout, a layer without attention),
# the extra softmax slot, the output gates and the bigram embedding, in a model small enough to
# build in a blink
RANDOM_MODEL = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=4", "--d_model=32", "--n_head=2", "--head_dim=16", "--mlp_hidden=64",
                "--no_attn_layers=2", "--long_window_layers=1,3", "--value_embeds=2", "--skip_from=0", "--skip_to=2",
                "--backout_layer=1", "--gate_dims=8", "--sink_logit=true", "--kv_bias=true", "--gate_attn=relu",
                "--gate_mlp=sigmoid", "--window_block=8", "--long_windows=1,2,2", "--final_window=2", "--extension_window=2",
                "--bigram_vocab=257", "--bigram_signs=16"]


def random_model(*flags):
    """An fp32 model of RANDOM_MODEL with every parameter random (zero-initialized ones would hide
    the techniques they switch on), untied."""
    cfg = tg.parse_args(RANDOM_MODEL + list(flags))
    assert cfg.smear and cfg.key_offset and cfg.x0_mixing and cfg.attn_gate and cfg.attn_lambdas and cfg.softcap > 0
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    model.tied = False
    return model.eval()


@pytest.mark.parametrize("prompt_len, flags", [(1, ()), (10, ()),
                                               (10, ("--n_head=4", "--head_dim=8", "--paired_head_layers=0,3")),
                                               (10, ("--xsa_layers=0,3",)), (10, ("--xsa_layers=0,3", "--dc_layers=1"))])
def test_cached_logits_are_the_full_forwards(prompt_len, flags):
    """Token by token after a prompt (BOS alone, or two documents), through one more BOS and past
    the long window: the cache's logits are those of the whole sequence at once, also with paired
    heads (#58) on a short- and a long-window layer (two cached rows per token there), with XSA (#82)
    through the cache, and with DC (#85), where the cache falls back to running the whole sequence
    (DC's mix of every head's attention needs more than keys and values): that case checks the fallback."""
    model = random_model(*flags)
    windows = (16, 8)
    rng = np.random.default_rng(0)
    words = lambda n: [int(t) for t in rng.integers(0, 50000, n)]
    tokens = [tg.BOS_ID, *words(6), tg.BOS_ID, *words(20), tg.BOS_ID, *words(25)]
    full = sample.softcapped_logits(model, torch.tensor(tokens), windows)
    cache = sample.KVCache(model, windows)
    # fp32 round-off: the cache sums the attention in another order (1e-5 apart at logits up to
    # the softcap's 30); one rerun token less is 0.1 off, no document mask or no window 15
    for n in range(prompt_len, len(tokens) + 1):
        torch.testing.assert_close(cache.logits(tokens[:n]), full[n - 1], rtol=0, atol=1e-4, msg=f"after {n} tokens")


def test_generation_restarts_a_full_context_from_bos_and_the_newest_half():
    """Greedy tokens with the cache are those of the full forward over the context: the whole
    sequence up to max_seq_len tokens, then BOS and the newest max_seq_len / 2, growing again."""
    limit = 24
    model = random_model(f"--max_seq_len={limit}")
    windows = sample.final_windows(model.cfg)
    assert windows[0] < 40  # the generation runs past the long window
    prompt = [5, 6, tg.BOS_ID, 7, 8]  # two documents
    context, want = [tg.BOS_ID, *prompt], []
    for _ in range(40):
        z = sample.softcapped_logits(model, torch.tensor(context), windows)[-1, : model.cfg.vocab_size]
        want.append(int(z.argmax()))
        context.append(want[-1])
        if len(context) > limit:
            context = [tg.BOS_ID, *context[len(context) - limit // 2 :]]
    assert tg.BOS_ID not in want
    assert list(sample.generate(model, prompt, 40, temperature=0)) == want


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_prints_the_continuation(tiny_checkpoint, capsys):
    sample.main([tiny_checkpoint.path, "--prompt=a b c", "--max_tokens=5", "--temperature=0", "--device=cpu"])
    assert capsys.readouterr().out == "a b c d e f g h\n"
    sample.main([tiny_checkpoint.path, "--prompt=a", "--max_tokens=3", "--num_samples=2", "--device=cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- sample 1 ---" and lines[2] == "--- sample 2 ---" and len(lines) == 4
    assert lines[1].startswith("a ") and lines[3].startswith("a ")


def test_cli_streams_and_ctrl_c_keeps_what_it_printed(tiny_checkpoint, capsys, monkeypatch):
    """The prompt is out before the first token is drawn, and each token before the next; Ctrl-C
    ends the line and exits 130 without a traceback."""
    printed, pick = [], sample.pick

    def interrupted_pick(*args):
        printed.append(capsys.readouterr().out)
        if len(printed) == 4:
            raise KeyboardInterrupt
        return pick(*args)

    monkeypatch.setattr(sample, "pick", interrupted_pick)
    with pytest.raises(SystemExit) as e:
        sample.main([tiny_checkpoint.path, "--prompt=a b c", "--max_tokens=50", "--temperature=0", "--device=cpu"])
    assert e.value.code == 130
    assert printed == ["a b c", " d", " e", " f"]
    assert capsys.readouterr() == ("\n", "")


def test_stream_waits_for_a_character_split_over_tokens(capsys):
    text = " smile \U0001F642, 日本語"
    tokens = ENC.encode_ordinary(text)
    pieces = [ENC.decode_single_token_bytes(t) for t in tokens]
    assert any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces)  # some hold part of a character
    sample.stream(ENC, "prompt:", iter(tokens))
    assert capsys.readouterr().out == f"prompt:{text}\n"


def test_cli_rejects_a_bad_flag(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([tiny_checkpoint.path, "--temperature=-1"])
    assert e.value.code == 2 and "--temperature: expected a number >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main([tiny_checkpoint.path, f"--max_tokens={sample.MAX_TOKENS + 1}"])
    assert e.value.code == 2 and f"--max_tokens: expected an integer from 1 to {sample.MAX_TOKENS}, got '{sample.MAX_TOKENS + 1}'" in capsys.readouterr().err


def test_a_bad_checkpoint_is_one_clear_error(tiny_checkpoint, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as e:
        sample.main([str(missing)])
    assert e.value.code == f"error: {missing}: no such file (expected a checkpoint written by train_gpt.py)"

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(tg.CheckpointError, match=r"notes\.txt: not a checkpoint torch\.load\(weights_only=True\) can read \(\w+Error: "):
        sample.load_model(str(text), "cpu")

    numpy_inside = tmp_path / "numpy_inside.pt"  # e.g. numpy's rng state: more than weights_only=True loads
    torch.save({"config": {}, "model": {}, "tied": True, "rng": np.random.get_state()}, numpy_inside)
    with pytest.raises(tg.CheckpointError, match=r"numpy_inside\.pt: not a checkpoint .* \(WeightsUnpickler error: Unsupported global: .*numpy"):
        sample.load_model(str(numpy_inside), "cpu")

    weights_only = tmp_path / "weights.pt"
    torch.save({"model": tiny_checkpoint.model.state_dict()}, weights_only)
    with pytest.raises(tg.CheckpointError, match=r"weights\.pt: not a train_gpt\.py checkpoint .* missing 'config', 'tied'"):
        sample.load_model(str(weights_only), "cpu")

    flat = tmp_path / "flat.pt"
    torch.save({"config": "--preset=cpu", "model": {}, "tied": True}, flat)
    with pytest.raises(tg.CheckpointError, match=r"flat\.pt: its 'config' is a str, expected dataclasses\.asdict"):
        sample.load_model(str(flat), "cpu")

    config = dataclasses.asdict(tiny_checkpoint.cfg)
    other = tmp_path / "other.pt"
    torch.save({"config": {**config, "n_experts": 8}, "model": {}, "tied": True}, other)
    with pytest.raises(tg.CheckpointError, match=r"other\.pt: config fields n_experts are unknown"):
        sample.load_model(str(other), "cpu")

    wrong = tmp_path / "wrong.pt"
    torch.save({"config": {**config, "d_model": 32}, "model": tiny_checkpoint.model.state_dict(), "tied": False}, wrong)
    with pytest.raises(tg.CheckpointError, match=r"wrong\.pt: the weights do not fit the model its config describes"):
        sample.load_model(str(wrong), "cpu")
