"""tokenizer.py: Qwen3's chat template, written by hand, against the published template's renderings."""
import json
from pathlib import Path

import pytest

from conftest import write_tiny_tokenizer
from tokenizer import Tokenizer, render_chat, split_thinking

DATA = Path(__file__).parent / "data"
# Made by tests/data/make_qwen3_chat.py with transformers' apply_chat_template and Qwen3's
# published template (tests/data/qwen3_chat_template.jinja); stored, so nothing is needed here.
CASES = json.loads((DATA / "qwen3_chat.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_qwen3_renders_as_the_published_template(case):
    # the text is identical, character for character; each trained span is one whole assistant
    # turn after "<|im_start|>assistant\n" (its think block included), ending with <|im_end|>
    text, spans = render_chat(case["messages"], "qwen3", add_generation_prompt=case["add_generation_prompt"],
                              enable_thinking=case["enable_thinking"])
    assert text == case["text"]
    replies = [m for m in case["messages"] if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for (start, end), m in zip(spans, replies):
        assert text[start - len("<|im_start|>assistant\n"):start] == "<|im_start|>assistant\n"
        assert text[start:end].endswith("<|im_end|>") and split_thinking(m["content"])[1].strip() in text[start:end]


def test_qwen3_think_rules():
    # what the fixtures show, as rules: history replies lose their reasoning, the last keeps it,
    # a reply without reasoning gets an empty block; enable_thinking=False closes the block in the prompt
    think = {"role": "assistant", "content": "<think>\nWhy.\n</think>\n\nBecause."}
    chat = [{"role": "user", "content": "a"}, think, {"role": "user", "content": "b"}, think]
    text, _ = render_chat(chat, "qwen3")
    assert text.count("<think>\nWhy.\n</think>") == 1
    assert text.endswith("<think>\nWhy.\n</think>\n\nBecause.<|im_end|>\n")
    text, _ = render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "Because."}], "qwen3")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nBecause.<|im_end|>\n")
    prompt, _ = render_chat(chat[:3], "qwen3", add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "Why." not in prompt


def test_qwen3_template_is_detected(tmp_path):
    # a checkpoint whose tokenizer_config.json carries Qwen3's template reads as "qwen3": no default
    # system prompt (Qwen2.5's ChatML has one), and <|im_end|> ends a reply
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": (DATA / "qwen3_chat_template.jinja").read_text(), "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    tok = Tokenizer(tmp_path)
    assert tok.template == "qwen3" and tok.default_system is None
    assert tok.token_id("<|im_end|>") in tok.eos_ids
    text, _ = tok.render([{"role": "user", "content": "w1"}], add_generation_prompt=True, enable_thinking=False)
    assert text == CASES[1]["text"].replace("Hi", "w1")
