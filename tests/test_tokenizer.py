"""tokenizer.py: the hand-written chat templates against renderings of the published ones.

tests/data/renderings.json holds chats (plain, system, tools, tool calls and results, reasoning,
multi-turn) rendered by transformers' jinja renderer with each family's published template
(tests/data/templates/, from llama.cpp's models/templates/); tests/data/make_renderings.py makes
it. Compared: the text, character for character, and the trained spans (each assistant turn
after its header, ending with the end-of-turn token); a chat the template refuses, ours refuses.
"""
import json
from pathlib import Path

import pytest

from helpers import write_tiny_tokenizer
from tokenizer import Tokenizer, default_system_prompt, render_chat

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "renderings.json").read_text())
CHATS, RENDERINGS = REFERENCE["chats"], REFERENCE["renderings"]
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SENTENCEPIECE_CHATS = ("llama2", "mistral", "mistral_v1", "mistral_v3")  # a reply follows [/INST], ends with </s>
HEADERS = {"chatml": ("<|im_start|>assistant\n",), "qwen3": ("<|im_start|>assistant\n",),
           "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n",),
           "mistral_nemo": ("[/INST]", "[/TOOL_RESULTS]"), **dict.fromkeys(SENTENCEPIECE_CHATS, ("[/INST]",))}
END_OF_TURN = {"chatml": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral_nemo": "</s>",
               **dict.fromkeys(SENTENCEPIECE_CHATS, "</s>")}


def tokenizer_for(path, template_file, bos, eos):
    """A tiny tokenizer whose tokenizer_config.json carries the published template."""
    write_tiny_tokenizer(path, specials=("<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": (DATA / "templates" / template_file).read_text(), "bos_token": bos or None, "eos_token": eos}))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    files = {(r["template"], r["bos"], r["eos"]) for r in RENDERINGS}
    return {f: tokenizer_for(tmp_path_factory.mktemp("tok"), *f) for f in sorted(files)}


@pytest.mark.parametrize("case", RENDERINGS, ids=[f"{r['template'][:-6]}-chat{r['chat']}"
                                                  + ("-no_think" if not r["enable_thinking"] else "")
                                                  for r in RENDERINGS])
def test_renders_as_the_published_template(tokenizers, case):
    tok = tokenizers[(case["template"], case["bos"], case["eos"])]
    assert tok.template == case["name"]  # detected from the template's markers
    assert tok.token_id(END_OF_TURN[case["name"]]) in tok.eos_ids  # generation stops at the end of a turn
    if "3.2" in case["template"]:
        tok.system_date = case["date"]  # the published one writes today's date; the rendering fixed it
    chat = CHATS[case["chat"]]
    render = lambda: tok.render(chat["messages"], case["add_generation_prompt"], case["enable_thinking"], chat["tools"])
    if "error" in case:
        with pytest.raises(ValueError):
            render()
        return
    text, spans = render()
    assert text == case["text"]
    turns = [m for m in chat["messages"] if m["role"] == "assistant"]
    assert len(spans) == len(turns)
    header, end = HEADERS[case["name"]], END_OF_TURN[case["name"]]
    for (start, stop), m in zip(spans, turns):
        assert text[:start].endswith(header) and text[start:stop].endswith(end)
        for call in m.get("tool_calls") or []:
            assert f'"name": "{call["function"]["name"]}"' in text[start:stop]


def test_default_system_prompts():
    # the literal a template writes when the chat has no system message; none in Qwen3's
    read = lambda f: (DATA / "templates" / f).read_text()
    assert default_system_prompt(read("Qwen-Qwen2.5-7B-Instruct.jinja"), "chatml") == QWEN25_DEFAULT
    assert default_system_prompt(read("HuggingFaceTB-SmolLM2-135M-Instruct.jinja"), "chatml") == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system_prompt(read("Qwen-Qwen3-0.6B.jinja"), "chatml") is None


def test_chatml_without_a_tool_section_uses_qwen25s():
    # SmolLM2's template has no tools: ours writes Qwen2.5's tool form with SmolLM2's default system prompt
    smol = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for case in RENDERINGS:
        chat = CHATS[case["chat"]]
        if case["template"] == "Qwen-Qwen2.5-7B-Instruct.jinja" and chat["tools"] and "text" in case:
            text, _ = render_chat(chat["messages"], "chatml", default_system=smol, tools=chat["tools"],
                                  add_generation_prompt=case["add_generation_prompt"])
            assert text == case["text"].replace(QWEN25_DEFAULT, smol)


def test_qwen3_think_rules():
    # what the renderings show, as rules: history replies lose their reasoning, the last keeps it,
    # a reply without reasoning gets an empty block; enable_thinking=False closes the block in the prompt
    think = {"role": "assistant", "content": "<think>\nWhy.\n</think>\n\nBecause."}
    chat = [{"role": "user", "content": "a"}, think, {"role": "user", "content": "b"}, think]
    text, _ = render_chat(chat, "qwen3")
    assert text.count("<think>\nWhy.\n</think>") == 1
    assert text.endswith("<think>\nWhy.\n</think>\n\nBecause.<|im_end|>\n")
    # reasoning_content is the think block written in the content
    assert (render_chat(chat[:1] + [{"role": "assistant", "reasoning_content": "Why.", "content": "Because."}],
                        "qwen3")[0] == render_chat(chat[:2], "qwen3")[0])
    text, _ = render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "Because."}], "qwen3")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nBecause.<|im_end|>\n")
    prompt, _ = render_chat(chat[:3], "qwen3", add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "Why." not in prompt


@pytest.mark.parametrize("template", ["llama2", "mistral"])
def test_templates_without_tools_refuse_them(template):
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    with pytest.raises(ValueError, match="has no place for tools"):
        render_chat([{"role": "user", "content": "a"}, call], template)
