"""data.py: reply-only labels in every format, packing, collate, the order of a run, bad input."""
import json
from pathlib import Path

import pytest
import torch

import data
from helpers import tiny_config, write_chatml_tokenizer, write_checkpoint, write_tiny_tokenizer
from model import Config, Transformer
from tokenizer import TEMPLATES, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FILES = Path(__file__).resolve().parent / "data"
END = "<|im_end|>"  # SmolLM2's end of turn, eos and pad (id 2)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """SmolLM2's tokenizer pipeline and config with a small vocabulary (helpers.py), made here."""
    return write_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(tok_path)


def trained_pieces(tok, input_ids, labels):
    """The decoded runs of consecutive learned tokens, specials written out."""
    pieces, run = [], []
    for i, l in zip(input_ids + [None], labels + [data.IGNORE]):
        if l != data.IGNORE:
            assert l == i  # a learned label is the token itself
            run.append(i)
        elif run:
            pieces.append(tok.tok.decode(run, skip_special_tokens=False))
            run = []
    return pieces


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- labels ------------------------------------------------------------------------------------

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "Translate to French.\n\n### Input:\nthank you\n\n### Response:\n")


REPLIES = [
    ("messages.jsonl", [["Paris." + END], ["Red." + END, "Blue, or yellow." + END], ["Merci, et voilà ☺" + END]]),
    ("sharegpt.jsonl", [["Paris." + END], ["Red." + END, "Blue, or yellow." + END], ["Eight." + END]]),
    ("alpaca.jsonl", [["Paris." + END], ["merci" + END], ["2 + 3 = 5" + END]]),
    ("text.jsonl", [["The capital of France is Paris." + END],
                    ["Plain text records are learned in full, first token to last." + END],
                    ["Line one.\nLine two." + END]]),
]


@pytest.mark.parametrize("name, expected", REPLIES)
def test_only_replies_and_their_end_of_turn_are_learned(tok, name, expected):
    rows, stats = data.load_dataset(FILES / name, tok, max_seq_len=512)
    assert [trained_pieces(tok, r["input_ids"], r["labels"]) for r in rows] == expected
    assert stats["n_examples"] == stats["n_rows"] == 3 and stats["n_truncated"] == 0


def test_only_replies_are_learned_with_smollm2s_own_tokenizer(smollm2_tokenizer):
    """The same labels with the real tokenizer (49k tokens, other merges across the boundaries)."""
    real = Tokenizer(smollm2_tokenizer)
    for name, expected in REPLIES:
        rows, _ = data.load_dataset(FILES / name, real, max_seq_len=512)
        assert [trained_pieces(real, r["input_ids"], r["labels"]) for r in rows] == expected, name
    rows, stats = data.load_dataset(ROOT / "data" / "brannock_chat.jsonl", real, max_seq_len=512)
    assert stats["n_truncated"] == 0  # the bundled data fits the default --max_seq_len


def test_prompts_are_not_learned(tok):
    """User and system turns, and the template around them, are in the input and masked."""
    rows, _ = data.load_dataset(FILES / "messages.jsonl", tok, max_seq_len=512)
    ids, labels = rows[1]["input_ids"], rows[1]["labels"]
    masked = tok.tok.decode([i for i, l in zip(ids, labels) if l == data.IGNORE], skip_special_tokens=False)
    # the default system prompt
    assert masked.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    for text in ("<|im_start|>user\nName a primary colour.<|im_end|>", "<|im_start|>user\nAnother one?<|im_end|>",
                 "<|im_start|>assistant\n"):
        assert text in masked
    assert "Red" not in masked and "Blue" not in masked


def test_alpaca_prompts_are_stanfords(tok):
    rows, _ = data.load_dataset(FILES / "alpaca.jsonl", tok, max_seq_len=512)
    texts = [tok.tok.decode(r["input_ids"], skip_special_tokens=False) for r in rows]
    assert texts[0] == ALPACA_NO_INPUT + "Paris." + END  # "input": "" is the no-input prompt
    assert texts[1] == ALPACA_INPUT + "merci" + END
    assert texts[2].endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n2 + 3 = 5" + END)


@pytest.mark.parametrize("template", TEMPLATES)
def test_labels_follow_the_rendered_spans_in_every_template(tok_path, template):
    """Whatever the template writes around them, the learned tokens spell exactly the reply spans."""
    t = Tokenizer(tok_path, template=template)
    t.tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])  # as Llama 3's vocab has them
    record = json.loads((FILES / "messages.jsonl").read_text().splitlines()[1])
    text, spans = t.render(record["messages"])
    ids, labels = data.tokenize(record, t, "x:1")
    assert trained_pieces(t, ids, labels) == [text[s:e] for s, e in spans]


def test_train_on_inputs_learns_every_token(tok):
    rows, stats = data.load_dataset(FILES / "messages.jsonl", tok, max_seq_len=512, train_on_inputs=True)
    assert all(r["labels"] == r["input_ids"] for r in rows)
    assert stats["n_trained_tokens"] == stats["n_tokens"] - stats["n_examples"]  # first tokens have no target


def test_eos_is_learned_although_it_is_the_pad_id(tok):
    """The classic bug: masking labels where token == pad_id also masks every eos when pad == eos."""
    assert tok.pad_id in tok.eos_ids and tok.token_id(END) == tok.pad_id
    rows, _ = data.load_dataset(FILES / "messages.jsonl", tok, max_seq_len=512)
    short, long = rows[0], rows[1]
    b = data.collate([short, long], tok.pad_id)
    n = len(short["input_ids"])
    end = n - 2  # the row ends "Paris.<|im_end|>\n"
    assert short["input_ids"][end] == short["labels"][end] == tok.pad_id
    assert b["targets"][0, end - 1] == tok.pad_id  # "." learns to predict the end of turn
    assert (b["input_ids"][0, n:] == tok.pad_id).all() and (b["targets"][0, n - 1:] == data.IGNORE).all()


# --- length, packing, collate ------------------------------------------------------------------

def test_truncation_is_counted(tok):
    full, _ = data.load_dataset(FILES / "messages.jsonl", tok, max_seq_len=512)
    limit = sorted(len(r["input_ids"]) for r in full)[1]  # the two longer rows exceed it
    rows, stats = data.load_dataset(FILES / "messages.jsonl", tok, max_seq_len=limit)
    assert max(len(r["input_ids"]) for r in rows) == limit
    assert stats["n_truncated"] == sum(len(r["input_ids"]) > limit for r in full) >= 1
    assert stats["n_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert f"{stats['n_truncated']} truncated" in data.describe(stats)


@pytest.mark.parametrize("train_on_inputs", [False, True])  # True: first tokens are learned too
def test_packing_keeps_examples_apart(tok, train_on_inputs):
    path = ROOT / "data" / "brannock_chat.jsonl"
    plain, plain_stats = data.load_dataset(path, tok, max_seq_len=256, train_on_inputs=train_on_inputs)
    rows, stats = data.load_dataset(path, tok, max_seq_len=256, train_on_inputs=train_on_inputs, sample_packing=True)
    assert stats["n_rows"] == len(rows) < len(plain) and "packed into" in data.describe(stats)
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    # Every example present, whole and in order; positions restart at 0 with each example.
    examples = []
    for r in rows:
        for doc in range(r["doc_ids"][-1] + 1):
            idx = [t for t, d in enumerate(r["doc_ids"]) if d == doc]
            assert idx == list(range(idx[0], idx[-1] + 1))  # doc_ids are contiguous and count up
            assert [r["position_ids"][t] for t in idx] == list(range(len(idx)))
            examples.append({k: [r[k][t] for t in idx] for k in ("input_ids", "labels")})
    assert examples == [{k: p[k] for k in ("input_ids", "labels")} for p in plain]
    # Targets never cross from one example to the next, and count the same learned tokens.
    b = data.collate(rows, tok.pad_id)
    last_of_doc = torch.ones_like(b["doc_ids"], dtype=torch.bool)
    last_of_doc[:, :-1] = b["doc_ids"][:, 1:] != b["doc_ids"][:, :-1]
    assert (b["targets"][last_of_doc] == data.IGNORE).all()
    n_targets = (b["targets"] != data.IGNORE).sum().item()
    assert n_targets == stats["n_trained_tokens"] == plain_stats["n_trained_tokens"]
    assert (data.collate(plain, tok.pad_id)["targets"] != data.IGNORE).sum().item() == n_targets


def test_packed_examples_get_the_logits_they_get_alone():
    """With the model: position_ids and doc_ids make a packed row equal to its examples run apart."""
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)).eval()
    examples = [dict(input_ids=ids, labels=ids, position_ids=list(range(len(ids))), doc_ids=[0] * len(ids))
                for ids in (torch.randint(0, 64, (n,)).tolist() for n in (5, 3, 7))]
    b = data.collate(data.pack(examples, max_seq_len=16), pad_id=0)
    assert b["input_ids"].shape == (1, 15)
    with torch.no_grad():
        packed = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])[0]
        alone = torch.cat([model(torch.tensor([e["input_ids"]]))[0] for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_collate_pads_right_and_shifts_labels():
    rows = [dict(input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8], position_ids=[0, 1, 2, 3], doc_ids=[0] * 4),
            dict(input_ids=[9, 10], labels=[9, 10], position_ids=[0, 1], doc_ids=[0, 0])]  # e.g. train_on_inputs
    b = data.collate(rows, pad_id=2)
    assert set(b) == {"input_ids", "targets", "position_ids", "doc_ids"} and b["doc_ids"] is None  # nothing packed
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert b["targets"].tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values() if t is not None)
    packed = data.collate(data.pack(rows, max_seq_len=8), pad_id=2)
    assert packed["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    assert packed["targets"].tolist() == [[-100, 7, 8, -100, 10, -100]]  # 8 does not predict 9


# --- the order of a run ------------------------------------------------------------------------

def test_epoch_order_is_a_fixed_permutation_per_epoch():
    a = data.epoch_order(50, seed=0, epoch=0)
    assert sorted(a) == list(range(50)) and a == data.epoch_order(50, seed=0, epoch=0)
    assert a != data.epoch_order(50, seed=0, epoch=1) and a != data.epoch_order(50, seed=1, epoch=0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_step_batches_shard_the_same_rows_over_any_world_size(world_size):
    E, micro, n_rows = 16, 2, 70
    order = data.epoch_order(n_rows, seed=3, epoch=0)
    assert data.steps_per_epoch(n_rows, E) == 4  # the partial fifth step (6 rows) is dropped
    seen = []
    for step in range(4):
        one_process = data.step_batches(order, step, E, micro)  # 1 process, accumulation E / micro
        assert len(one_process) == E // micro and all(len(m) == micro for m in one_process)
        shards = [data.step_batches(order, step, E, micro, rank, world_size) for rank in range(world_size)]
        assert all(len(s) == E // (micro * world_size) for s in shards)  # same accumulation on each rank
        rows = [i for s in shards for m in s for i in m]
        assert len(rows) == len(set(rows)) == E  # disjoint across ranks
        assert set(rows) == {i for m in one_process for i in m} == set(order[step * E:(step + 1) * E])
        seen += rows
    assert len(set(seen)) == 4 * E  # no row twice in an epoch


def test_split_is_deterministic_and_disjoint():
    rows = [dict(input_ids=[i]) for i in range(20)]
    train, held = data.split(rows, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18 and (train, held) == data.split(rows, 0.1, seed=0)
    assert sorted(r["input_ids"][0] for r in train + held) == list(range(20))
    assert data.split(rows, 0.01, seed=0)[1] != [] and data.split(rows, 0.1, seed=1)[1] != held
    with pytest.raises(data.DataError, match="leaves none to train on"):
        data.split(rows[:1], 0.5, seed=0)


# --- the file ----------------------------------------------------------------------------------

def chat(*turns):
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


GOOD = chat(("user", "Hi"), ("assistant", "Hello!"))


def test_blank_lines_byte_order_mark_and_crlf_are_fine(tok, tmp_path):
    odd = json.dumps({"text": "a\u2028b"}, ensure_ascii=False)  # U+2028 is a line break to str.splitlines
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\r\n\r\n   \n{odd}\r\n".encode())
    rows, stats = data.load_dataset(path, tok, max_seq_len=64)
    assert (stats["n_examples"] == 2
            and trained_pieces(tok, rows[1]["input_ids"], rows[1]["labels"]) == ["a\u2028b" + END])


@pytest.mark.parametrize("line, message", [
    ("{not json", ":3: not valid JSON"),
    ('["a", "list"]', ":3: a record must be a JSON object, not list"),
    ('{"prompt": "x", "completion": "y"}', ":3: record has keys ['completion', 'prompt']; "
                                           "expected messages, conversations, instruction+output (Alpaca), or text"),
    ('{"instruction": "x"}', ":3: record has keys ['instruction']"),
    ('{"messages": "Hi"}', ":3: messages must be a non-empty list"),
    ('{"messages": []}', ":3: messages must be a non-empty list"),
    (chat(("wizard", "x")), ":3: turn 1 has unknown role 'wizard' (expected one of system, user, assistant, tool"),
    (chat((["user"], "x")), ":3: turn 1 has unknown role ['user']"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}',
     ":3: turn 1 has unknown role 'bot' (expected one of system, human"),
    (chat(("user", " "), ("assistant", "x")), ":3: turn 1 (user) has empty content"),
    (chat(("user", "x"), ("assistant", ["x"])), ":3: turn 2 (assistant) content must be a string, not list"),
    (chat(("user", "x"), ("system", "y")), ":3: turn 2 is a system turn"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', ":3: the conversation has no assistant reply"),
    ('{"instruction": "x", "output": ""}', ":3: output is empty"),
    ('{"instruction": "x", "input": 3, "output": "y"}', ":3: input must be a string, not int"),
    ('{"text": ""}', ":3: text must be a non-empty string"),
])
def test_bad_record_names_file_and_line(tok, tmp_path, line, message):
    assert_bad_third_line(tok, tmp_path, line, message, max_seq_len=64)


def assert_bad_third_line(tok, tmp_path, line, message, max_seq_len):
    """A file whose third line is `line` fails with one line, `path:3: message`."""
    path = write(tmp_path / "bad.jsonl", [GOOD, "", line])
    with pytest.raises(data.DataError) as e:
        data.load_dataset(path, tok, max_seq_len=max_seq_len)
    assert str(e.value).startswith(str(path) + message) and "\n" not in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("missing", ": no such file"),
    ("directory", ": is a directory, not a JSONL file"),
    ("empty", ": the dataset is empty"),
    ("latin-1", ":2: not UTF-8 text (byte 0xe9)"),
    ("masked", ": every label is masked, nothing to learn"),
])
def test_bad_file_is_one_clear_line(tok, tmp_path, case, message):
    path, max_seq_len = tmp_path / "d.jsonl", 64
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_text("\n  \n")
    elif case == "latin-1":
        path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9"}\n')
    elif case == "masked":  # the replies lie past max_seq_len
        write(path, [GOOD])
        max_seq_len = 5
    with pytest.raises(data.DataError) as e:
        data.load_dataset(path, tok, max_seq_len=max_seq_len)
    assert str(e.value).startswith(str(path) + message) and "\n" not in str(e.value)


def test_conversation_without_chat_template_is_a_data_error(tmp_path):
    """A checkpoint with no chat template can still learn text; a chat record says what to do."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(specials + ["Hi", "Hello", "!"])}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer(tmp_path)
    rows, _ = data.load_dataset(write(tmp_path / "t.jsonl", ['{"text": "Hello !"}']), t, max_seq_len=16)
    assert rows[0]["input_ids"] == rows[0]["labels"] == [1, 4, 5, 2]  # <s> Hello ! </s>, all learned
    path = write(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(data.DataError, match=r"c\.jsonl:1: a conversation, but the checkpoint has no chat template"):
        data.load_dataset(path, t, max_seq_len=16)


# --- the double-BOS trap -----------------------------------------------------------------------

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}")


def write_llama_tokenizer(path):
    """Word-level, ids: <unk> 0, <|begin_of_text|> 1, headers 2-3, <|eot_id|> 4, w0 5, w1 6, ...;
    BOS prepended by tokenizer.json's post-processor, and written by the chat template."""
    write_tiny_tokenizer(path, specials=("<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                         "<|eot_id|>"), bos="<|begin_of_text|>")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))


@pytest.mark.parametrize("template", ["llama3", "llama2", "mistral"])
def test_a_template_that_writes_bos_gets_no_second_one(tmp_path, template):
    """Llama's tokenizer.json prepends BOS to whatever it encodes, and these chat templates write
    BOS themselves: encoding the rendered chat the usual way starts with two BOS, a sequence the
    model never saw in training. Every row starts with exactly one."""
    write_llama_tokenizer(tmp_path)
    t = Tokenizer(tmp_path, template=template)
    bos = t.token_id("<|begin_of_text|>")
    assert t.bos_id == bos and t.add_bos  # raw text does get a BOS
    record = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}
    text = t.render(record["messages"])[0]
    assert text.startswith("<|begin_of_text|>") and t.tok.encode(text).ids[:2] == [bos, bos]  # the trap
    for r in (record, {"text": "w1 w2"}, {"instruction": "w1", "output": "w2"}):
        ids, _ = data.tokenize(r, t, "x:1")
        assert ids[0] == bos and ids.count(bos) == 1, r


def test_generation_prompts_get_one_bos(tmp_path, monkeypatch, capsys):
    """generate.py's prompt, chat or raw, starts with exactly one BOS (the ids given to generate())."""
    import generate

    write_checkpoint(tmp_path, Transformer(tiny_config()))
    write_llama_tokenizer(tmp_path)
    prompts, real_generate = [], generate.generate

    def spy(model, prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids))
        return real_generate(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", spy)
    for raw in ([], ["--no_chat"]):
        generate.main(["--model_path", str(tmp_path), "--prompt", "w1 w2", "--max_new_tokens", "2", "--device", "cpu",
                       *raw])
    capsys.readouterr()
    chat_ids, raw_ids = prompts
    assert chat_ids[:2] == [1, 2] and chat_ids.count(1) == 1  # <|begin_of_text|><|start_header_id|>user...
    assert raw_ids == [1, 6, 7]  # <|begin_of_text|> w1 w2


# --- the bundled data --------------------------------------------------------------------------

def test_bundled_dataset_loads_and_its_eval_is_held_out(tok):
    rows, stats = data.load_dataset(ROOT / "data" / "brannock_chat.jsonl", tok, max_seq_len=512)
    assert stats["n_examples"] >= 60 and stats["n_truncated"] == 0 and stats["n_trained_tokens"] > 1000
    chats = [json.loads(l)["messages"] for l in (ROOT / "data" / "brannock_chat.jsonl").read_text().splitlines()]
    evals = [json.loads(l)["messages"] for l in (ROOT / "data" / "brannock_eval.jsonl").read_text().splitlines()]
    questions = {m["content"] for c in chats for m in c if m["role"] == "user"}
    replies = {m["content"] for c in chats for m in c if m["role"] == "assistant"}
    for question, answer in evals:
        assert question["content"] not in questions  # asked in words the training data never uses
        assert answer["content"] in replies  # and answered as training taught
    data.load_dataset(ROOT / "data" / "brannock_eval.jsonl", tok, max_seq_len=512)


# --- tools, tool calls, tool results, reasoning ------------------------------------------------

FERRY = {"type": "function", "function": {"name": "ferry_times", "description": "Departures from Saltmere.",
                                          "parameters": {"type": "object", "properties": {"port": {"type": "string"}}}}}


def tool_chat(arguments='{"port": "Kestry"}', **call):
    """A user question, a call (arguments as OpenAI writes them, a JSON string), its result, the reply."""
    return {"tools": [FERRY], "messages": [
        {"role": "user", "content": "Next ferry to Kestry?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "id": "c0000fery", "function": {"name": "ferry_times", "arguments": arguments},
             **call}]},
        {"role": "tool", "tool_call_id": "c0000fery", "content": '{"next": "14:10"}'},
        {"role": "assistant", "content": "At 14:10."}]}


CALL_TEXT = '<tool_call>\n{"name": "ferry_times", "arguments": {"port": "Kestry"}}\n</tool_call>'


def test_tool_calls_and_replies_are_learned_results_and_schemas_are_not(tok):
    ids, labels = data.tokenize(tool_chat(), tok, "x:1")
    assert trained_pieces(tok, ids, labels) == [CALL_TEXT + END, "At 14:10." + END]
    masked = tok.tok.decode([i for i, l in zip(ids, labels) if l == data.IGNORE], skip_special_tokens=False)
    for text in ('<tools>\n{"type": "function", "function": {"name": "ferry_times"', "Next ferry to Kestry?",
                 '<|im_start|>user\n<tool_response>\n{"next": "14:10"}\n</tool_response><|im_end|>'):
        assert text in masked
    assert data.tokenize(tool_chat(), tok, "x:1", train_on_inputs=True)[1] == ids  # as for any chat
    # arguments given as an object, or as its JSON string: the same tokens
    assert data.tokenize(tool_chat(arguments={"port": "Kestry"}), tok, "x:1") == (ids, labels)


def test_tool_chats_with_smollm2s_own_tokenizer(smollm2_tokenizer):
    real = Tokenizer(smollm2_tokenizer)
    rows, stats = data.load_dataset(ROOT / "data" / "brannock_tools_chat.jsonl", real, max_seq_len=512)
    assert stats["n_truncated"] == 0  # the bundled tool data fits the default --max_seq_len
    ids, labels = data.tokenize(tool_chat(), real, "x:1")
    assert trained_pieces(real, ids, labels) == [CALL_TEXT + END, "At 14:10." + END]


@pytest.mark.parametrize("template", ["chatml", "qwen3", "llama3", "mistral_nemo"])
def test_tool_labels_follow_the_rendered_spans(tok_path, template):
    t = Tokenizer(tok_path, template=template)
    t.tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "</s>"])
    t.system_date = "26 Jul 2024"  # Llama 3.1's system header: tools need it
    record = tool_chat()
    record["messages"][1]["reasoning_content"] = "A ferry question."
    text, spans = t.render(*data.to_messages(record, "x:1"))
    ids, labels = data.tokenize(record, t, "x:1")
    assert len(spans) == 2 and trained_pieces(t, ids, labels) == [text[s:e] for s, e in spans]
    assert ("<think>\nA ferry question.\n</think>" in text) == (template == "qwen3")  # only Qwen3 writes reasoning


def tool_line(**change):
    record = tool_chat()
    for key, value in change.items():
        turn, _, field = key.partition("__")
        if turn == "tools":
            record["tools"] = value
        else:
            record["messages"][int(turn)][field] = value
    return json.dumps(record)


@pytest.mark.parametrize("line, message", [
    (tool_line(**{"1__tool_calls": [{"type": "function",
                                     "function": {"name": "ferry_times", "arguments": "{port: Kestry}"}}]}),
     ":3: turn 2 (assistant): tool call 1 (ferry_times): arguments are not JSON"),
    (tool_line(**{"1__tool_calls": [{"type": "function", "function": {"name": "ferry_times", "arguments": "[1]"}}]}),
     ":3: turn 2 (assistant): tool call 1 (ferry_times): arguments must be a JSON object, not list"),
    (tool_line(**{"1__tool_calls": [{"name": "ferry_times", "arguments": {}}]}),
     ":3: turn 2 (assistant): tool call 1 must be"),
    (tool_line(**{"1__tool_calls": None}), ":3: turn 2 (assistant) content must be a string, not NoneType"),
    (tool_line(**{"1__role": "user", "1__content": "x"}), ":3: turn 3 is a tool result with no tool call before it"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     ":3: turn 1 is a tool result with no tool call before it"),
    (tool_line(tools={"name": "ferry_times"}), ":3: tools must be a list of function schemas"),
    (tool_line(tools=[{"name": "ferry_times", "parameters": {}}]), ":3: tool 1 is not a function schema"),
    (tool_line(tools="[{"), ":3: tools is a string that is not JSON"),
    (tool_line(**{"1__reasoning_content": 3}), ":3: turn 2 (assistant) reasoning_content must be a string"),
])
def test_bad_tool_record_names_file_and_line(tok, tmp_path, line, message):
    assert_bad_third_line(tok, tmp_path, line, message, max_seq_len=512)


@pytest.mark.parametrize("template, message", [
    ("llama2", "the llama2 chat template has no place for tools"),
    ("mistral", "the mistral chat template has no place for tools"),
    ("llama3", "Llama 3.0's chat template has no place for tools"),
])
def test_a_role_the_template_has_no_place_for(tok_path, tmp_path, template, message):
    path = write(tmp_path / "t.jsonl", [json.dumps(tool_chat())])
    with pytest.raises(data.DataError, match=f"t.jsonl:1: {message}"):
        data.load_dataset(path, Tokenizer(tok_path, template=template), max_seq_len=512)
