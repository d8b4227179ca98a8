"""Writes qwen3_chat.json: conversations rendered by transformers' apply_chat_template with
Qwen3's published chat template (qwen3_chat_template.jinja, from Qwen3's tokenizer_config.json).
tests/test_tokenizer.py compares tokenizer.py's hand-written Qwen3 template with these texts.

    python tests/data/make_qwen3_chat.py    # needs transformers (the tokenizer itself plays no part)
"""
import json
from pathlib import Path

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
THINK = "<think>\nThe user greets me. I greet back.\n</think>\n\n"
CASES = [  # (messages, add_generation_prompt, enable_thinking)
    ([{"role": "user", "content": "Hi"}], True, True),
    ([{"role": "user", "content": "Hi"}], True, False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True, False),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False, True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": THINK + "Hello!"}], False, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello!"}], False, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": THINK + "Hello!"},
      {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": THINK + "Well."}], False, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": THINK + "Hello!"},
      {"role": "user", "content": "How are you?"}], True, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Well."}], False, False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "\n\nHello!"}, {"role": "user", "content": "Again"}], True, False),
]

if __name__ == "__main__":
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    template = (HERE / "qwen3_chat_template.jinja").read_text()
    out = [dict(messages=m, add_generation_prompt=g, enable_thinking=t,
                text=tok.apply_chat_template(m, chat_template=template, tokenize=False, add_generation_prompt=g,
                                             enable_thinking=t))
           for m, g, t in CASES]
    (HERE / "qwen3_chat.json").write_text(json.dumps(out, indent=1) + "\n")
