"""The checkpoint's tokenizer and chat template, with no transformers and no jinja2.

Hugging Face checkpoints describe the chat format as a jinja template in tokenizer_config.json.
The families we support use one of eight formats, recognized by their markers (as llama.cpp
does) and written here by hand:

    chatml   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n        SmolLM2, Qwen2/2.5
    qwen3    chatml, and the reply opens with <think>\\n...\\n</think>\\n\\n      Qwen3
    llama3   <|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>       Llama 3.x
    llama2   <s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nHi [/INST]                 Llama 2, TinyLlama-chat
    mistral  <s>[INST] Hi [/INST]                                         Mistral 7B v0.1's first template
    mistral_v1  <s> [INST] Hi [/INST] Hello</s>                            Mistral 7B v0.1/v0.2 (tokenizer v1)
    mistral_v3  <s>[INST] Hi[/INST] Hello</s>                              Mistral 7B v0.3 (tokenizer v3)
    mistral_nemo  <s>[INST]Hi[/INST]                                      Mistral Nemo (llama.cpp's v3-tekken)

Tools, tool calls, tool results and reasoning go where each family's published template puts
them (render_chat; none in llama2 and the mistral ones); tests/test_tokenizer.py compares every format
with renderings of the published templates (tests/data/).
"""
import json
import re
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from common import CheckpointError

TEMPLATES = ("chatml", "qwen3", "llama3", "llama2", "mistral", "mistral_v1", "mistral_v3", "mistral_nemo")


END_OF_TURN = {"chatml": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}  # the token a reply ends with
# Mistral 7B's forms: what goes before a user message, after it, and before a reply (which ends with EOS)
MISTRAL = {"mistral": ("[INST] ", " [/INST]", ""), "mistral_v1": (" [INST] ", " [/INST]", " "),
           "mistral_v3": ("[INST] ", "[/INST]", " ")}


def read_json(path):
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def token_content(token):  # tokenizer_config writes special tokens as "<s>" or {"content": "<s>", ...}
    return token.get("content") if isinstance(token, dict) else token


def stored_chat_template(path, cfg):
    """The checkpoint's chat template as stored: tokenizer_config.json's `chat_template` (a string,
    or a list of named ones), else the chat_template.jinja newer repos keep beside it; or None."""
    chat = cfg.get("chat_template")
    if chat is None and (Path(path) / "chat_template.jinja").is_file():
        chat = (Path(path) / "chat_template.jinja").read_text()
    return chat


class Tokenizer:
    def __init__(self, path, template=None):
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        cfg = read_json(path / "tokenizer_config.json")
        gen = read_json(path / "generation_config.json")
        self.bos_id = self.token_id(token_content(cfg.get("bos_token")))
        # BOS for raw text: as tokenizer_config says, else as tokenizer.json's post-processor does.
        # We always encode with add_special_tokens=False and add BOS ourselves, so a chat prompt
        # whose template already writes BOS never gets a second one.
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        without = self.tok.encode("a", add_special_tokens=False).ids
        inferred_bos = with_special[0] if len(with_special) > len(without) else None
        if self.bos_id is None:
            self.bos_id = inferred_bos
        self.add_bos = cfg.get("add_bos_token", inferred_bos is not None) and self.bos_id is not None
        eos = gen.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        if (e := self.token_id(token_content(cfg.get("eos_token")))) is not None:
            self.eos_ids.add(e)
        pad = self.token_id(token_content(cfg.get("pad_token")))
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        chat_template = stored_chat_template(path, cfg) or ""
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), "")
        self.template = template or detect_template(chat_template)
        if self.template is not None and self.template not in TEMPLATES:
            raise CheckpointError(f"chat template {self.template!r} is not one of {', '.join(TEMPLATES)}")
        self.default_system = default_system_prompt(chat_template, self.template)
        # Llama 3.1+ templates always open with a system header stating a knowledge cutoff and a
        # date: a fixed one, or today's where the template asks for strftime_now (Llama 3.2)
        self.system_date = None
        if "Cutting Knowledge Date" in chat_template:
            self.system_date = time.strftime("%d %b %Y") if "strftime_now" in chat_template else "26 Jul 2024"
        end_of_turn = END_OF_TURN.get(self.template)
        if end_of_turn and (e := self.token_id(end_of_turn)) is not None:
            self.eos_ids.add(e)  # a chat reply ends at its end-of-turn token

    def token_id(self, text):
        return None if text is None else self.tok.token_to_id(text)

    def encode(self, text, bos=None):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def encode_with_offsets(self, text):
        """Token ids and each token's (start, end) character span; specials in text are parsed."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def render(self, messages, add_generation_prompt=False, enable_thinking=True, tools=None):
        """The chat as the checkpoint's template writes it, and the (start, end) character spans of
        the assistant turns, each including its end-of-turn token (what training learns); see
        render_chat. enable_thinking=False: Qwen3's generation prompt for a reply without reasoning."""
        if self.template is None:
            raise CheckpointError("this checkpoint has no chat template; pass --chat_template "
                                  f"({', '.join(TEMPLATES)}) or use raw text")
        return render_chat(messages, self.template, self.bos_text, self.eos_text, self.default_system,
                           self.system_date, add_generation_prompt, enable_thinking, tools)

    @property
    def bos_text(self):
        return "" if self.bos_id is None else self.tok.id_to_token(self.bos_id)

    @property
    def eos_text(self):
        return self.tok.id_to_token(min(self.eos_ids)) if self.eos_ids else ""


def detect_template(chat_template):
    if "<|im_start|>" in chat_template and "<think>" in chat_template:
        return "qwen3"
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<<SYS>>" in chat_template:
        return "llama2"
    if '"[INST]"' in chat_template and "[AVAILABLE_TOOLS]" in chat_template:
        return "mistral_nemo"
    if "[AVAILABLE_TOOLS] [" in chat_template:  # v0.3's: "[INST] " + ... + "[/INST]"
        return "mistral_v3"
    if "' [INST] '" in chat_template:  # v0.2's (and v0.1's today): a space before [INST]
        return "mistral_v1"
    if "[INST]" in chat_template:
        return "mistral"
    return None


def default_system_prompt(chat_template, template):
    """The system prompt a ChatML template writes when the chat has none (SmolLM2's, Qwen2.5's): a
    string literal '<|im_start|>system\\n...<|im_end|>' with nothing computed inside. The literal
    that opens the chat's own system message ('<|im_start|>system\\n' + ...) ends at its quote."""
    if template != "chatml":
        return None
    for m in re.finditer(r"""(['"])<\|im_start\|>system(?:\n|\\n)((?:(?!\1).)*?)<\|im_end\|>""", chat_template, re.S):
        if m.group(2) and "{" not in m.group(2):
            return m.group(2).replace("\\n", "\n")
    return None


# The tool prompts of the published templates, word for word (Qwen2.5 and Qwen3 share theirs).
CHATML_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>{}\n</tools>\n\nFor each function "
                "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:"
                '\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
LLAMA3_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                '"parameters": dictionary of argument name and its value}.Do not use variables.\n\n')


def to_json(value, indent=None):
    return json.dumps(value, ensure_ascii=False, indent=indent)  # as transformers' tojson filter writes it


def render_chat(messages, template, bos="", eos="", default_system=None, system_date=None,
                add_generation_prompt=False, enable_thinking=True, tools=None):
    """The chat as text, and the (start, end) character spans to learn: each assistant turn, its
    tool calls and its end-of-turn token. ValueError: a chat this template has no way to write.

    messages: OpenAI's form, as data.py checks it: {"role": "system"|"user"|"assistant"|"tool",
    "content": str}; an assistant's may carry "tool_calls": [{"type": "function", "function":
    {"name": str, "arguments": dict}, "id": str}] and "reasoning_content": str (Qwen3's think
    block; the other templates leave it out, as theirs do). tools: JSON schemas [{"type":
    "function", "function": {"name", "description", "parameters"}}], or None."""
    parts, spans = [], []
    pos = 0

    def add(text, trained=False):
        nonlocal pos
        if trained:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)

    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    tools = tools or None
    if template in ("chatml", "qwen3"):
        render_chatml(add, system, messages, tools, template == "qwen3", default_system, add_generation_prompt,
                      enable_thinking)
    elif template == "llama3":
        render_llama3(add, bos, system, messages, tools, system_date, add_generation_prompt)
    elif template == "mistral_nemo":
        render_mistral_nemo(add, bos, eos, system, messages, tools)
    else:
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise ValueError("Mistral v0.3's tool format ([AVAILABLE_TOOLS], [TOOL_CALLS]) is not written here"
                             if template == "mistral_v3" else
                             f"the {template} chat template has no place for tools, tool calls or tool results")
        if template == "llama2":
            for i, m in enumerate(messages):
                if m["role"] == "user":  # the system prompt rides in the first user turn
                    sys_prefix = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system is not None else ""
                    add(f"{bos}[INST] {(sys_prefix + m['content']).strip()} [/INST]")
                else:
                    add(f" {m['content'].strip()} {eos}", trained=True)
        else:
            inst, close, reply = MISTRAL[template]
            v3 = template == "mistral_v3"
            # the system prompt goes before the first user message; v0.3's before the last message,
            # and only if that is the user's (loop.last): a chat ending with a reply is learned without it
            at = len(messages) - 1 if v3 else 0
            add(bos)
            for i, m in enumerate(messages):
                if m["role"] == "user":
                    add(inst + (f"{system}\n\n" if i == at and system is not None else "") + m["content"] + close)
                else:
                    add(reply + (m["content"].strip() if v3 else m["content"]) + eos, trained=True)
    return "".join(parts), spans


def split_thinking(content):
    """("reasoning", "reply") of an assistant message written as "<think>reasoning</think>reply";
    ("", content) when it has no </think>."""
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")
    return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")


def render_chatml(add, system, messages, tools, qwen3, default_system, add_generation_prompt, enable_thinking):
    """ChatML as Qwen2.5's template writes it, and Qwen3's (qwen3=True: no default system prompt,
    and these <think> rules):
    - replies after the last user turn keep their reasoning (reasoning_content, or the content's
      own <think>...</think>), as <think>\\n...\\n</think>\\n\\n; the last reply gets the block even
      when empty (data without reasoning trains on an empty block, which is how Qwen3 answers
      without thinking);
    - replies before it (the history) are written without their reasoning;
    - the generation prompt is "<|im_start|>assistant\\n", followed by an empty block when
      enable_thinking is False (the reply then comes without reasoning).
    Tools go into the system turn, calls are <tool_call> blocks after the reply's text, and a run
    of tool results is one user turn of <tool_response> blocks. ChatML templates without a tool
    section (SmolLM2's) get Qwen2.5's. The trained span of a reply is everything after
    "<|im_start|>assistant\\n" (think block and calls included) up to and with <|im_end|>."""
    head = system if system is not None else default_system
    if tools:
        schemas = "".join("\n" + to_json(t) for t in tools)
        head = head + "\n\n" if head is not None else ""
        add(f"<|im_start|>system\n{head}{CHATML_TOOLS.format(schemas)}<|im_end|>\n")
    elif head is not None:
        add(f"<|im_start|>system\n{head}<|im_end|>\n")
    # Qwen3: a user turn that is only a <tool_response> block does not count as the last query
    queries = [i for i, m in enumerate(messages) if m["role"] == "user" and not
               (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))]
    last_query = queries[-1] if queries else len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            add(("<|im_start|>user" if first else "") + f"\n<tool_response>\n{m['content']}\n</tool_response>"
                + ("<|im_end|>\n" if last else ""))
            continue
        if m["role"] != "assistant":
            add(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            continue
        content = reply = m["content"]
        if qwen3:
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning, content = split_thinking(content)
            reply = content
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reply = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        calls = [f'<tool_call>\n{{"name": "{f["name"]}", "arguments": {to_json(f["arguments"])}}}\n</tool_call>'
                 for f in (c["function"] for c in m.get("tool_calls") or [])]
        if calls:
            reply += ("\n" if content else "") + "\n".join(calls)
        add("<|im_start|>assistant\n")
        add(reply + "<|im_end|>", trained=True)
        add("\n")
    if add_generation_prompt:
        add("<|im_start|>assistant\n" + ("" if enable_thinking or not qwen3 else "<think>\n\n</think>\n\n"))


def render_llama3(add, bos, system, messages, tools, system_date, add_generation_prompt):
    """Llama 3.x. 3.1 and later (system_date set) always open with a system header stating the
    knowledge cutoff and a date, and have tools: "Environment: ipython" in that header, the
    schemas (JSON, indent 4) in the first user turn, one call per assistant turn written
    {"name": ..., "parameters": ...} (its text left out, as the template does), each tool result
    as an ipython turn holding the result as a JSON string."""
    add(bos)
    if system is not None:
        system = system.strip()
    if tools and system_date is None:
        raise ValueError("Llama 3.0's chat template has no place for tools (3.1 and later have one)")
    if system_date is not None:
        env = "Environment: ipython\n" if tools else ""
        system = f"{env}Cutting Knowledge Date: December 2023\nToday Date: {system_date}\n\n{system or ''}"
    if system is not None:
        add(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
    if tools:
        if not messages or messages[0]["role"] != "user":
            raise ValueError("Llama 3's chat template puts the tools in the first user turn, "
                             "and this chat starts without one")
        schemas = "".join(to_json(t, indent=4) + "\n\n" for t in tools)
        first = messages[0]["content"].strip()
        add(f"<|start_header_id|>user<|end_header_id|>\n\n{LLAMA3_TOOLS}{schemas}{first}<|eot_id|>")
        messages = messages[1:]
    for m in messages:
        if m["role"] == "tool":
            add(f"<|start_header_id|>ipython<|end_header_id|>\n\n{to_json(m['content'])}<|eot_id|>")
        elif calls := m.get("tool_calls"):
            if len(calls) != 1:
                raise ValueError(f"Llama 3's chat template takes one tool call per assistant turn, not {len(calls)}")
            f = calls[0]["function"]
            add("<|start_header_id|>assistant<|end_header_id|>\n\n")
            add(f'{{"name": "{f["name"]}", "parameters": {to_json(f["arguments"])}}}<|eot_id|>', trained=True)
        else:
            add(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
            add(m["content"].strip() + "<|eot_id|>", trained=m["role"] == "assistant")
    if add_generation_prompt:
        add("<|start_header_id|>assistant<|end_header_id|>\n\n")


def render_mistral_nemo(add, bos, eos, system, messages, tools):
    """Mistral Nemo's template. Its quirks, kept: the system prompt goes into a user turn only when
    that turn ends the chat (a prompt; a training chat loses it), the tools go before the last user
    turn, each call and result carries a 9-character id, and there is no generation prompt (the
    reply follows [/INST] or [/TOOL_RESULTS])."""
    plain = [m["role"] for m in messages if m["role"] != "tool" and not m.get("tool_calls")]
    if any((role == "user") != (i % 2 == 0) for i, role in enumerate(plain)):
        raise ValueError("Mistral Nemo's chat template wants user and assistant turns in turn, "
                         "after an optional system turn")
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    add(bos)
    for i, m in enumerate(messages):
        ids = [c.get("id") for c in m.get("tool_calls") or []]
        ids += [m.get("tool_call_id")] if m["role"] == "tool" else []
        if not all(isinstance(id, str) and len(id) == 9 for id in ids):
            raise ValueError("Mistral Nemo's chat template wants a 9-character id on each tool call (id) "
                             "and result (tool_call_id)")
        if m["role"] == "user":
            if tools and m == last_user:
                schemas = ", ".join('{"type": "function", "function": {' + ", ".join(
                    f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {to_json(v)}'
                    for k, v in t["function"].items() if k != "return") + "}}" for t in tools)
                add(f"[AVAILABLE_TOOLS][{schemas}][/AVAILABLE_TOOLS]")
            prefix = system + "\n\n" if i == len(messages) - 1 and system is not None else ""
            add(f"[INST]{prefix}{m['content']}[/INST]")
        elif m.get("tool_calls"):
            calls = ", ".join(to_json(c["function"])[:-1] + f', "id": "{c["id"]}"}}' for c in m["tool_calls"])
            add(f"[TOOL_CALLS][{calls}]{eos}", trained=True)
        elif m["role"] == "assistant":
            add(m["content"] + eos, trained=True)
        else:
            add(f'[TOOL_RESULTS]{{"content": {m["content"]}, "call_id": "{m["tool_call_id"]}"}}[/TOOL_RESULTS]')


def parse_tool_calls(text):
    """The tool calls in a generated reply, in whichever template's form: <tool_call> blocks
    (ChatML, Qwen3), one JSON object with "parameters" (Llama 3), a [TOOL_CALLS] list (Mistral
    Nemo). [{"name": str, "arguments": the JSON value given}], or {"invalid": text} for a call
    that is not a JSON object with a name; [] for a reply that calls nothing."""
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)
    if not blocks:
        text = text.strip().removeprefix("[TOOL_CALLS]")
        blocks = [text] if text.startswith(("{", "[{")) else []
    calls = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            calls.append({"invalid": block.strip()})
            continue
        for c in value if isinstance(value, list) else [value]:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                calls.append({"name": c["name"], "arguments": c.get("arguments", c.get("parameters"))})
            else:
                calls.append({"invalid": json.dumps(c, ensure_ascii=False)})
    return calls
