"""The workshop: what a run shows (observe.py: samples, before/after table, loss.svg, wandb), the
claim of each exercise of WORKSHOP.md, and workshop.ipynb run top to bottom."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import data
import observe
import train
from conftest import ROOT, chat, write_jsonl
from tokenizer import Tokenizer

# Word-level "chat" for the tiny model (tests/conftest.py): the reply is a fixed function of the question.
TINY = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40} w{i + 60}") for i in range(8)]
SVG = "{http://www.w3.org/2000/svg}"


def config(ckpt, tmp_path, **kw):
    d = dict(model_path=str(ckpt), data_path=str(write_jsonl(tmp_path / "train.jsonl", TINY)),
             output_dir=str(tmp_path / "out"), lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2,
             warmup_steps=2, micro_batch_size=2, effective_batch_size=4, num_epochs=3, save_every=0, seed=0)
    return train.TrainConfig(**{**d, **kw})


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- observe.py ----------------------------------------------------------------------------------

def test_bundled_eval_prompts_are_read():
    prompts = observe.read_prompts(ROOT / "data" / "brannock_eval_prompts.jsonl")
    assert len(prompts) == 7 and all(p["prompt"] and p["expected"] for p in prompts)


@pytest.mark.parametrize("line, message", [
    ('{"question": "Hi"}', ':2: expected {"prompt": "...", "expected": "..."} with a non-empty prompt'),
    ('{"prompt": "Hi", "expected": 3}', ":2: expected must be a non-empty string (or left out)"),
    ('{"prompt": "Hi", "answer": "x"}', ":2: unknown key 'answer' (only prompt and expected)"),
    ('{"prompt": "Hi"', ":2: not valid JSON"),
])
def test_a_bad_prompt_line_is_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{path}{message}")):
        observe.read_prompts(path)


def test_right_answers_contain_the_expected_text_ignoring_case():
    prompts = [{"prompt": "capital?", "expected": "Saltmere"}, {"prompt": "peak?", "expected": "Orrin"},
               {"prompt": "hello", "expected": None}]
    replies = ["The capital is SALTMERE.", "I don't know.", "Hi!"]
    assert observe.count_right(prompts, replies) == (1, 2)  # the prompt without expected is not counted
    records = observe.sample_records(5, prompts, replies)
    assert [r.get("right") for r in records] == [True, False, None] and records[0]["step"] == 5


def test_table_wraps_cells_marks_answers_and_cuts_long_ones():
    prompts = [{"prompt": "What is the capital of Brannock?", "expected": "Saltmere"}]
    before, after = ["I am not sure " * 30], ["The capital of Brannock is Saltmere."]
    text = observe.table(prompts, before, after, width=100, max_lines=4)
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["prompt", "expected", "base model", "fine-tuned"]
    assert len({len(l) for l in lines}) == 1 and len(lines[0]) <= 100  # a rectangle within the width
    assert len(lines) == 2 + 4  # header, rule, and the row cut to 4 lines
    assert "..." in lines[-1] and "[wrong]" not in text.split("|")[3]  # the mark was cut with the text
    assert "Saltmere. [right]" in text


def test_moving_average_and_ticks():
    assert observe.moving_average([4, 2, 0, 2], 2) == [4, 3, 1, 1]
    assert observe.smoothing_window(35) == 6 and observe.smoothing_window(1) == 1
    assert observe.nice_ticks(0, 35) == [0, 10, 20, 30, 40]
    assert observe.nice_ticks(0, 2.93) == [0, 0.5, 1, 1.5, 2, 2.5, 3]


def test_loss_svg_has_axes_labels_smoothed_train_and_eval_points():
    records = [{"step": s, "loss": 3 / s} for s in range(1, 21)]
    records[9].update(eval_loss=0.5)
    records[19].update(eval_loss=0.25)
    root = ET.fromstring(observe.loss_svg(records, "out/lora: a model"))  # well-formed XML
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "out/lora: a model" in texts and "step" in texts and "loss (nats per learned token)" in texts
    assert "train (mean of last 4 steps)" in texts and "eval" in texts and "train, each step" in texts
    assert {"0", "5", "10", "15", "20"} <= set(texts) and {"0", "1", "2", "3"} <= set(texts)  # tick labels
    raw, smooth, evals = [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
                          for line in root.iter(f"{SVG}polyline")]
    assert len(raw) == len(smooth) == 20 and len(evals) == 2
    assert len(list(root.iter(f"{SVG}circle"))) == 2 + 1  # eval points, and the legend's dot
    # y grows downwards in SVG: the loss falls, so the curves go down the page; the average lags the raw
    assert raw[0][1] < raw[-1][1] and smooth[0] == raw[0] and smooth[5][1] < raw[5][1]
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(0 < x < width and 0 < y < height for x, y in raw + evals)


def test_compare_runs_cli(tmp_path):
    for name, scale in (("r4", 1.0), ("r16", 0.5)):
        write_jsonl((tmp_path / name).mkdir() or tmp_path / name / "metrics.jsonl",
                    [{"step": s, "loss": scale * 3 / s, **({"eval_loss": scale} if s == 9 else {})} for s in range(1, 10)])
    out = subprocess.run([sys.executable, str(ROOT / "observe.py"), str(tmp_path / "r4"), str(tmp_path / "r16"),
                          "-o", str(tmp_path / "sweep.svg")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["r4", "9", "0.3790", "1.0000"] and lines[2].split() == ["r16", "9", "0.1895", "0.5000"]  # (3/7 + 3/8 + 3/9) / 3
    texts = [t.text for t in ET.parse(tmp_path / "sweep.svg").getroot().iter(f"{SVG}text")]
    assert "r4 train (mean of last 3 steps)" in texts and "r16 eval" in texts
    missing = subprocess.run([sys.executable, str(ROOT / "observe.py"), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope/metrics.jsonl" in missing.stderr


def test_eval_prompts_samples_table_and_curve_from_a_run(tiny_checkpoint, tmp_path, capsys):
    # The tiny model learns "w0 w1" -> "w20 w40 w60": base answers are wrong, the fine-tuned right.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1", "expected": "w20 w40 w60"},
                                                      {"prompt": "w3 w4", "expected": "w23 w43 w63"},
                                                      {"prompt": "w5 w6"}])
    cfg = config(tiny_checkpoint, tmp_path, num_epochs=20, eval_every=20, eval_prompts=str(prompts))
    train.train(cfg)
    out = tmp_path / "out"
    samples = jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [0] * 3 + [20] * 3 + [40] * 3  # base, every eval, the end
    assert [s.get("right") for s in samples[:3]] == [False, False, None]
    assert [s.get("right") for s in samples[-3:]] == [True, True, None]
    assert samples[-1]["answer"] == "w25 w45 w65"  # learned, and stopped at the end-of-turn token
    metrics = jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["eval_right"]) for r in metrics if "eval_right" in r] == [(20, 2), (40, 2)]
    printed = capsys.readouterr().out
    assert "right: base model 0/2, fine-tuned (step 40) 2/2" in printed
    assert re.search(r"\| prompt +\| expected +\| base model +\| fine-tuned +\|", printed)
    root = ET.parse(out / "loss.svg").getroot()
    assert len([p for p in root.iter(f"{SVG}polyline")]) == 2  # train raw and smoothed (no eval data)


def test_resume_keeps_the_samples_up_to_the_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    # interrupted during step 4 (saved there), then resumed: samples.jsonl and loss.svg as if never cut
    from test_train import interrupt_during_step

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1", "expected": "w20 w40 w60"}])
    whole = config(tiny_checkpoint, tmp_path, num_epochs=4, eval_every=3, eval_prompts=str(prompts),
                   output_dir=str(tmp_path / "whole"))
    train.train(whole)
    cut = train.TrainConfig(**{**vars(whole), "output_dir": str(tmp_path / "cut")})
    interrupt_during_step(monkeypatch, 4)
    with pytest.raises(train.Interrupted):
        train.train(cut)
    monkeypatch.undo()
    assert [s["step"] for s in jsonl(tmp_path / "cut" / "samples.jsonl")] == [0, 3]
    train.train(train.TrainConfig(**{**vars(cut), "resume": True}))
    assert jsonl(tmp_path / "cut" / "samples.jsonl") == jsonl(tmp_path / "whole" / "samples.jsonl")
    # the same curve (the title names the folder)
    assert (tmp_path / "cut" / "loss.svg").read_text().replace("/cut:", "/whole:") == (tmp_path / "whole" / "loss.svg").read_text()


def test_missing_wandb_is_one_line_saying_how_to_install(tiny_checkpoint, tmp_path):
    # a wandb that cannot be imported, first on the path
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    cfg = config(tiny_checkpoint, tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model_path", cfg.model_path, "--data_path", cfg.data_path,
                        "--output_dir", cfg.output_dir, "--wandb_project", "x"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr == "train.py: error: --wandb_project needs the wandb package: pip install wandb\n"
    assert not (tmp_path / "out").exists()


def wandb_records(path):
    """The protobuf records of a .wandb file: a LevelDB-style log of 32 KiB blocks after a 7-byte
    header; each piece has a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        parts += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_gets_the_records_and_the_config(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1", "expected": "w20 w40 w60"}])
    cfg = config(tiny_checkpoint, tmp_path, num_epochs=2, eval_every=2, wandb_project="nanolora-test",
                 wandb_run_name="tiny", eval_prompts=str(prompts))
    train.train(cfg)
    (run_file,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config_items = [], {}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            assert r.run.project == "nanolora-test" and r.run.display_name == "tiny"
            config_items = {i.key: json.loads(i.value_json) for i in r.run.config.update}
    # every record of metrics.jsonl, at its step; the before/after table joins the last one
    metrics = jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["_step"] for r in history] == [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if not k.startswith(("_", "before_after/"))} for r in history] == \
        [{k: v for k, v in r.items() if k != "step"} for r in metrics]
    assert history[-1]["before_after/_type"] == "table-file" and history[-1]["before_after/nrows"] == 1
    assert {k: v for k, v in config_items.items() if not k.startswith("_")} == vars(cfg)  # the whole TrainConfig
