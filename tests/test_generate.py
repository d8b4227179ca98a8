"""generate.py and tokenizer.py: sampling, stopping, the real model's chat, the command line, the hub."""
import copy
import http.server
import io
import json
import subprocess
import sys
import threading

import pytest
import torch

from common import CheckpointError, InputError
from generate import generate, load, sample, stream_text
from helpers import ROOT, tiny_config, write_chatml_tokenizer, write_checkpoint, write_tiny_tokenizer
from hub import resolve_checkpoint
from model import Transformer
from tokenizer import Tokenizer, render_chat

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_and_sampling_rules():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits) == 1  # temperature 0 is argmax
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample(logits, 1.0, top_p=0.01, generator=g) for _ in range(20)} == {1}
    # top_p=0.6 keeps tokens 1 and 2 (0.51 + 0.46 covers it), never 0 or 3
    assert {sample(logits, 1.0, top_p=0.6, generator=g) for _ in range(200)} == {1, 2}
    draws = [[sample(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(30)] for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same draws


def test_generation_uses_the_cache_and_stops_at_eos():
    model = Transformer(tiny_config()).eval()
    prompt = [5, 6, 7, 8]
    tokens = list(generate(model, prompt, max_new_tokens=10))
    assert len(tokens) == 10
    ids = list(prompt)  # the same greedy tokens from full recomputation without a cache
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens == ids[len(prompt):]
    stop = tokens[3]
    assert list(generate(model, prompt, max_new_tokens=10, eos_ids={stop})) == tokens[: tokens.index(stop) + 1]
    assert all(b.self_attn.kv_cache is None for b in model.model.layers)  # cache freed


def test_chatml_prompt_equals_the_checkpoint_template(chatml_tokenizer):
    # SmolLM2's own jinja template (its tokenizer_config.json's, on the stand-in tokenizer), rendered by hand:
    # the default system prompt, then the turn.
    tok = Tokenizer(chatml_tokenizer)
    text, spans = tok.render(QUESTION, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert spans == [] and tok.eos_ids == {2} and not tok.add_bos
    ids = tok.encode(text, bos=False)
    assert ids[0] == tok.token_id("<|im_start|>") and ids.count(tok.token_id("<|im_start|>")) == 3


def test_chat_template_matches_transformers(chatml_tokenizer):
    # transformers renders the checkpoint's jinja template; ours must give the same string and ids.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chatml_tokenizer)
    tok = Tokenizer(chatml_tokenizer)
    chats = [QUESTION, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for messages in chats:
        text = tok.render(messages, add_generation_prompt=True)[0]
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.encode(text, bos=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_real_model_answers_paris(smollm2):
    model, tok = load(smollm2)
    ids = tok.encode(tok.render(QUESTION, add_generation_prompt=True)[0], bos=False)
    out = io.StringIO()
    text = stream_text(tok, generate(model, ids, 40, eos_ids=tok.eos_ids), tok.eos_ids, out=out)
    assert "Paris" in text and out.getvalue() == text + "\n"  # streamed pieces add up to the answer


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_prints_only_the_answer_to_stdout(tiny_checkpoint):
    # stdout is exactly the greedy chat answer (as generated here, a line), the timing goes to stderr
    model, tok = load(tiny_checkpoint)
    ids = tok.encode(tok.render([{"role": "user", "content": "w5 w6 w7"}], add_generation_prompt=True)[0], bos=False)
    answer = stream_text(tok, generate(model, ids, 8, eos_ids=tok.eos_ids), tok.eos_ids, out=io.StringIO())
    assert answer.strip()  # a random model could stop at once: then stdout would show nothing to compare
    r = run_cli("--model_path", str(tiny_checkpoint), "--prompt", "w5 w6 w7", "--max_new_tokens", "8")
    assert r.returncode == 0 and r.stdout == answer + "\n"
    assert "tok/s" in r.stderr


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such checkpoint folder"),
    ("no_tokenizer", "no tokenizer.json"),
    ("corrupt", "not a readable safetensors file"),
])
def test_cli_bad_checkpoints_one_line_exit_2(tmp_path, setup, message):
    path = tmp_path / "ckpt"
    if setup != "missing":
        write_checkpoint(path, Transformer(tiny_config()))
    if setup == "corrupt":
        write_tiny_tokenizer(path)
        (path / "model.safetensors").write_bytes(b"garbage")
    r = run_cli("--model_path", str(path), "--prompt", "hi")
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_bad_flag_exit_2():
    r = run_cli("--top_p", "2", "--prompt", "hi")
    assert r.returncode == 2 and "--top_p must be in (0, 1]" in r.stderr


class Hub(http.server.BaseHTTPRequestHandler):
    """Serves files as the Hub does: /{org}/{name}/resolve/main/{file}."""
    files, requests, truncate = {}, [], set()

    def do_GET(self):
        Hub.requests.append(self.path)
        body = Hub.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in Hub.truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_checkpoint(src, Transformer(tiny_config()), shards=2)
    (src / "tokenizer.json").write_text("{}")
    Hub.files = {f"/org/tiny/resolve/main/{f.name}": f.read_bytes() for f in src.iterdir()}
    Hub.requests, Hub.truncate = [], set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield tmp_path / "checkpoints"
    server.shutdown()


def test_hub_id_downloads_once_into_checkpoints(hub):
    path = resolve_checkpoint("org/tiny", root=hub)
    assert path == hub / "org" / "tiny"
    assert sorted(p.name for p in path.iterdir()) == sorted(f.rsplit("/", 1)[1] for f in Hub.files)
    n = len(Hub.requests)
    assert resolve_checkpoint("org/tiny", root=hub) == path and len(Hub.requests) == n  # no second download
    Transformer.from_pretrained(path)


def test_interrupted_download_is_not_taken_for_complete(hub):
    shard = "/org/tiny/resolve/main/model-00002-of-00002.safetensors"
    Hub.truncate = {shard}
    with pytest.raises(CheckpointError):
        resolve_checkpoint("org/tiny", root=hub)
    assert not (hub / "org" / "tiny" / "model-00002-of-00002.safetensors").exists()
    Hub.truncate, Hub.requests = set(), []
    path = resolve_checkpoint("org/tiny", root=hub)  # resumes: only what is missing is fetched
    assert [r for r in Hub.requests if r in Hub.files] == [shard]
    Transformer.from_pretrained(path)


def test_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(CheckpointError, match="cannot download org/tiny .*offline"):
        resolve_checkpoint("org/tiny", root=tmp_path)


# Published chat templates (tokenizer_config.json of the named checkpoints), rendered by
# transformers' jinja, against ours written by hand.
TEMPLATES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",  # meta-llama/Meta-Llama-3-8B-Instruct
               "{% set loop_messages = messages %}{% for message in loop_messages %}"
               "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+"
               " message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "llama2": ("<s>", "</s>",  # meta-llama/Llama-2-7b-chat-hf
               "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
               "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
               "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "mistral": ("<s>", "</s>",  # mistralai/Mistral-7B-Instruct-v0.1
                "{{ bos_token }}{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
                "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
}
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
     {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("name", TEMPLATES)
def test_hand_written_templates_match_the_published_ones(name, tmp_path):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    bos, eos, template = TEMPLATES[name]
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos,
                                                               "chat_template": template}))
    tok = Tokenizer(tmp_path)
    assert tok.template == name
    for messages in CHATS:
        if name == "mistral" and messages[0]["role"] == "system":
            continue  # v0.1's template refuses a system turn
        for prompt in (True, False):
            chat = messages if prompt else messages + [{"role": "assistant", "content": "Done."}]
            expected = utils.render_jinja_template(
                conversations=[chat], chat_template=template, bos_token=bos, eos_token=eos,
                add_generation_prompt=prompt and name == "llama3")[0][0]
            ours = render_chat(chat, name, bos, eos, add_generation_prompt=prompt and name == "llama3")[0]
            assert ours == expected


def test_llama31_dated_system_header():
    # Llama 3.1's template (as rendered in its model card and by llama.cpp's tests): a system
    # header with the knowledge cutoff and a fixed date always comes first.
    text, spans = render_chat([{"role": "system", "content": "System message"},
                               {"role": "user", "content": "User message"},
                               {"role": "assistant", "content": "Assistant message"}], "llama3", "<|begin_of_text|>",
                              system_date="26 Jul 2024")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    "System message<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                    "User message<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                    "Assistant message<|eot_id|>")
    assert [text[a:b] for a, b in spans] == ["Assistant message<|eot_id|>"]


# --- tools and thinking ------------------------------------------------------------------------

TOOLS = json.loads((ROOT / "data" / "brannock_tools.json").read_text())
CALL = '<tool_call>\n{"name": "ferry_times", "arguments": {"port": "Kestry"}}\n</tool_call>'


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    return Tokenizer(write_chatml_tokenizer(tmp_path_factory.mktemp("chatml")))


def scripted_chat(monkeypatch, tok, replies, **kw):
    """A Chat whose model "generates" the given replies in turn; the prompts it got are recorded."""
    import generate as g

    prompts, replies = [], list(replies)

    def fake(model, prompt_ids, stats, **_):
        prompts.append(tok.tok.decode(prompt_ids, skip_special_tokens=False))
        ids = tok.encode(replies.pop(0), bos=False) + [min(tok.eos_ids)]
        stats.update(prompt_tokens=len(prompt_ids), prefill_s=1, new_tokens=len(ids), decode_s=1)
        yield from ids

    monkeypatch.setattr(g, "generate", fake)
    out = io.StringIO()
    return g.Chat(Transformer(tiny_config(max_position_embeddings=2048)), tok, {}, {}, out=out, **kw), prompts, out


def test_parse_tool_calls_in_each_templates_form():
    from tokenizer import parse_tool_calls
    want = [{"name": "ferry_times", "arguments": {"port": "Kestry"}}]
    assert parse_tool_calls("Let me look.\n" + CALL) == want  # ChatML, Qwen3
    assert parse_tool_calls('{"name": "ferry_times", "parameters": {"port": "Kestry"}}') == want  # Llama 3
    assert parse_tool_calls('[TOOL_CALLS][{"name": "ferry_times", "arguments": {"port": "Kestry"}, "id": "a"}]') == want
    assert parse_tool_calls("The ferry leaves at 14:10.") == []
    assert parse_tool_calls('<tool_call>\n{"name": "ferry_times", "arguments": {port}}') == \
        [{"invalid": '{"name": "ferry_times", "arguments": {port}}'}]


def test_tool_calls_print_as_json_and_results_go_back(monkeypatch, chatml_tok):
    chat, prompts, out = scripted_chat(monkeypatch, chatml_tok, [CALL, "At 14:10."], tools=TOOLS)
    chat.reply("Next ferry to Kestry?")
    assert out.getvalue() == (CALL + "\n" + '{"name": "ferry_times", "arguments": {"port": "Kestry"}}\n'
                              '[answer with /tool RESULT]\n')
    assert "<tools>\n" + json.dumps(TOOLS[0]) in prompts[0]  # the schemas are in the prompt
    with pytest.raises(InputError, match="/tool RESULT: the result is missing"):
        chat.command("/tool")
    chat.command('/tool {"next": "14:10"}')
    # the next prompt: the call as a call (not as text), then the result as Qwen2.5 writes it
    assert prompts[1].endswith("<|im_start|>assistant\n" + CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                               '{"next": "14:10"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert chat.messages[-1] == {"role": "assistant", "content": "At 14:10."}
    with pytest.raises(InputError, match="no tool call waits for a result"):
        chat.command("/tool again")


def test_prompt_with_tools_prints_only_the_calls(monkeypatch, chatml_tok):
    chat, _, out = scripted_chat(monkeypatch, chatml_tok, [CALL, "No call here."], tools=TOOLS, calls_only=True)
    chat.reply("Next ferry to Kestry?")
    chat.reply("Thanks")
    assert out.getvalue() == '{"name": "ferry_times", "arguments": {"port": "Kestry"}}\nNo call here.\n'


def test_qwen3_thinking_switch(monkeypatch, chatml_tok):
    tok = copy.copy(chatml_tok)
    tok.template, tok.default_system = "qwen3", None
    chat, prompts, _ = scripted_chat(monkeypatch, tok, ["One.", "Two.", "Three."], enable_thinking=False)  # --no_think
    chat.reply("Hi")
    chat.command("/think")
    chat.reply("Hi")
    chat.command("/no_think")
    chat.reply("Hi")
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert [p.endswith(closed) for p in prompts] == [True, False, True]


def test_think_switch_needs_qwen3(monkeypatch, chatml_tok):
    chat, _, _ = scripted_chat(monkeypatch, chatml_tok, [])
    with pytest.raises(InputError, match="only Qwen3's template"):
        chat.command("/no_think")


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"name": "ferry_times"}', "tools must be a list of function schemas"),
    ('[{"type": "function", "function": {"parameters": {}}}]', "tool 1 is not a function schema"),
])
def test_bad_tools_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    import generate as g
    path = tmp_path / "tools.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        g.main(["--model_path", str(tmp_path / "none"), "--tools", str(path), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--tools {path}: {message}" in err and len(err.strip().splitlines()) == 1


def test_eval_prompts_with_tools(tmp_path):
    import observe
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Next ferry?", "tools": TOOLS, "expected": "ferry_times"}) + "\n"
                    + json.dumps({"prompt": "Capital?", "tools": TOOLS, "expected": "Saltmere"}) + "\n")
    prompts = observe.read_prompts(path)
    assert prompts[0]["tools"] == TOOLS
    replies = [CALL, "Saltmere."]
    assert observe.count_right(prompts, replies) == (2, 2)  # a tool name: the call; other text: as before
    assert not observe.is_right(CALL.replace("ferry_times", "weather"), "ferry_times", TOOLS)
    assert not observe.is_right(CALL.replace('{"port": "Kestry"}', '"Kestry"'), "ferry_times", TOOLS)  # not an object
    assert not observe.is_right("ferry_times({port: Kestry})", "ferry_times", TOOLS)
    path.write_text(json.dumps({"prompt": "x", "tools": [{"name": "f"}]}) + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:1: tool 1 is not a function schema"):
        observe.read_prompts(path)
    path.write_text(json.dumps({"prompt": "x", "tools": TOOLS}) + "\n")  # refused before any training starts
    write_tiny_tokenizer(tmp_path)
    with pytest.raises(InputError, match=r"p\.jsonl:1: the llama2 chat template has no place for tools"):
        observe.read_prompts(path, Tokenizer(tmp_path, template="llama2"))
