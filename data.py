"""JSONL datasets -> tokenized rows with loss masks, packing, and the batch order of a run.

One record per line (blank lines are skipped), in any of four formats, detected per record:

    messages   {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "Paris."}]}
    ShareGPT   {"conversations": [{"from": "human", "value": "Capital of France?"},
                                  {"from": "gpt", "value": "Paris."}]}
    Alpaca     {"instruction": "Name the capital.", "input": "France", "output": "Paris."}
    text       {"text": "Plain text; all of it is learned."}

A messages record may carry tools, tool calls, tool results and reasoning, in OpenAI's form:

    {"tools": [{"type": "function", "function": {"name": "ferry_times", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Next ferry to Kestry?"},
                  {"role": "assistant", "reasoning_content": "...", "tool_calls": [{"type": "function",
                   "function": {"name": "ferry_times", "arguments": {"port": "Kestry"}}}]},
                  {"role": "tool", "content": "{\"next\": \"14:10\"}"},
                  {"role": "assistant", "content": "At 14:10."}]}

(arguments may be a JSON string, as OpenAI writes them). Each is written where the checkpoint's
published template writes it (tokenizer.render_chat): the assistant's calls are learned like
its replies, the tool results and schemas are not; a chat the template has no place for (tools
for Llama 2) is an error naming its line.

Conversations (multi-turn or not; the system turn, if any, first) are written with the
checkpoint's chat template (tokenizer.py). Only the assistant turns are learned, each with its
end-of-turn token, so the model learns to stop; every other label is -100. Alpaca records use the
Stanford Alpaca prompt and learn output + eos; text records learn everything (BOS, text, eos).
`train_on_inputs` learns the prompts too.

A row is a dict of equal-length lists: input_ids, labels, position_ids, doc_ids. Without packing
a row is one example; with packing several, told apart by doc_ids (0, 1, ... within the row).
"""
import json
from pathlib import Path

import torch

from common import InputError

IGNORE = -100  # label of a token that is not learned (cross_entropy's ignore_index)

# The Stanford Alpaca prompts, with and without an input.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "ipython": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(InputError):
    """A dataset problem; the message is one line, `path:line: what is wrong`."""


# --- reading and tokenizing --------------------------------------------------------------------

def read_jsonl(path):
    """[(line number, record)], skipping blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory, not a JSONL file' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not JSON
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1  # e.object: the bytes after any byte-order mark
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return records


def to_messages(record, where):
    """A chat record as ([{"role", "content", ...}], tools); None for Alpaca and text records.
    Tool calls are normalized to OpenAI's form with arguments as a dict (check_tool_calls)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        key, role_key, content_key, roles = "messages", "role", "content", ROLES
    elif "conversations" in record:
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        return None
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key} must be a non-empty list of {{{role_key!r}, {content_key!r}}} objects")
    tools = check_tools(record.get("tools"), where)
    messages, open_calls = [], 0  # calls of the last assistant turn not yet answered by a tool turn
    for i, turn in enumerate(turns, 1):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: turn {i} has unknown role {role!r} (expected one of {', '.join(roles)})")
        role, content = roles[role], turn.get(content_key)
        m = {"role": role, "content": content}
        if role == "assistant":
            if calls := turn.get("tool_calls"):
                m["tool_calls"] = check_tool_calls(calls, f"{where}: turn {i} (assistant)")
                m["content"] = content = content or ""  # a call often comes with no text (null)
            if "reasoning_content" in turn and turn["reasoning_content"] is not None:
                if not isinstance(turn["reasoning_content"], str):
                    raise DataError(f"{where}: turn {i} (assistant) reasoning_content must be a string")
                m["reasoning_content"] = turn["reasoning_content"]
            open_calls = len(m.get("tool_calls", []))
        elif role == "tool":
            if open_calls == 0:
                raise DataError(f"{where}: turn {i} is a tool result with no tool call before it to answer")
            open_calls -= 1
            if isinstance(turn.get("tool_call_id"), str):
                m["tool_call_id"] = turn["tool_call_id"]
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} ({role}) content must be a string, not {type(content).__name__}")
        if not content.strip() and not m.get("tool_calls"):
            raise DataError(f"{where}: turn {i} ({role}) has empty content")
        if role == "system" and i > 1:  # templates only place a system prompt first
            raise DataError(f"{where}: turn {i} is a system turn; only the first turn may be one")
        messages.append(m)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant reply to learn")
    return messages, tools


def check_tools(tools, where):
    """A record's (or --tools file's) "tools": JSON schemas [{"type": "function", "function":
    {"name": ..., "description": ..., "parameters": {...}}}] (a JSON string of that list is read
    too, as some datasets store it); None when absent or empty."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{where}: tools is a string that is not JSON") from None
    if not tools:
        return None
    form = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
    if not isinstance(tools, list):
        raise DataError(f"{where}: tools must be a list of function schemas {form}, not {type(tools).__name__}")
    for i, t in enumerate(tools, 1):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]
                and isinstance(f.get("parameters", {}), dict)):
            raise DataError(f"{where}: tool {i} is not a function schema {form}")
    return tools


def check_tool_calls(calls, where):
    """An assistant turn's tool_calls as [{"type": "function", "function": {"name", "arguments":
    dict}} (+ "id")]; arguments given as a JSON string (OpenAI's form) are parsed."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list, not {type(calls).__name__}")
    out = []
    for i, c in enumerate(calls, 1):
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]):
            raise DataError(f'{where}: tool call {i} must be '
                            '{"type": "function", "function": {"name": ..., "arguments": {...}}}')
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: tool call {i} ({f['name']}): arguments are not JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise DataError(f"{where}: tool call {i} ({f['name']}): arguments must be a JSON object, "
                            f"not {type(args).__name__}")
        out.append({"type": "function", "function": {"name": f["name"], "arguments": args},
                    **({"id": c["id"]} if isinstance(c.get("id"), str) else {})})
    return out


def to_text(record, tokenizer, where):
    """(text, spans): the whole example as one string and the (start, end) character spans to learn."""
    chat = to_messages(record, where)
    if chat is not None:
        if tokenizer.template is None:
            raise DataError(f"{where}: a conversation, but the checkpoint has no chat template "
                            "(pass --chat_template, or use Alpaca or text records)")
        try:
            return tokenizer.render(chat[0], tools=chat[1])
        except ValueError as e:  # a turn or tool the template has no place for
            raise DataError(f"{where}: {e}") from None
    bos = tokenizer.bos_text if tokenizer.add_bos else ""
    if "instruction" in record and "output" in record:
        fields = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
        for k, v in fields.items():
            if not isinstance(v, str):
                raise DataError(f"{where}: {k} must be a string, not {type(v).__name__}")
        for k in ("instruction", "output"):
            if not fields[k].strip():
                raise DataError(f"{where}: {k} is empty")
        prompt = bos + (ALPACA_PROMPT_INPUT if fields["input"].strip() else ALPACA_PROMPT).format(**fields)
        text = prompt + fields["output"] + tokenizer.eos_text
        return text, [(len(prompt), len(text))]
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{where}: text must be a non-empty string")
        text = bos + record["text"] + tokenizer.eos_text
        return text, [(0, len(text))]
    raise DataError(f"{where}: record has keys {sorted(record)}; expected messages, conversations, "
                    "instruction+output (Alpaca), or text")


def tokenize(record, tokenizer, where, train_on_inputs=False):
    """One record -> (input_ids, labels): labels[t] = input_ids[t] where learned, else IGNORE."""
    text, spans = to_text(record, tokenizer, where)
    # One encoding of the whole text; a token is learned iff it starts inside a learned span.
    # Encoding prompt and reply apart would not give the same tokens where BPE merges across them.
    ids, offsets = tokenizer.encode_with_offsets(text)
    if train_on_inputs:
        return ids, list(ids)
    # Never mask by comparing with pad_id: pad is often eos, and each reply's eos must be learned.
    labels = [t if any(s <= start < e for s, e in spans) else IGNORE for t, (start, _) in zip(ids, offsets)]
    return ids, labels


def load_dataset(path, tokenizer, max_seq_len, train_on_inputs=False, sample_packing=False):
    """(rows, stats): rows are dicts of lists (input_ids, labels, position_ids, doc_ids)."""
    rows, stats = [], dict(n_examples=0, n_rows=0, n_truncated=0, n_tokens=0, n_trained_tokens=0)
    for n, record in read_jsonl(path):
        ids, labels = tokenize(record, tokenizer, f"{path}:{n}", train_on_inputs)
        if len(ids) > max_seq_len:  # cut the end (it may cut a reply); counted, and said in the log
            stats["n_truncated"] += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        stats["n_examples"] += 1
        stats["n_tokens"] += len(ids)
        # An example's first token is never a target (nothing precedes it), so this is exactly the
        # number of targets != IGNORE that collate will make, packed or not.
        stats["n_trained_tokens"] += sum(l != IGNORE for l in labels[1:])
        rows.append(dict(input_ids=ids, labels=labels, position_ids=list(range(len(ids))), doc_ids=[0] * len(ids)))
    if stats["n_trained_tokens"] == 0:
        raise DataError(f"{path}: every label is masked, nothing to learn "
                        f"(no assistant replies within --max_seq_len {max_seq_len}?)")
    if sample_packing:
        rows = pack(rows, max_seq_len)
    stats["n_rows"] = len(rows)
    return rows, stats


def pack(rows, max_seq_len):
    """Fill rows of up to max_seq_len tokens with whole examples, greedily, in order. Positions
    restart and doc_ids count up per example, so the model keeps examples apart (a block-diagonal
    causal mask) and collate never makes one example's last token predict the next one's first."""
    packed = []
    for r in rows:
        if not packed or len(packed[-1]["input_ids"]) + len(r["input_ids"]) > max_seq_len:
            packed.append(dict(input_ids=[], labels=[], position_ids=[], doc_ids=[]))
        row = packed[-1]
        doc = row["doc_ids"][-1] + 1 if row["doc_ids"] else 0
        for k in ("input_ids", "labels", "position_ids"):
            row[k] += r[k]
        row["doc_ids"] += [doc] * len(r["input_ids"])
    return packed


def describe(stats):
    """One line for the log."""
    packed = f" packed into {stats['n_rows']} rows," if stats["n_rows"] != stats["n_examples"] else ""
    return (f"{stats['n_examples']} examples,{packed} {stats['n_tokens']:,} tokens, "
            f"{stats['n_trained_tokens']:,} learned, {stats['n_truncated']} truncated")


def split(rows, fraction, seed):
    """(train, eval): a fixed random `fraction` of the rows (at least one) held out for evaluation."""
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"--eval_split {fraction} of {len(rows)} rows leaves none to train on")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# --- batches -----------------------------------------------------------------------------------

def collate(rows, pad_id):
    """Rows -> dict of right-padded (B, T) tensors, T = the longest row:
    input_ids   pad_id at pads
    targets     the label of the next token: IGNORE at pads, at each row's last token and at each
                packed example's last token (never predict across examples). The loss is the
                cross-entropy over the (targets != IGNORE).sum() other tokens (loss.token_loss).
    position_ids
    doc_ids     example index within the row, -1 at pads; None when no row is packed (then the
                plain causal mask is the same thing)."""
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    # Padding is a document of its own: its attention rows then see at least themselves (a row
    # with every key masked would give NaN), and no real token attends to it.
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        position_ids[i, :n] = torch.tensor(r["position_ids"])
        doc_ids[i, :n] = torch.tensor(r["doc_ids"])
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]  # (B, T-1): token t and t+1 in one example
    targets[:, :-1] = torch.where(same_doc, labels[:, 1:], IGNORE)
    packed = bool((doc_ids > 0).any())
    return dict(input_ids=input_ids, targets=targets, position_ids=position_ids, doc_ids=doc_ids if packed else None)


# --- the order of a run ------------------------------------------------------------------------

def epoch_order(n_rows, seed, epoch):
    """A permutation of the rows, the same for the same (seed, epoch) on every rank and run."""
    # One generator seed per (seed, epoch). seed + epoch would give seed 1's first epoch the order of
    # seed 0's second; 100003, a prime above any epoch count, keeps every pair apart.
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def steps_per_epoch(n_rows, effective_batch_size):
    # The last partial step of an epoch is dropped: every step then has the same number of rows,
    # and the rows it skips come back in the next epoch's shuffle.
    return n_rows // effective_batch_size


def step_batches(order, step, effective_batch_size, micro_batch_size, rank=0, world_size=1):
    """Row indices of this rank's micro batches for optimizer step `step` of the epoch.

    The step's rows are order[step * E:(step + 1) * E] whatever the world size, cut into micro
    batches; rank r takes micro batches r, r + world_size, ... So 1 process with k micro batches
    and k processes with 1 each see the same rows in every step (E divisible by micro x world,
    as train.py checks, gives every rank the same number of micro batches)."""
    rows = order[step * effective_batch_size:(step + 1) * effective_batch_size]
    micro = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    return micro[rank::world_size]
