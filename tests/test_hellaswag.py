"""evals/hellaswag.py: the scores against the model's own loss, the accuracy on examples whose right
ending continues the tiny checkpoint's pattern (conftest), --limit/--out, and malformed lines."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
import train_gpt as tg
from data.tokenize_corpus import gpt2_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("hellaswag", os.path.join(ROOT, "evals", "hellaswag.py"))
hellaswag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hellaswag)

ENC = gpt2_encoding()
# (context, right ending, three wrong ones, where the right one goes); the pattern is "a b c d e f g h"
CASES = [
    ("a b c d e f g h a b c", "d e f g", ["d c b a", "h h h h", "b d f h"], 0),
    ("e f g h a b", "c d e f g h", ["c c d d e e", "g f e d c b", "a b c d e f"], 1),
    ("a b c d e", "f", ["a", "c", "e"], 2),
    ("g h a b c d", "e f g h a b c", ["f e d c b a h", "e e e e e e e", "h g f e d c b"], 3),
    ("c d e f g h a b c d e f g h", "a b", ["b a", "h a", "g g"], 2),
]


def example(i, ctx, right, wrong, label):
    """One line in HellaSwag's own layout (its extra fields included)."""
    endings = wrong[:label] + [right] + wrong[label:]
    return {"ind": i, "activity_label": "Reciting letters", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
            "endings": endings, "source_id": f"tiny~{i}", "split": "val", "split_type": "indomain", "label": label}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hellaswag") / "tiny_val.jsonl"
    path.write_text("".join(json.dumps(example(i, *case)) + "\n" for i, case in enumerate(CASES)))
    return path


def reference_losses(model, context, ending):
    """The model's own per-token loss (its fused loss op) of an ending after BOS + context."""
    cfg = model.cfg
    tokens = torch.tensor([tg.BOS_ID] + ENC.encode_ordinary(context) + ENC.encode_ordinary(" " + ending))
    n = len(ENC.encode_ordinary(" " + ending))
    with torch.no_grad():
        z = model.logits(model.hidden(tokens[:-1], sample.final_windows(cfg)))
        per_token = model.ops.softcap_mtp_ce(z, tokens[1:], torch.ones(1), cfg.softcap, cfg.softcap_temp)
    return per_token[-n:]


def test_scores_are_the_models_loss_and_pick_the_pattern(tiny_checkpoint, data_file):
    _, model = sample.load_model(tiny_checkpoint.path, "cpu")
    examples = hellaswag.read_examples(str(data_file))
    results = hellaswag.evaluate(model, examples, ENC)
    for (ctx, *_), ex, result in zip(CASES, examples, results):
        for i, ending in enumerate(ex["endings"]):
            ref = reference_losses(model, ctx, ending)
            # fp32 sums over the 50,304 logits in another order: about 1e-4 per token apart
            assert result["mean_loss"][i] == pytest.approx(ref.mean().item(), abs=1e-3)
            assert result["sum_loss"][i] == pytest.approx(ref.sum().item(), abs=1e-3 * len(ref))
        assert result["pred"] == result["pred_sum"] == result["label"] == ex["label"]


def test_cli_prints_accuracy_and_writes_one_line_per_example(tiny_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "per_example.jsonl"
    acc, acc_sum = hellaswag.main([tiny_checkpoint.path, f"--data={data_file}", "--limit=3", f"--out={out}", "--device=cpu"])
    assert acc == acc_sum == 1.0
    assert capsys.readouterr().out == (f"hellaswag: 3 examples of {data_file}: acc 1.0000 (3/3) by mean loss per token, "
                                       "acc 1.0000 by summed loss\n")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["ind"] for line in lines] == [0, 1, 2]
    assert [line["pred"] for line in lines] == [case[3] for case in CASES[:3]]
    assert all(len(line["mean_loss"]) == len(line["sum_loss"]) == 4 for line in lines)


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a b", "endings": ["c", "d", "e", "f"], "label": 0', "not valid JSON"),
    ('["a b", ["c", "d", "e", "f"], 0]', "expected a JSON object, got list"),
    ('{"endings": ["c", "d", "e", "f"], "label": 0}', "field 'ctx' must be a string, got None"),
    ('{"ctx": "a b", "endings": ["c", "d", "e"], "label": 0}', "field 'endings' must be a list of 4 strings"),
    ('{"ctx": "a b", "endings": ["c", "d", "e", "f"]}', "field 'label' must be an integer 0-3, got None"),
    ('{"ctx": "a b", "endings": ["c", "d", "e", "f"], "label": "2"}', "field 'label' must be an integer 0-3, got '2'"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, line, message):
    good = json.dumps(example(0, *CASES[0]))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["unused.pt", f"--data={path}"])
    assert e.value.code.startswith(f"error: {path}:3: {message}")


def run_cli(*argv):
    """evals/hellaswag.py run as a user runs it: (exit status, stdout, stderr)."""
    run = subprocess.run([sys.executable, "evals/hellaswag.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return run.returncode, run.stdout, run.stderr


def test_a_missing_data_file_says_where_to_get_it(tmp_path):
    missing = tmp_path / "hellaswag_val.jsonl"
    status, out, err = run_cli("unused.pt", f"--data={missing}")
    assert status == 1 and out == ""
    assert err == (f"error: --data={missing}: no such file; HellaSwag's validation set is one download: curl -LO "
                   "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl\n")


@pytest.mark.parametrize("out, why", [
    ("missing/scores.jsonl", "no such directory {tmp}/missing"),
    (".", "it is a directory"),
], ids=["no such folder", "a folder"])
def test_an_unwritable_out_fails_before_scoring(tiny_checkpoint, data_file, tmp_path, out, why):
    """A good checkpoint and data: without the check, every example would be scored first."""
    path = tmp_path / out
    status, stdout, err = run_cli(tiny_checkpoint.path, f"--data={data_file}", f"--out={path}", "--device=cpu")
    assert status == 1 and stdout == "" and "Traceback" not in err
    assert err == f"error: --out={path}: cannot write there ({why.format(tmp=tmp_path)})\n"
