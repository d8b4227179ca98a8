"""The command lines as a user meets them: Ctrl-C, several adapters in the chat, the order in
which paths are checked, a mistyped folder taken for a hub id, an adapter of another base.
The hub is never reached: HF_ENDPOINT points to a local server or to a closed port."""
import http.server
import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from adapters import apply_lora
from common import CheckpointError, InputError
from data import DataError, read_jsonl
from generate import Chat, generate, load
from helpers import ROOT, tiny_config, write_checkpoint, write_tiny_tokenizer
from hub import resolve_checkpoint, same_checkpoint
from model import Config, Transformer
from peft_format import save_adapter

CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port


def env(endpoint=CLOSED):
    return {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, "HF_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1"}


def run(script, *args, cwd=ROOT, stdin="", endpoint=CLOSED):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env(endpoint), input=stdin,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def start():
    """Starts generate.py with pipes to talk to it; one still running when the test ends is killed."""
    procs = []

    def start(*args):
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *args], env=env(), text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def one_line_error(rc, err, message):
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def endless(tmp_path):
    """A tiny checkpoint whose eos token (id 130) lies past the model's 128 logits: it never
    stops by itself, so a long --max_new_tokens runs until Ctrl-C."""
    path = tmp_path / "endless"
    write_checkpoint(path, Transformer(tiny_config(max_position_embeddings=1 << 15)))
    write_tiny_tokenizer(path, vocab_size=131)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w127"}))
    return path


def read_until(p, stream, done, timeout=120):
    """Everything `stream` of process p printed, read as it comes, until done(text)."""
    text, end = "", time.monotonic() + timeout
    while not done(text):
        assert time.monotonic() < end and p.poll() is None, f"gave up waiting; so far: {text!r}"
        if select.select([stream], [], [], 0.1)[0]:
            text += os.read(stream.fileno(), 1 << 16).decode()
    return text


def test_ctrl_c_ends_a_prompt_without_traceback(endless, start):
    p = start("--model_path", str(endless), "--prompt", "w1 w2", "--max_new_tokens", "30000")
    streamed = read_until(p, p.stdout, lambda t: len(t.split()) >= 5)  # generation is under way
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130  # as the shell reports a command ended by Ctrl-C
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "[stopped]" in err and "tok/s" not in err
    assert (streamed + out).endswith("\n") and len((streamed + out).split()) < 30000


def test_ctrl_c_in_chat_ends_the_reply_then_leaves(endless, start):
    p = start("--model_path", str(endless), "--max_new_tokens", "30000")
    p.stdin.write("w1 w2\n")
    p.stdin.flush()
    out = read_until(p, p.stdout, lambda t: len(t.split()) >= 6)  # "> " then the reply streaming
    p.send_signal(signal.SIGINT)
    out += read_until(p, p.stdout, lambda t: t.endswith("\n> "))  # the reply ended; the next prompt
    assert p.poll() is None  # still chatting
    p.send_signal(signal.SIGINT)  # at the prompt: leave
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count("[stopped]") == 1 and out.count("> ") == 2


class CtrlC(io.StringIO):
    """An output on which Ctrl-C is pressed (`times` times at once) as the n-th piece of text arrives."""

    def __init__(self, at, times=1):
        super().__init__()
        self.at, self.times, self.writes = at, times, 0

    def write(self, text):
        self.writes += 1
        if self.writes == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        return super().write(text)


def test_ctrl_c_mid_reply_leaves_the_model_ready_for_the_next(endless):
    model, tok = load(endless)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup or in a background job
    chat = Chat(model, tok, {}, dict(max_new_tokens=1000), chat=False, out=CtrlC(at=3))
    assert chat.reply("w1 w2") is False  # stopped, no exception
    assert chat.out.getvalue().endswith("\n") and len(chat.out.getvalue().split()) < 10
    assert all(b.self_attn.kv_cache is None for b in model.model.layers)  # the cache is freed
    assert signal.getsignal(signal.SIGINT) is before  # restored: Ctrl-C outside a reply acts as it did before
    chat.out, chat.sampling = io.StringIO(), dict(max_new_tokens=20)
    assert chat.reply("w1 w2") is True and chat.out.getvalue().strip()  # ran to max_new_tokens


def test_a_second_ctrl_c_in_a_reply_leaves_the_chat(endless):
    model, tok = load(endless)
    before = signal.getsignal(signal.SIGINT)
    chat = Chat(model, tok, {}, dict(max_new_tokens=1000), chat=False, out=CtrlC(at=3, times=2))
    with pytest.raises(KeyboardInterrupt):
        chat.reply("w1 w2")
    assert all(b.self_attn.kv_cache is None for b in model.model.layers)
    assert signal.getsignal(signal.SIGINT) is before
    chat.out = CtrlC(at=3, times=2)
    prompts = iter(["w1 w2", "never read"])
    chat.run(lambda shown: next(prompts))  # returns: the chat is left, quietly
    assert next(prompts) == "never read"


# --- several adapters -----------------------------------------------------------------------------

@pytest.fixture
def adapters(tiny_checkpoint, tmp_path):
    """Two adapters of the tiny checkpoint with random B (each changes the answers), saved in PEFT format."""
    paths = {}
    for i, name in enumerate(("a", "b")):
        model = Transformer.from_pretrained(tiny_checkpoint)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear")
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for n, t in model.named_parameters():
                if "lora_B" in n:
                    t.normal_(0, 0.5)
        paths[name] = tmp_path / f"adapter_{name}"
        save_adapter(model, paths[name], base_model_name_or_path=str(tiny_checkpoint))
    return paths


def answer(checkpoint, adapter, prompt, new=8):
    """The greedy raw completion by a model with only `adapter` loaded (None: the base)."""
    model, tok = load(checkpoint, {"x": adapter} if adapter else {})
    ids = list(generate(model, tok.encode(prompt), new, eos_ids=tok.eos_ids))
    return tok.decode([t for t in ids if t not in tok.eos_ids])


def test_chat_switches_adapters_uses_the_base_and_compares(tiny_checkpoint, adapters):
    prompt = "w5 w6 w7"
    expected = {name: answer(tiny_checkpoint, path, prompt) for name, path in adapters.items()}
    expected["base"] = answer(tiny_checkpoint, None, prompt)
    assert len(set(expected.values())) == 3  # the adapters change the answer: the test can tell them apart

    model, tok = load(tiny_checkpoint, adapters)
    out = io.StringIO()
    chat = Chat(model, tok, adapters, dict(max_new_tokens=8), chat=False, out=out)
    lines = iter(["/adapters", prompt, "/adapter b", prompt, "/base", prompt, f"/compare {prompt}",
                  "/adapter nope", prompt, ""])
    prompts = []

    def read(shown):
        prompts.append(shown)
        return next(lines)

    chat.run(read)
    assert prompts == ["a> "] * 3 + ["b> "] * 2 + ["base> "] * 5  # the prompt shows who answers
    a, b, base = expected["a"], expected["b"], expected["base"]
    assert out.getvalue() == (
        f"adapters: a = {adapters['a']} (active), b = {adapters['b']}\n{a}\n"
        f"adapters: a = {adapters['a']}, b = {adapters['b']} (active)\n{b}\n"
        f"adapters: a = {adapters['a']}, b = {adapters['b']}; the base model answers (adapters off)\n{base}\n"
        f"[a]\n{a}\n[b]\n{b}\n[base]\n{base}\n"  # /compare, and the base still answers after it
        f"{base}\n")  # "/adapter nope" changed nothing


def test_compare_keeps_the_conversation_and_the_active_adapter(tiny_checkpoint, adapters):
    model, tok = load(tiny_checkpoint, adapters)
    chat = Chat(model, tok, adapters, dict(max_new_tokens=4), out=io.StringIO())
    chat.reply("w1 w2")
    before = list(chat.messages)
    chat.command("/adapter b")
    chat.command("/compare w3 w4")
    assert chat.messages == before and chat.active == "b"
    assert all(not m.disabled and m.active == "b" for m in model.modules() if hasattr(m, "lora_A"))
    with pytest.raises(InputError, match="no adapter named 'nope' .*a, b"):
        chat.command("/adapter nope")
    chat.command("/reset")
    assert chat.messages == []


def test_cli_says_which_adapters_are_loaded_and_switches(tiny_checkpoint, adapters):
    rc, out, err = run("generate.py", "--model_path", str(tiny_checkpoint), "--max_new_tokens", "4",
                       "--adapter_path", f"a={adapters['a']}", "--adapter_path", f"b={adapters['b']}",
                       stdin="/adapter b\n/help\n/compare w1\n\n")
    assert rc == 0 and "Traceback" not in err
    assert f"adapters: a = {adapters['a']} (active), b = {adapters['b']}" in err.splitlines()
    assert f"adapters: a = {adapters['a']}, b = {adapters['b']} (active)" in out
    assert "/compare PROMPT" in out and out.index("[a]") < out.index("[b]") < out.index("[base]")


def test_one_name_twice_or_the_name_base_is_refused(tiny_checkpoint, adapters):
    rc, _, err = run("generate.py", "--adapter_path", f"x={adapters['a']}", "--adapter_path", f"x={adapters['b']}")
    one_line_error(rc, err, "adapter name 'x' given twice")
    rc, _, err = run("generate.py", "--adapter_path", f"base={adapters['a']}")
    one_line_error(rc, err, "'base' means the base model")


# --- paths: checked first, and a mistyped folder is not a hub 404 --------------------------------

@pytest.mark.parametrize("script", ["generate.py", "merge.py"])
@pytest.mark.parametrize("case, message", [("missing", "no such adapter folder"),
                                            ("empty", "no adapter_config.json (not a PEFT adapter folder)")])
def test_adapter_path_is_checked_before_the_model_loads(tmp_path, script, case, message):
    # the model path is a hub id: had the model been looked at first, the closed port would say "cannot download"
    adapter = tmp_path / "adapter"
    if case == "empty":
        adapter.mkdir()
    rest = ["--prompt", "hi"] if script == "generate.py" else ["--output_dir", str(tmp_path / "merged")]
    rc, _, err = run(script, "--model_path", "org/model", "--adapter_path", str(adapter), *rest, cwd=tmp_path)
    one_line_error(rc, err, f"{adapter}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adapter"] if case == "empty" else [])  # nothing written


class Refuses(http.server.BaseHTTPRequestHandler):
    """Answers every file as the Hub answers a model that does not exist (or is private)."""
    code, error_code = 404, "RepoNotFound"

    def do_GET(self):
        self.send_response(Refuses.code)
        self.send_header("X-Error-Code", Refuses.error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield url
    server.shutdown()


def test_mistyped_folder_is_no_such_folder_nor_hub_model(tmp_path, refusing_hub):
    rc, _, err = run("generate.py", "--model_path", "models/smol", "--prompt", "hi", cwd=tmp_path,
                     endpoint=refusing_hub)
    one_line_error(rc, err, "models/smol: no such folder, and no such model on the Hub "
                           "(private or gated? set HF_TOKEN)")
    assert "HTTP" not in err and not (tmp_path / "checkpoints").exists()  # no empty folders left


@pytest.mark.parametrize("code, token, hint", [(401, None, "private or gated? set HF_TOKEN"),
                                               (404, "hf_x", "gated? accept its terms on its Hub page")])
def test_hub_refusal_names_both_readings(tmp_path, refusing_hub, monkeypatch, code, token, hint):
    Refuses.code = code
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    try:
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint("org/typo", root=tmp_path / "checkpoints")
    finally:
        Refuses.code = 404
    assert str(e.value) == f"org/typo: no such folder, and no such model on the Hub ({hint})"
    assert not (tmp_path / "checkpoints").exists()


def test_a_hub_model_without_config_json_is_not_called_missing(tmp_path, refusing_hub):
    Refuses.error_code = "EntryNotFound"  # the repository exists; the file does not (a GGUF-only one)
    try:
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint("org/gguf-only", root=tmp_path / "checkpoints")
    finally:
        Refuses.error_code = "RepoNotFound"
    assert str(e.value) == f"{refusing_hub}/org/gguf-only/resolve/main/config.json: HTTP 404"


def test_offline_leaves_no_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    with pytest.raises(CheckpointError, match="offline"):
        resolve_checkpoint("org/tiny", root=tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints").exists()


# --- an adapter trained on another base -----------------------------------------------------------

def test_hub_id_and_its_download_folder_are_the_same_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "org" / "m").mkdir(parents=True)
    assert same_checkpoint("org/m", "checkpoints/org/m")
    assert same_checkpoint("org/m", str(tmp_path / "checkpoints/org/m"))
    assert not same_checkpoint("org/m", "org/other") and not same_checkpoint("checkpoints/org/m", "elsewhere/m")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a broken folder is a reason to warn, not to crash
    assert not same_checkpoint("org/m", "o/m", root="loop") and same_checkpoint("org/m", "org/m", root="loop")


def retarget(adapter, base):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))


def test_adapter_of_another_base_is_a_warning_not_a_refusal(tiny_checkpoint, adapters, tmp_path):
    args = ["--model_path", str(tiny_checkpoint), "--max_new_tokens", "2", "--prompt", "w1"]
    rc, _, err = run("generate.py", *args, "--adapter_path", str(adapters["a"]))
    assert rc == 0 and "warning" not in err  # trained on this very folder
    retarget(adapters["a"], "org/other-model")
    rc, out, err = run("generate.py", *args, "--adapter_path", str(adapters["a"]))
    assert rc == 0 and out.strip()
    assert (f"generate.py: warning: adapter default ({adapters['a']}) was trained on org/other-model, not on "
            f"{tiny_checkpoint} (fine if it is the same model at another path)") in err.splitlines()
    rc, out, err = run("merge.py", "--model_path", str(tiny_checkpoint), "--adapter_path", str(adapters["a"]),
                       "--output_dir", str(tmp_path / "merged"))
    assert rc == 0 and "merge.py: warning:" in err and "org/other-model" in err
    assert (tmp_path / "merged" / "model.safetensors").exists()


# --- small things -----------------------------------------------------------------------------------

def test_json_error_says_at_column_once(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "unterminated\n')
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}:1: not valid JSON (Unterminated string starting at column 10)"


def test_bench_config_is_llama3_8b():
    config = Config.from_json(ROOT / "configs" / "llama3-8b.json")
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta-Llama-3-8B's own count
