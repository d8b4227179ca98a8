"""The checkpoint's tokenizer and chat template, with no transformers and no jinja2.

Hugging Face checkpoints describe the chat format as a jinja template in tokenizer_config.json.
The families we support use one of five formats, recognized by their markers (as llama.cpp
does) and written here by hand:

    chatml   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n        SmolLM2, Qwen2/2.5
    qwen3    chatml, and the reply opens with <think>\\n...\\n</think>\\n\\n      Qwen3
    llama3   <|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>       Llama 3.x
    llama2   <s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nHi [/INST]                 Llama 2, TinyLlama-chat
    mistral  <s>[INST] Hi [/INST]                                         Mistral Instruct
"""
import json
import re
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from model import CheckpointError

TEMPLATES = ("chatml", "qwen3", "llama3", "llama2", "mistral")


def _read_json(path):
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _content(token):  # tokenizer_config writes special tokens as "<s>" or {"content": "<s>", ...}
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, path, template=None):
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        self.bos_id = self.token_id(_content(cfg.get("bos_token")))
        # BOS for raw text: as tokenizer_config says, else as tokenizer.json's post-processor does.
        # We always encode with add_special_tokens=False and add BOS ourselves, so a chat prompt
        # whose template already writes BOS never gets a second one.
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        inferred_bos = with_special[0] if len(with_special) > len(self.tok.encode("a", add_special_tokens=False).ids) else None
        if self.bos_id is None:
            self.bos_id = inferred_bos
        self.add_bos = cfg.get("add_bos_token", inferred_bos is not None) and self.bos_id is not None
        eos = gen.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        if (e := self.token_id(_content(cfg.get("eos_token")))) is not None:
            self.eos_ids.add(e)
        pad = self.token_id(_content(cfg.get("pad_token")))
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        chat_template = cfg.get("chat_template") or ""
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
        end_of_turn = {"chatml": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.template)
        if end_of_turn and (e := self.token_id(end_of_turn)) is not None:
            self.eos_ids.add(e)  # a chat reply ends at its end-of-turn token

    def token_id(self, text):
        return None if text is None else self.tok.token_to_id(text)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text, bos=None):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def encode_with_offsets(self, text):
        """Token ids and each token's (start, end) character span; specials in text are parsed."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def render(self, messages, add_generation_prompt=False, enable_thinking=True):
        """The chat as the checkpoint's template writes it, and the (start, end) character spans of
        the assistant replies, each including its end-of-turn token (what training learns).
        enable_thinking=False: Qwen3's generation prompt for a reply without reasoning."""
        if self.template is None:
            raise CheckpointError("this checkpoint has no chat template; pass --chat_template "
                                  f"({', '.join(TEMPLATES)}) or use raw text")
        return render_chat(messages, self.template, self.bos_text, self.eos_text,
                           self.default_system, self.system_date, add_generation_prompt, enable_thinking)

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
    if "[INST]" in chat_template:
        return "mistral"
    return None


def default_system_prompt(chat_template, template):
    """The system prompt a template writes when the chat has none (SmolLM2 and Qwen2.5 have one)."""
    if template == "chatml":
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.+?)<\|im_end\|>", chat_template)
        if m and "{" not in m.group(1) and "+" not in m.group(1):
            return m.group(1)
    return None


def render_chat(messages, template, bos="", eos="", default_system=None, system_date=None,
                add_generation_prompt=False, enable_thinking=True):
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> (text, spans)."""
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
    if template == "chatml":
        if system is not None or default_system is not None:
            add(f"<|im_start|>system\n{system if system is not None else default_system}<|im_end|>\n")
        for m in messages:
            add(f"<|im_start|>{m['role']}\n")
            if m["role"] == "assistant":
                add(m["content"] + "<|im_end|>", trained=True)
                add("\n")
            else:
                add(m["content"] + "<|im_end|>\n")
        if add_generation_prompt:
            add("<|im_start|>assistant\n")
    elif template == "qwen3":
        render_qwen3(add, system, messages, add_generation_prompt, enable_thinking)
    elif template == "llama3":
        add(bos)
        if system is not None:
            system = system.strip()
        if system_date is not None:
            system = f"Cutting Knowledge Date: December 2023\nToday Date: {system_date}\n\n{system or ''}"
        if system is not None:
            add(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
        for m in messages:
            add(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
            add(m["content"].strip() + "<|eot_id|>", trained=m["role"] == "assistant")
        if add_generation_prompt:
            add("<|start_header_id|>assistant<|end_header_id|>\n\n")
    elif template == "llama2":
        for i, m in enumerate(messages):
            if m["role"] == "user":  # the system prompt rides in the first user turn
                sys_prefix = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system is not None else ""
                add(f"{bos}[INST] {(sys_prefix + m['content']).strip()} [/INST]")
            else:
                add(f" {m['content'].strip()} {eos}", trained=True)
    elif template == "mistral":
        add(bos)
        for i, m in enumerate(messages):
            if m["role"] == "user":
                sys_prefix = f"{system}\n\n" if i == 0 and system is not None else ""
                add(f"[INST] {sys_prefix}{m['content']} [/INST]")
            else:
                add(m["content"] + eos, trained=True)
    return "".join(parts), spans


def split_thinking(content):
    """("reasoning", "reply") of an assistant message written as "<think>reasoning</think>reply";
    ("", content) when it has no </think>."""
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")
    return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")


def render_qwen3(add, system, messages, add_generation_prompt, enable_thinking):
    """Qwen3's template: ChatML turns, no default system prompt, and these <think> rules:
    - replies after the last user turn keep their reasoning, as <think>\\n...\\n</think>\\n\\n;
      the last reply gets the block even when empty (data without reasoning trains on an empty
      block, which is how Qwen3 answers without thinking);
    - replies before it (the history) are written without their reasoning;
    - the generation prompt is "<|im_start|>assistant\\n", followed by an empty block when
      enable_thinking is False (the reply then comes without reasoning).
    The trained span of a reply is everything after "<|im_start|>assistant\\n", think block included."""
    if system is not None:
        add(f"<|im_start|>system\n{system}<|im_end|>\n")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            add(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            continue
        reasoning, reply = split_thinking(m["content"])
        add("<|im_start|>assistant\n")
        if i > last_user and (i == len(messages) - 1 or reasoning):
            reply = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + reply.lstrip("\n")
        add(reply + "<|im_end|>", trained=True)
        add("\n")
    if add_generation_prompt:
        add("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
