"""The workshop: what a run shows (observe.py: samples, before/after table, loss.svg, wandb), the
claim of each exercise of WORKSHOP.md, and workshop.ipynb run top to bottom."""
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch

from config import TrainConfig, parse_args
import data
from helpers import ROOT, config, interrupt_during_step, tiny_config, write_jsonl
import observe
from tokenizer import Tokenizer
import train

SVG = "{http://www.w3.org/2000/svg}"


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- observe.py ----------------------------------------------------------------------------------

def test_bundled_eval_prompts_are_read():
    prompts = observe.read_prompts(ROOT / "data" / "brannock_eval_prompts.jsonl")
    assert len(prompts) == 7 and all(p["prompt"] and p["expected"] for p in prompts)


@pytest.mark.parametrize("line, message", [
    ('{"question": "Hi"}', ':2: expected {"prompt": "...", "expected": "..."} with a non-empty prompt'),
    ('{"prompt": "Hi", "expected": 3}', ":2: expected must be a non-empty string (or left out)"),
    ('{"prompt": "Hi", "answer": "x"}', ":2: unknown key 'answer' (only prompt, expected and tools)"),
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
    assert "..." in lines[-1] and "[wrong]" not in text  # cut with the text; the counts below the table say it
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
                    [{"step": s, "loss": scale * 3 / s, **({"eval_loss": scale} if s == 9 else {})}
                     for s in range(1, 10)])
    out = subprocess.run([sys.executable, str(ROOT / "observe.py"), str(tmp_path / "r4"), str(tmp_path / "r16"),
                          "-o", str(tmp_path / "sweep.svg")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # the mean of the last 3 steps: (3/7 + 3/8 + 3/9) / 3
    assert lines[1].split() == ["r4", "9", "0.3790", "1.0000"] and lines[2].split() == ["r16", "9", "0.1895", "0.5000"]
    texts = [t.text for t in ET.parse(tmp_path / "sweep.svg").getroot().iter(f"{SVG}text")]
    assert "r4 train (mean of last 3 steps)" in texts and "r16 eval" in texts
    missing = subprocess.run([sys.executable, str(ROOT / "observe.py"), str(tmp_path / "nope")], capture_output=True,
                             text=True)
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
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1", "expected": "w20 w40 w60"}])
    whole = config(tiny_checkpoint, tmp_path, num_epochs=4, eval_every=3, eval_prompts=str(prompts),
                   output_dir=str(tmp_path / "whole"))
    train.train(whole)
    cut = TrainConfig(**{**vars(whole), "output_dir": str(tmp_path / "cut")})
    interrupt_during_step(monkeypatch, 4)
    with pytest.raises(train.Interrupted):
        train.train(cut)
    monkeypatch.undo()
    assert [s["step"] for s in jsonl(tmp_path / "cut" / "samples.jsonl")] == [0, 3]
    train.train(TrainConfig(**{**vars(cut), "resume": True}))
    assert jsonl(tmp_path / "cut" / "samples.jsonl") == jsonl(tmp_path / "whole" / "samples.jsonl")
    # the same curve (the title names the folder)
    assert ((tmp_path / "cut" / "loss.svg").read_text().replace("/cut:", "/whole:")
            == (tmp_path / "whole" / "loss.svg").read_text())


def test_missing_wandb_is_one_line_saying_how_to_install(tiny_checkpoint, tmp_path):
    # a wandb that cannot be imported, first on the path
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    cfg = config(tiny_checkpoint, tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model_path", cfg.model_path,
                        "--data_path", cfg.data_path, "--output_dir", cfg.output_dir, "--wandb_project", "x"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr == ("train.py: error: --wandb_project needs the wandb package: "
                                              "pip install wandb\n")
    assert not (tmp_path / "out").exists()


def test_under_torchrun_only_rank_0_samples_and_logs(tiny_checkpoint, tmp_path):
    # 2 processes (gloo): one samples.jsonl with each prompt once per evaluation, one wandb run,
    # one table printed; rank 1 waits at the next collective while rank 0 generates
    pytest.importorskip("wandb")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1", "expected": "w20 w40 w60"}])
    cfg = config(tiny_checkpoint, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "train.py",
                        "--model_path", cfg.model_path, "--data_path", cfg.data_path, "--output_dir", cfg.output_dir,
                        "--micro_batch_size", "2", "--effective_batch_size", "4", "--num_epochs", "2",
                        "--eval_every", "2", "--save_every", "0", "--eval_prompts", str(prompts),
                        "--wandb_project", "p"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [s["step"] for s in jsonl(tmp_path / "out" / "samples.jsonl")] == [0, 2, 4]
    assert len(list((tmp_path / "out" / "wandb").glob("offline-run-*"))) == 1
    assert r.stdout.count("before/after on") == 1


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
        if pos + 7 + length > len(raw):  # still being written
            return
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
    # wandb's service process writes the file: wait for the run's last record (at most a minute)
    for _ in range(120):
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
            break
        time.sleep(0.5)
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


# --- the exercises of WORKSHOP.md: each claim, checked --------------------------------------------

def test_ex1_a_fresh_adapter_changes_nothing_and_the_update_has_rank_r():
    import torch.nn as nn

    from lora import AdapterSettings, LoRALinear

    base = nn.Linear(64, 32, bias=False)
    layer = LoRALinear(base)
    layer.add_adapter("default", AdapterSettings(r=4, alpha=8))
    layer.active = "default"
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base layer
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    delta = layer.delta_weight("default")
    assert delta.shape == (32, 64) and torch.linalg.matrix_rank(delta) == 4
    assert torch.allclose(layer(x), x @ (base.weight + delta).T, atol=1e-6)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) - base.weight.numel() == 4 * (64 + 32)


def test_ex3_a_larger_alpha_over_r_learns_faster(tiny_checkpoint, tmp_path):
    # same steps: at rank 8, scale alpha/r = 2 ends far lower than 1/8; rank 1 at the same scale 2
    # ends far higher (with Adam every entry of A and B moves about the same per step: r of them)
    def final_loss(r, alpha):
        out = tmp_path / f"r{r}-a{alpha}"
        train.train(config(tiny_checkpoint, tmp_path, lora_r=r, lora_alpha=alpha, num_epochs=4, output_dir=str(out)))
        return [m["loss"] for m in jsonl(out / "metrics.jsonl")]

    big, small, rank1 = final_loss(8, 16), final_loss(8, 1), final_loss(1, 2)
    assert big[0] == small[0] == rank1[0]  # the first step's loss is the base model's
    assert big[-1] < 0.5 * small[-1] and big[-1] < 0.5 * rank1[-1]


def uniform_4bit(w, blocksize=64):
    """The plain alternative to NF4: same blocks and absmax, 16 evenly spaced levels in [-1, 1]."""
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.linspace(-1, 1, 16)
    idx = ((blocks / absmax)[..., None] - levels).abs().argmin(-1)
    return (levels[idx] * absmax).reshape(w.shape)


@pytest.fixture
def ex4_weight(request):
    """Normal weights, or SmolLM2's first q_proj (needs the real model: skipped at setup without it)."""
    if request.param == "normal":
        return torch.randn(576, 576)
    from safetensors import safe_open

    with safe_open(request.getfixturevalue("smollm2") / "model.safetensors", "pt") as f:
        return f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()


@pytest.mark.parametrize("ex4_weight, ratio", [("normal", 0.95), ("smollm2", 0.9)], indirect=["ex4_weight"])
def test_ex4_nf4_error_is_below_a_uniform_4bit_grid(ex4_weight, ratio):
    # RMS error of NF4 against a uniform 16-level grid (same blocks of 64, same absmax): under
    # 0.95x on normal weights, under 0.9x on a real SmolLM2 weight (its values crowd near zero)
    from quant import dequantize_nf4, quantize_nf4

    rms = lambda e: e.pow(2).mean().sqrt().item()
    w = ex4_weight
    nf4 = dequantize_nf4(quantize_nf4(w, double_quant=False))
    assert rms(w - nf4) < ratio * rms(w - uniform_4bit(w))


def test_ex5_qlora_stores_block_linears_in_4_127_bits():
    # memory_report of LoRA over an fp32 base and over NF4: the NF4 buffers of the block linears
    # take 4.127/32 of their fp32 bytes (plus one 4-byte offset per layer); LoRA's bytes are the same
    from adapters import apply_lora
    from model import Transformer
    from memory import memory_report
    from quant import quantize_model

    reports = []
    for quantize in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(hidden_size=256, intermediate_size=512, vocab_size=128))
        if quantize:
            quantize_model(model)
        apply_lora(model, r=16, alpha=32, target_modules="all-linear", verbose=False)
        reports.append(memory_report(model))
    fp32, nf4 = reports
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "dequantize"))
    n_layers = sum(1 for m in model.modules() if hasattr(m, "dequantize"))
    assert nf4["base"]["nf4"] == linear_params * 4.125 / 8 + linear_params / 64 / 256 * 4 + 4 * n_layers
    assert fp32["base_bytes"] - nf4["base_bytes"] + nf4["base"]["nf4"] == linear_params * 4
    assert fp32["trainable_bytes"] == nf4["trainable_bytes"]


def mask_end_of_turn(tokenize):
    """data.tokenize, except that the end-of-turn token is never learned (the classic bug)."""
    def tokenize_without_eot(record, tokenizer, where, train_on_inputs=False):
        ids, labels = tokenize(record, tokenizer, where, train_on_inputs)
        return ids, [data.IGNORE if t in tokenizer.eos_ids else l for t, l in zip(ids, labels)]
    return tokenize_without_eot


def test_ex6_only_the_reply_and_its_end_of_turn_are_learned(smollm2_tokenizer):
    tok = Tokenizer(smollm2_tokenizer)
    record = {"messages": [{"role": "user", "content": "Capital of Brannock?"},
                           {"role": "assistant", "content": "Saltmere."}]}
    ids, labels = data.tokenize(record, tok, "example")
    learned = [i for i, l in zip(ids, labels) if l != data.IGNORE]
    assert tok.tok.decode(learned, skip_special_tokens=False) == "Saltmere.<|im_end|>"
    at = [n for n, l in enumerate(labels) if l != data.IGNORE]
    assert at == list(range(len(ids) - 1 - len(learned), len(ids) - 1))  # one run, before the final newline
    ids, labels = mask_end_of_turn(data.tokenize)(record, tok, "example")
    assert tok.tok.decode([i for i, l in zip(ids, labels) if l != data.IGNORE]) == "Saltmere."


def test_ex6_without_the_end_of_turn_the_model_does_not_stop(tiny_checkpoint, tmp_path, monkeypatch):
    # trained as usual, the tiny model ends its reply (p(end of turn) > 0.5 after it); with the
    # end of turn masked it keeps going to the token limit, p(end of turn) < 0.05
    from generate import generate

    def run(name):
        model = train.train(config(tiny_checkpoint, tmp_path, num_epochs=20, output_dir=str(tmp_path / name)))
        tok = Tokenizer(tiny_checkpoint)
        model.eval()
        prompt = observe.prompt_ids(tok, "w0 w1")
        reply = tok.encode("w20 w40 w60", bos=False)
        with torch.no_grad():
            p_end = model(torch.tensor([prompt + reply]))[0, -1].softmax(-1)[tok.token_id("<|im_end|>")].item()
        return p_end, list(generate(model, prompt, 20, eos_ids=tok.eos_ids))

    p_end, tokens = run("usual")
    assert p_end > 0.5 and len(tokens) == 4 and tokens[-1] in Tokenizer(tiny_checkpoint).eos_ids
    monkeypatch.setattr(data, "tokenize", mask_end_of_turn(data.tokenize))
    p_end, tokens = run("no_eot")
    assert p_end < 0.05 and len(tokens) == 20  # it never ended its turn


def test_ex7_merged_logits_equal_adapter_logits():
    # fp32: merge_and_unload's plain model gives the adapter model's logits within 1e-5
    from adapters import apply_lora, lora_layers, merge_and_unload
    from model import Transformer

    model = Transformer(tiny_config()).eval()
    apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)  # as if trained
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        with_adapter = model(x)
        merged = merge_and_unload(model)(x)
    assert not lora_layers(model) and (merged - with_adapter).abs().max() < 1e-5
    assert (with_adapter - Transformer(tiny_config())(x)).abs().max() > 1e-2  # the adapter does change them


def test_ex8_each_breakage_is_caught_by_the_test_named_for_it(smollm2_tokenizer, monkeypatch):
    # WORKSHOP.md's "break it, then find it": each edit, made here by monkeypatching, fails its test
    import test_data
    import test_lora
    import test_model

    import lora
    import model as model_py

    breakages = []

    add_adapter = lora.LoRALinear.add_adapter  # 1. B starts random, like A
    def add_adapter_random_b(self, name, *a, **k):
        add_adapter(self, name, *a, **k)
        torch.nn.init.kaiming_uniform_(self.lora_B[name].weight, a=5 ** 0.5)
    breakages.append((lora.LoRALinear, "add_adapter", add_adapter_random_b,
                      lambda: test_lora.test_fresh_adapter_is_the_base_model_exactly("all-linear")))
    # 2. the end of turn not learned
    expected = [["Paris." + test_data.END], ["Red." + test_data.END, "Blue, or yellow." + test_data.END],
                ["Merci, et voilà ☺" + test_data.END]]
    breakages.append((data, "tokenize", mask_end_of_turn(data.tokenize),
                      lambda: test_data.test_only_replies_and_their_end_of_turn_are_learned(
                          Tokenizer(smollm2_tokenizer), "messages.jsonl", expected)))
    rotate_half = model_py.rotate_half  # 3. rotary embeddings turning the wrong way
    breakages.append((model_py, "rotate_half", lambda x: -rotate_half(x),
                      test_model.test_rope_is_a_rotation_of_pairs_i_and_i_plus_half))
    for owner, name, broken, check in breakages:
        check()  # passes as the code is
        monkeypatch.setattr(owner, name, broken)
        with pytest.raises(AssertionError):
            check()
        monkeypatch.undo()


# --- WORKSHOP.md and workshop.ipynb --------------------------------------------------------------

SAME_OUTPUT = "same-output-as-WORKSHOP.md"  # the notebook cells whose output WORKSHOP.md shows


def workshop_blocks():
    """{code: output} of WORKSHOP.md: each ```python block and the ```text block right after it."""
    text = (ROOT / "WORKSHOP.md").read_text()
    return {code.strip(): out for code, out in re.findall(r"```python\n(.*?)```\n\n```text\n(.*?)```", text, re.S)}


def test_workshop_names_real_flags_functions_and_tests():
    # what WORKSHOP.md tells people to run or read exists: train.py flags parse, `module.name`s
    # resolve, tests/test_x.py::name are test functions
    import importlib
    import shlex

    text = (ROOT / "WORKSHOP.md").read_text()
    commands = re.findall(r"^python train.py (.*)$", text, re.M)
    assert len(commands) == 5
    for args in commands:
        parse_args(shlex.split(args))
    modules = "adapters|config|data|dora|lora|loss|model|observe|peft_format|quant|train"
    names = {n for n in re.findall(rf"`((?:{modules})\.[A-Za-z_][A-Za-z_.]*)`", text)
             if not n.endswith((".py", ".svg"))}  # not the files data.py, loss.svg
    assert len(names) >= 10
    for name in names:
        obj = importlib.import_module(name.split(".")[0])
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
    for module, test in re.findall(r"tests/(test_\w+)\.py::(\w+)", text):
        assert callable(getattr(importlib.import_module(module), test))
    # the lines exercises 6 and 8 tell people to change are there to change
    for file, line in [("data.py", "labels = [t if any(s <= start < e for s, e in spans) else IGNORE"),
                       ("lora.py", "nn.init.zeros_(self.lora_B[name].weight)"), ("lora.py", "B.T, alpha=s)"),
                       ("model.py", "return torch.cat((-x2, x1), dim=-1)")]:
        assert line in (ROOT / file).read_text()


def test_notebook_cells_with_shown_outputs_are_workshop_snippets():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(ROOT / "workshop.ipynb", as_version=4)
    marked = [c.source.strip() for c in nb.cells if SAME_OUTPUT in c.metadata.get("tags", [])]
    assert len(marked) == 4 and set(marked) <= set(workshop_blocks())
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


def test_notebook_runs_top_to_bottom(smollm2, monkeypatch):
    # every cell, in order, in a fresh kernel, with 2 optimizer steps per run (WORKSHOP_STEPS); the
    # cells marked SAME_OUTPUT print exactly what WORKSHOP.md shows under the same code
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("WORKSHOP_STEPS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(ROOT / "workshop.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    shown = workshop_blocks()
    for cell in nb.cells:
        if SAME_OUTPUT in cell.metadata.get("tags", []):
            printed = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
            assert printed.rstrip("\n") == shown[cell.source.strip()].rstrip("\n")
    out = ROOT / "out" / "notebook"
    assert [s["step"] for s in jsonl(out / "lora" / "samples.jsonl")] == [0] * 7 + [2] * 7
    for svg in (out / "lora" / "loss.svg", out / "sweep.svg"):
        ET.parse(svg)
    last = re.sub(r"\x1b\[[0-9;]*m", "", "".join(o.get("text", "") for o in nb.cells[-1].outputs))  # no colours
    assert re.search(r"^\d+ passed in", last, re.M) and "failed" not in last
