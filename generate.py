"""Text generation and chat with a KV cache, with or without LoRA adapters.

    python generate.py --prompt "What is the capital of France?"          # chat, greedy
    python generate.py --no_chat --prompt "The capital of France is"      # raw completion
    python generate.py --adapter_path out/lora                            # with a trained adapter
    python generate.py --adapter_path a=out/a --adapter_path b=out/b      # several, the first active
    python generate.py                                                    # interactive chat on stdin
    python generate.py --tools data/brannock_tools.json --adapter_path out/tools   # calls tools
    python generate.py --model_path Qwen/Qwen3-0.6B --no_think            # Qwen3 without reasoning

With --prompt only the generated text goes to stdout (streamed as it arrives); timings and
notes go to stderr. With --tools, a reply that calls tools puts only the calls on stdout, one
JSON object per line, {"name": ..., "arguments": {...}}, for a script to act on; in the chat
they follow the reply, and /tool RESULT gives the model each call's result. In the chat, /help
lists the commands: switch adapter, the base model, the same prompt answered by each, thinking
on and off (Qwen3). Ctrl-C ends the reply in progress; at the prompt, or a second time, it
leaves (an interrupted --prompt exits with 130, as the shell does).
"""
import argparse
import io
import json
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from itertools import takewhile
from pathlib import Path

import torch

from adapters import disable_adapters, set_adapter
from common import InputError, default_device, default_dtype, exit_on_input_error
from data import check_tools
from hub import DEFAULT_MODEL, resolve_checkpoint, same_checkpoint
from model import Transformer
from peft_format import check_adapter_folder, load_adapter
from tokenizer import TEMPLATES, Tokenizer, parse_tool_calls


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token id from logits (vocab,): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
             eos_ids=(), seed=None, stats=None):
    """Yield new token ids one at a time. The prompt is run once (prefill) into the KV cache;
    each further step feeds one token. stats, a dict if given, receives the timings."""
    device = model.model.embed_tokens.weight.device
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within the model's "
                         f"{model.config.max_position_embeddings} positions")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    model.setup_cache(1, max_len)
    try:
        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=device)
        logits = model.lm_head(model.hidden(ids)[:, -1])[0]  # only the last position's logits
        token = sample(logits, temperature, top_k, top_p, generator)
        t1 = time.perf_counter()
        n = 1
        yield token
        for pos in range(len(prompt_ids), max_len - 1):
            if token in eos_ids:
                break
            logits = model(torch.tensor([[token]], device=device), start=pos)[0, -1]
            token = sample(logits, temperature, top_k, top_p, generator)
            n += 1
            yield token
        if stats is not None:
            t2 = time.perf_counter()
            # the first new token comes from the prefill; decode_s covers the other n - 1
            stats.update(prompt_tokens=len(prompt_ids), prefill_s=t1 - t0, new_tokens=n, decode_s=t2 - t1)
    finally:
        model.setup_cache(None, None)


def stream_text(tokenizer, tokens, eos_ids, out=sys.stdout):
    """Print the decoded text as tokens arrive; return the whole text (without the eos token)."""
    ids, printed = [], ""
    for t in tokens:
        if t in eos_ids:  # generate() stops after it
            continue
        ids.append(t)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    text = tokenizer.decode(ids)
    out.write(text[len(printed):] + "\n")
    out.flush()
    return text


def load(model_path, adapters=(), load_in_4bit=False, device=None, dtype=None, chat_template=None):
    """Model and tokenizer, with named adapters loaded ({name: path}); the first is active.
    Every path is checked before the model loads, which takes a while (or a download)."""
    adapters = dict(adapters)
    for adapter_path in adapters.values():
        check_adapter_folder(adapter_path)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_checkpoint(model_path)
    tokenizer = Tokenizer(path, template=chat_template)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, quantize="nf4" if load_in_4bit else None)
    for name, adapter_path in adapters.items():
        base = load_adapter(model, adapter_path, adapter_name=name).get("base_model_name_or_path")
        # same shapes load, so only the name tells another base (or the same one at another path)
        if base and not same_checkpoint(base, model_path):
            print(f"generate.py: warning: adapter {name} ({adapter_path}) was trained on {base}, not on "
                  f"{model_path} (fine if it is the same model at another path)", file=sys.stderr)
    if adapters:
        set_adapter(model, next(iter(adapters)))
    return model.eval(), tokenizer


def parse_adapters(specs):
    """["out/a", "b=out/b"] -> {"default": "out/a", "b": "out/b"}."""
    adapters = {}
    for spec in specs or []:
        name, _, path = spec.rpartition("=") if "=" in spec else ("default", "", spec)
        if name in adapters:
            raise InputError(f"--adapter_path: adapter name {name!r} given twice")
        if name in ("", "base"):
            raise InputError(f"--adapter_path {spec}: name the adapter (NAME=DIR; 'base' means the base model)")
        adapters[name] = path
    return adapters


@contextmanager
def ctrl_c_stops_reply():
    """Inside, a first Ctrl-C only sets a flag (the yielded list becomes true): the reply stops
    at its next token, with the KV cache freed and the model as it was. A second Ctrl-C raises
    KeyboardInterrupt as usual, for a reply stuck in a long prefill."""
    stopped = []

    def on_ctrl_c(signum, frame):
        if stopped:
            raise KeyboardInterrupt
        stopped.append(signum)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


COMMANDS = """\
/adapters          the adapters loaded; which one answers
/adapter NAME      answer with adapter NAME
/base              answer with the base model (adapters off)
/compare PROMPT    PROMPT answered by each adapter, then by the base, after the same conversation
                   (same seed; the answers are not kept in the conversation)
/tool RESULT       the result of the oldest tool call not yet answered (--tools); once every call
                   of the reply has its result, the model answers
/think, /no_think  Qwen3: replies with reasoning (the default), or without
/reset             forget the conversation
/help              this list
An empty line, Ctrl-D, or Ctrl-C at the prompt leaves; Ctrl-C during a reply ends the reply."""


def read_tools(path):
    """The JSON schemas of a --tools file: [{"type": "function", "function": {...}}, ...]."""
    try:
        tools = json.loads(Path(path).read_text())
    except OSError as e:
        raise InputError(f"--tools {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--tools {path}: not valid JSON ({e})") from None
    return check_tools(tools, f"--tools {path}") or []


class Chat:
    """A conversation: the turns so far and which adapter answers (None: the base model).
    With tools, a reply's tool calls are printed as JSON lines, {"name": ..., "arguments": {...}}:
    alone on stdout when `calls_only` (--prompt), else after the streamed reply."""

    def __init__(self, model, tokenizer, adapters, sampling, chat=True, system=None, out=sys.stdout,
                 tools=None, enable_thinking=True, calls_only=False):
        self.model, self.tokenizer, self.adapters, self.sampling = model, tokenizer, dict(adapters), sampling
        self.chat, self.out, self.tools = chat, out, tools
        self.enable_thinking, self.calls_only = enable_thinking, calls_only
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)
        self.active = next(iter(self.adapters), None)  # load() made the first adapter active

    def describe(self):
        names = ", ".join(f"{n} = {p}" + (" (active)" if n == self.active else "") for n, p in self.adapters.items())
        return f"adapters: {names}" + ("" if self.active else "; the base model answers (adapters off)")

    def use(self, name):
        """Answer with adapter `name`, or with the base model when name is None."""
        if name is not None:
            set_adapter(self.model, name)  # an unknown name: LoRAError lists the adapters
        self.active = name

    def open_calls(self):
        """The ids of the last reply's tool calls that have no result yet, oldest first."""
        answered = []
        for m in reversed(self.messages):
            if m["role"] != "tool":
                return [c["id"] for c in m.get("tool_calls", [])][len(answered):]
            answered.append(m)
        return []

    def reply(self, prompt, remember=True):
        """Stream the answer to `prompt` to self.out; False when Ctrl-C cut it short."""
        return self.answer(self.messages + [{"role": "user", "content": prompt}], prompt, remember)

    def tool_result(self, result):
        """/tool RESULT: the result of the oldest open call; the answer comes once none is open."""
        if not (ids := self.open_calls()):
            raise InputError("/tool: no tool call waits for a result")
        self.messages = self.messages + [{"role": "tool", "content": result, "tool_call_id": ids[0]}]
        if len(ids) > 1:
            print(f"[{len(ids) - 1} more tool call(s) to answer with /tool]", file=sys.stderr)
            return True
        return self.answer(self.messages, None)

    def answer(self, messages, prompt, remember=True):
        if self.chat:
            try:
                text = self.tokenizer.render(messages, add_generation_prompt=True,
                                             enable_thinking=self.enable_thinking, tools=self.tools)[0]
            except ValueError as e:  # tools for a template that has no place for them
                raise InputError(str(e)) from None
            ids = self.tokenizer.encode(text, bos=False)
        else:
            ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.model.config.max_position_embeddings:
            raise InputError(f"{len(ids)} prompt tokens leave no room within the model's "
                             f"{self.model.config.max_position_embeddings} positions"
                             + (" (/reset forgets the conversation)" if len(self.messages) > len(self.start) else ""))
        stats, eos = {}, self.tokenizer.eos_ids
        out = io.StringIO() if self.calls_only else self.out
        base_only = disable_adapters(self.model) if self.adapters and self.active is None else nullcontext()
        with base_only, ctrl_c_stops_reply() as stopped:
            tokens = generate(self.model, ids, eos_ids=eos, stats=stats, **self.sampling)
            try:
                # Ctrl-C sets `stopped` while a token is computed; the text so far ends the reply
                text = stream_text(self.tokenizer, takewhile(lambda _: not stopped, tokens), eos, out)
            finally:
                tokens.close()  # frees the KV cache now, also when a second Ctrl-C raises
        reply = {"role": "assistant", "content": text}
        if self.tools and self.chat:
            calls = []
            for c in parse_tool_calls(text):
                if "invalid" in c or not isinstance(c["arguments"], dict):
                    print(f"generate.py: not a tool call (a name and a JSON object of arguments): "
                          f"{c.get('invalid') or json.dumps(c, ensure_ascii=False)}", file=sys.stderr)
                else:
                    calls.append(c)
            if calls:  # the history keeps them as calls, with the ids Mistral Nemo's template wants
                content = text.split("<tool_call>")[0].strip() if "<tool_call>" in text else ""
                reply = {"role": "assistant", "content": content, "tool_calls": [
                    {"type": "function", "id": f"call{len(messages) + i:05d}",
                     "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in enumerate(calls)]}
            lines = [json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) for c in calls]
            if self.calls_only:
                print("\n".join(lines) if lines else text, file=self.out)
            elif lines:
                print("\n".join(lines) + "\n[answer with /tool RESULT]", file=self.out)
        if remember and self.chat:
            self.messages = messages + [reply]
        if stopped:
            print("[stopped]", file=sys.stderr)
            return False
        decode_tok_s = (stats['new_tokens'] - 1) / max(stats['decode_s'], 1e-9)
        print(f"[prompt {stats['prompt_tokens']} tok at {stats['prompt_tokens'] / stats['prefill_s']:.1f} tok/s, "
              f"{stats['new_tokens']} new, decoding at {decode_tok_s:.1f} tok/s]", file=sys.stderr)
        return True

    def compare(self, prompt):
        """`prompt` answered by each adapter, then by the base; the active adapter stays."""
        active = self.active
        try:
            for name in [*self.adapters, None]:
                self.use(name)
                print(f"[{name or 'base'}]", file=self.out)
                if not self.reply(prompt, remember=False):
                    break  # Ctrl-C ends the whole comparison
        finally:
            self.use(active)

    def command(self, line):
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd == "/help":
            print(COMMANDS, file=self.out)
        elif cmd == "/reset":
            self.messages = list(self.start)
        elif cmd in ("/adapters", "/adapter", "/base", "/compare") and not self.adapters:
            raise InputError("no adapters loaded (--adapter_path [NAME=]DIR, repeated for several)")
        elif cmd == "/adapters" or (cmd == "/adapter" and not arg):
            print(self.describe(), file=self.out)
        elif cmd in ("/adapter", "/base"):
            self.use(arg if cmd == "/adapter" else None)
            print(self.describe(), file=self.out)
        elif cmd == "/compare":
            if not arg:
                raise InputError("/compare PROMPT: the prompt is missing")
            self.compare(arg)
        elif cmd == "/tool":
            if not arg:
                raise InputError("/tool RESULT: the result is missing")
            self.tool_result(arg)
        elif cmd in ("/think", "/no_think"):
            if self.tokenizer.template != "qwen3":
                raise InputError(f"{cmd}: only Qwen3's template turns thinking on and off")
            self.enable_thinking = cmd == "/think"
            print(f"[replies {'with' if self.enable_thinking else 'without'} reasoning]", file=sys.stderr)
        else:
            raise InputError(f"unknown command {cmd} (/help lists them)")

    def run(self, read=input):
        """Prompts and /commands until an empty line, end of input, or Ctrl-C outside a reply."""
        print("chat with the model; /help lists the commands; an empty line, Ctrl-D or Ctrl-C leaves", file=sys.stderr)
        while True:
            try:
                line = read(f"{self.active or 'base'}> " if self.adapters else "> ").strip()
                if not line:
                    return
                if line.startswith("/"):
                    self.command(line)
                else:
                    self.reply(line)
            except (EOFError, KeyboardInterrupt):
                print(file=self.out)  # the shell's prompt then starts on a line of its own
                return
            except InputError as e:  # a bad command or adapter name: say so, the chat goes on
                print(f"error: {e}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=DEFAULT_MODEL, help="checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--adapter_path", action="append", metavar="[NAME=]DIR",
                   help="LoRA adapter folder (PEFT format); repeat for several: the first answers, /adapter switches")
    p.add_argument("--no_chat", action="store_true", help="raw completion: no chat template")
    p.add_argument("--chat_template", choices=TEMPLATES, help="override the template detected from the checkpoint")
    p.add_argument("--system", help="system prompt (default: the checkpoint template's own, if any)")
    p.add_argument("--tools", metavar="TOOLS.json", help='JSON list of tool schemas [{"type": "function", "function": '
                   '{...}}]; a tool call is printed as {"name": ..., "arguments": ...}, one per line')
    p.add_argument("--no_think", action="store_true", help="Qwen3: reply without reasoning (enable_thinking=False)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load_in_4bit", action="store_true", help="NF4-quantize the base's linear layers")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    try:
        with exit_on_input_error("generate.py"):
            adapters = parse_adapters(args.adapter_path)
            tools = read_tools(args.tools) if args.tools else None
            model, tokenizer = load(args.model_path, adapters, args.load_in_4bit, args.device,
                                    chat_template=args.chat_template)
            chat = not args.no_chat and tokenizer.template is not None
            if not args.no_chat and not chat:
                print("generate.py: this checkpoint has no chat template; raw completion (--no_chat)", file=sys.stderr)
            sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
            if args.no_think and tokenizer.template != "qwen3":
                print("generate.py: --no_think: only Qwen3's template turns thinking off; ignored", file=sys.stderr)
            calls_only = bool(tools and chat and args.prompt is not None)  # a script reads the calls alone
            session = Chat(model, tokenizer, adapters, sampling, chat, args.system, tools=tools,
                           enable_thinking=not args.no_think, calls_only=calls_only)
            if adapters:
                print(session.describe(), file=sys.stderr)
            if args.prompt is None:
                session.run()
            elif not session.reply(args.prompt):
                sys.exit(130)  # cut short by Ctrl-C: the output is not the whole answer
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second one during a reply
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
