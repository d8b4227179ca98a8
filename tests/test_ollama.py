"""The Ollama Modelfile (ollama.py) beside an exported GGUF.

- Its TEMPLATE and SYSTEM, rendered as Ollama's Go templates do (a Go text/template interpreter
  for the subset the Modelfiles use, below), equal the published templates' renderings
  (tests/data/renderings.json) of the chats without tools, character for character; its stops
  hold each family's end of turn.
- The Mistral renderings those are compared with equal mistral-common's own text of each prompt.
"""
import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import ROOT
import ollama
from tokenizer import Tokenizer, split_thinking


def test_modelfile_for_llama3_templates(smollm2_tokenizer, tmp_path):
    # a Llama 3.1-style template (a dated system header, always) in a tokenizer_config: the
    # Modelfile writes that header, and a stop for <|eot_id|>
    path = shutil.copytree(smollm2_tokenizer, tmp_path / "llama3", ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 3, "content": "<|eot_id|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(tok))
    cfg["chat_template"] = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>"
                            "Cutting Knowledge Date: December 2023")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = ollama.modelfile("model-q8_0.gguf", path)
    assert text.startswith('FROM ./model-q8_0.gguf\nTEMPLATE """<|start_header_id|>system<|end_header_id|>\n\n'
                           'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>')
    assert text.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n"""\nPARAMETER stop "<|im_end|>"\n'
                         'PARAMETER stop "<|eot_id|>"\n')


# ---- the Modelfile against the published templates (tests/data/renderings.json) --------------

GO_FUNCTIONS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a, "len": len,
                "slice": lambda x, i: x[i:], "and": lambda *a: next((v for v in a if not v), a[-1]),
                "or": lambda *a: next((v for v in a if v), a[-1])}


def go_value(expr, dot, names):
    """A Go template pipeline of the subset the Modelfiles use: a function (GO_FUNCTIONS) and its
    arguments, or one value: "text", true, 1, .Field, $.Field, $name, (a pipeline)."""
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)

    def group(it):
        out = []
        for w in it:
            if w == ")":
                return out
            out.append(group(it) if w == "(" else w)
        return out

    def value(w):
        if isinstance(w, list):
            return call(w)
        if w.startswith('"'):
            return json.loads(w)
        if w in ("true", "false"):
            return w == "true"
        if w.isdigit():
            return int(w)
        if w.startswith("$."):
            return names["$"][w[2:]]
        return names[w] if w.startswith("$") else dot[w.removeprefix(".")]

    def call(ws):
        return GO_FUNCTIONS[ws[0]](*map(value, ws[1:])) if ws[0] in GO_FUNCTIONS else value(*ws)

    return call(group(iter(words)))


def go_tree(items, pos=0):
    """Parsed actions -> (nodes, position after, the else/end that closed them)."""
    nodes = []
    while pos < len(items):
        kind, v = items[pos]
        pos += 1
        if kind == "text":
            nodes.append(("text", v))
        elif v == "end" or v == "else" or v.startswith("else if "):
            return nodes, pos, v
        elif v.startswith("if "):
            branches, cond = [], v[3:]
            while True:  # if / else if / else: (condition, body) in order
                body, pos, stop = go_tree(items, pos)
                branches.append((cond, body))
                if stop == "end":
                    break
                cond = stop.removeprefix("else if ") if stop != "else" else "true"
            nodes.append(("if", branches))
        elif v.startswith("range "):
            body, pos, _ = go_tree(items, pos)
            nodes.append(("range", v[6:], body))
        else:
            nodes.append(("action", v))
    return nodes, pos, None


def go_run(nodes, dot, names, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            body = next((body for cond, body in node[1] if go_value(cond, dot, names)), [])
            go_run(body, dot, names, out)
        elif node[0] == "range":  # range .X, range $v := .X, range $i, $v := .X
            declared, _, expr = node[1].rpartition(":=")
            variables = [v.strip() for v in declared.split(",") if v.strip()]
            for i, item in enumerate(go_value(expr, dot, names)):
                names.update(zip(variables, (i, item) if len(variables) == 2 else (item,)))
                go_run(node[2], item, names, out)
        elif m := re.fullmatch(r"(\$\w+)\s*:?=\s*(.*)", node[1], re.S):  # $v := x, $v = x
            names[m.group(1)] = go_value(m.group(2), dot, names)
        else:
            out.append(str(go_value(node[1], dot, names)))


def ollama_render(template, default_system, messages):
    """What Ollama writes for a chat with the Modelfile's TEMPLATE and SYSTEM: SYSTEM goes first as
    a system message when the chat has none (server/routes.go), .System is the system messages
    joined, .Messages all of them (template/template.go); Go's text/template for the subset the
    Modelfiles use: text, {{ pipeline }}, {{ $v := ... }} and {{ $v = ... }}, if / else if / else,
    range, end; {{- and -}} trim the whitespace beside them."""
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    root = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    parts = re.split(r"({{.*?}})", template, flags=re.S)
    items = []
    for i, part in enumerate(parts):
        if part.startswith("{{"):
            items.append(("action", part[2:-2].removeprefix("-").removesuffix("-").strip()))
        else:
            if i and parts[i - 1].endswith("-}}"):
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1].startswith("{{-"):
                part = part.rstrip()
            items.append(("text", part))
    out = []
    go_run(go_tree(items)[0], root, {"$": root}, out)
    return "".join(out)


MODELFILE_FAMILIES = ["HuggingFaceTB-SmolLM2-135M-Instruct.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja",
                      "meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja",
                      "Qwen-Qwen3-0.6B.jinja", "meta-llama-Llama-2-7b-chat-hf.jinja",
                      "mistralai-Mistral-7B-Instruct-v0.1.jinja", "mistralai-Mistral-7B-Instruct-v0.2.jinja",
                      "mistralai-Mistral-Large-Instruct-2407.jinja"]
# what each template strips (Llama 3: every message; Llama 2: user and assistant; Mistral v0.3: replies)
# and Ollama's Go template cannot: the chats go in stripped there
STRIPPED = {"llama3": ("system", "user", "assistant"), "llama2": ("user", "assistant"), "mistral_v3": ("assistant",)}


@pytest.mark.parametrize("template", MODELFILE_FAMILIES)
def test_modelfile_renders_what_the_published_template_does(smollm2_tokenizer, tmp_path, template):
    # The Modelfile's TEMPLATE and SYSTEM, filled as Ollama fills them, equal the published
    # template's rendering (add_generation_prompt, BOS aside: llama.cpp adds it) of every chat
    # without tools, character for character (the two-turn chat with a system prompt among them);
    # and its stops hold the family's end of turn (EOS for Llama 2 and Mistral).
    data = json.loads((ROOT / "tests" / "data" / "renderings.json").read_text())
    renderings = [r for r in data["renderings"] if r["template"] == template]
    path = shutil.copytree(smollm2_tokenizer, tmp_path / "family",  # the family's BOS and EOS, not SmolLM2's
                           ignore=shutil.ignore_patterns("*.safetensors", "generation_config.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(chat_template=(ROOT / "tests" / "data" / "templates" / template).read_text(),
               bos_token=renderings[0]["bos"] or None, eos_token=renderings[0]["eos"])
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = json.loads((path / "tokenizer.json").read_text())
    for i, content in enumerate(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>"]):
        tok["added_tokens"].append({"id": len(tok["model"]["vocab"]) + i, "content": content, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(tok))
    text = ollama.modelfile("model-f16.gguf", path)
    go = re.search(r'TEMPLATE """(.*?)"""\n', text, re.S).group(1)
    default_system = m.group(1) if (m := re.search(r'SYSTEM """(.*?)"""\n', text, re.S)) else ""
    stops = re.findall(r'PARAMETER stop "(.*?)"', text)
    family = Tokenizer(path).template
    compared = 0
    for r in renderings:
        chat = data["chats"][r["chat"]]
        if not r["add_generation_prompt"] or chat["tools"] or "error" in r \
                or not r.get("enable_thinking", True) or any(set(m) - {"role", "content"} for m in chat["messages"]):
            continue
        messages = [{**m, "content": m["content"].strip()} if m["role"] in STRIPPED.get(family, ()) else m
                    for m in chat["messages"]]
        if family == "qwen3":  # Ollama takes Qwen3's reasoning out of .Content itself
            messages = [{**m, "content": split_thinking(m["content"])[1]} for m in messages]
        assert ollama_render(go, default_system, messages) == r["text"].removeprefix(r["bos"]), r["chat"]
        assert r["eos"] in stops
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("template,tokenizer_model", [
    ("mistralai-Mistral-7B-Instruct-v0.2.jinja", "tokenizer.model.v1"),
    ("mistralai-Mistral-Large-Instruct-2407.jinja", "mistral_instruct_tokenizer_240323.model.v3")])
def test_mistral_renderings_are_what_mistral_common_writes(template, tokenizer_model):
    # The Mistral 7B templates stored (v0.2's; the v3 one, Large 2407's, for v0.3) against Mistral's
    # reference, mistral-common with v0.2's tokenizer (v1) and v0.3's (v3): its text of each prompt,
    # pieces joined, equals the rendering, character for character. The v3 template trims each
    # reply and mistral-common does not, so replies go in stripped there (as in the Modelfile test).
    mistral_common = pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(Path(mistral_common.__file__).parent / "data" / tokenizer_model))
    role = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    data = json.loads((ROOT / "tests" / "data" / "renderings.json").read_text())
    compared = 0
    for r in data["renderings"]:
        if r["template"] != template or not r["add_generation_prompt"] or "error" in r:
            continue  # mistral-common encodes prompts only: a chat waiting for the reply
        trim = "v3" in tokenizer_model
        messages = [role[m["role"]](content=m["content"].strip() if trim and m["role"] == "assistant" else m["content"])
                    for m in data["chats"][r["chat"]]["messages"]]
        ids = tok.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        pieces = tok.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)  # "<s>▁[INST]▁Hi<0x0A>..."
        text = re.sub(r"<0x([0-9A-F]{2})>", lambda m: chr(int(m.group(1), 16)), pieces).replace("\u2581", " ")
        assert text == r["text"], r["chat"]
        compared += 1
    assert compared >= 4  # the two-turn chat with a system prompt among them
