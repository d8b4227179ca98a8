"""JSONL datasets -> tokenized rows with loss masks, packing, and the batch order of a run.

One record per line, in any of four formats (detected per record):

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    {"text": "Any plain text, all of it learned."}

Conversations go through the checkpoint's chat template (tokenizer.py). Only the assistant
replies are learned, each with its end-of-turn token (so the model learns to stop); the rest
of the labels are -100. Alpaca records use the Stanford Alpaca prompt, and learn the output.
"""
import json
from pathlib import Path

import torch

from model import InputError

IGNORE = -100  # label of a token that is not learned (cross_entropy's ignore_index)

ALPACA = ("Below is an instruction that describes a task{ctx}. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n")
ALPACA_CTX = ", paired with an input that provides further context"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(InputError):
    """A dataset problem; the message is one line, `path:line: what is wrong`."""


def read_jsonl(path):
    """[(line number, record)], skipping blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return records


def to_messages(record, where):
    """A chat record as [{"role", "content"}]; None for Alpaca and text records."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        turns = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None) for m in record["messages"]]
        roles = {"system": "system", "user": "user", "assistant": "assistant"}
    elif "conversations" in record:
        turns = [(m.get("from"), m.get("value")) if isinstance(m, dict) else (None, None) for m in record["conversations"]]
        roles = SHAREGPT_ROLES
    else:
        return None
    if not turns:
        raise DataError(f"{where}: the conversation has no turns")
    messages = []
    for i, (role, content) in enumerate(turns):
        if role not in roles:
            raise DataError(f"{where}: turn {i + 1} has unknown role {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {i + 1} ({role}) has empty content")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant reply to learn")
    return messages


def tokenize(record, tokenizer, where, train_on_inputs=False):
    """One record -> (input_ids, labels), labels = input_ids where learned, else -100."""
    messages = to_messages(record, where)
    if messages is not None:
        text, spans = tokenizer.render(messages)
    elif "instruction" in record and "output" in record:
        fields = {k: record[k] for k in ("instruction", "input", "output") if k in record}
        if not all(isinstance(v, str) for v in fields.values()) or not record["output"].strip():
            raise DataError(f"{where}: instruction, input and output must be strings, and output not empty")
        ctx = record.get("input", "").strip()
        prompt = tokenizer.bos_text * tokenizer.add_bos + ALPACA.format(ctx=ALPACA_CTX if ctx else "", instruction=record["instruction"])
        prompt += f"### Input:\n{ctx}\n\n### Response:\n" if ctx else "### Response:\n"
        text = prompt + record["output"] + tokenizer.eos_text
        spans = [(len(prompt), len(text))]
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{where}: text must be a non-empty string")
        start = len(tokenizer.bos_text) if tokenizer.add_bos else 0
        text = tokenizer.bos_text * tokenizer.add_bos + record["text"] + tokenizer.eos_text
        spans = [(start, len(text))]
    else:
        raise DataError(f"{where}: record has keys {sorted(record)}; expected messages, conversations, "
                        "instruction+output, or text")
    # One encoding of the whole text; a token is learned iff it starts inside a learned span.
    # (Encoding the pieces separately would differ from the whole where BPE merges across them.)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if train_on_inputs:
        return ids, list(ids)
    labels = [t if any(s <= start < e for s, e in spans) else IGNORE for t, (start, _) in zip(ids, offsets)]
    return ids, labels


def load_dataset(path, tokenizer, max_seq_len, train_on_inputs=False, sample_packing=False):
    """Rows (dicts of lists: input_ids, labels, position_ids, doc_ids) and statistics."""
    rows, stats = [], dict(n_examples=0, n_truncated=0, n_tokens=0, n_trained_tokens=0)
    for n, record in read_jsonl(path):
        ids, labels = tokenize(record, tokenizer, f"{path}:{n}", train_on_inputs)
        if len(ids) > max_seq_len:
            stats["n_truncated"] += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        stats["n_examples"] += 1
        stats["n_tokens"] += len(ids)
        stats["n_trained_tokens"] += sum(l != IGNORE for l in labels[1:])  # the first is never predicted
        rows.append(dict(input_ids=ids, labels=labels, position_ids=list(range(len(ids))), doc_ids=[0] * len(ids)))
    if stats["n_trained_tokens"] == 0:
        raise DataError(f"{path}: every label is masked: nothing to learn (too short a --max_seq_len?)")
    if sample_packing:
        rows = pack(rows, max_seq_len)
    stats["n_rows"] = len(rows)
    return rows, stats


def pack(rows, max_seq_len):
    """Greedily fill rows of up to max_seq_len tokens with whole examples, in order. Positions
    restart and doc_ids count up per example, so the model keeps examples apart (no attention
    across them, no prediction of one example's first token from another's last)."""
    packed, current = [], None
    for r in rows:
        if current is None or len(current["input_ids"]) + len(r["input_ids"]) > max_seq_len:
            current = dict(input_ids=[], labels=[], position_ids=[], doc_ids=[])
            packed.append(current)
        doc = current["doc_ids"][-1] + 1 if current["doc_ids"] else 0
        for k in ("input_ids", "labels", "position_ids"):
            current[k] += r[k]
        current["doc_ids"] += [doc] * len(r["input_ids"])
    return packed


def describe(stats):
    packed = f" packed into {stats['n_rows']} rows," if stats["n_rows"] != stats["n_examples"] else ""
    return (f"{stats['n_examples']} examples,{packed} {stats['n_tokens']:,} tokens, {stats['n_trained_tokens']:,} learned, "
            f"{stats['n_truncated']} truncated")


def collate(rows, pad_id):
    """Right-padded tensors (B, T): input_ids, targets (the label of the next token, -100
    where nothing is learned: padding, each row's end, each packed example's end),
    position_ids, and doc_ids (None unless some row is packed)."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)  # padding: a document of its own
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        position_ids[i, :n] = torch.tensor(r["position_ids"])
        doc_ids[i, :n] = torch.tensor(r["doc_ids"])
    targets = torch.full_like(labels, IGNORE)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    targets[:, :-1] = torch.where(same_doc, labels[:, 1:], IGNORE)
    packed = bool((doc_ids.amax(1) > 0).any())
    return dict(input_ids=input_ids, targets=targets, position_ids=position_ids, doc_ids=doc_ids if packed else None)


# --- the order of a run ------------------------------------------------------------------------

def epoch_order(n_rows, seed, epoch):
    """A permutation of the rows, the same for the same (seed, epoch) on every rank and run."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def steps_per_epoch(n_rows, effective_batch_size):
    return n_rows // effective_batch_size  # the last partial step of an epoch is dropped


def step_batches(order, step, effective_batch_size, micro_batch_size, rank=0, world_size=1):
    """Row indices of this rank's micro batches for optimizer step `step` of the epoch. The step's
    rows are order[step * E:(step + 1) * E] whatever the world size; rank r takes every world_size-th
    micro batch of them, so 1 process x k micro batches and k processes x 1 see the same rows."""
    rows = order[step * effective_batch_size:(step + 1) * effective_batch_size]
    micro = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    return micro[rank::world_size]


def split(rows, fraction, seed):
    """(train, eval): a fixed random `fraction` of the rows held out for evaluation."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]
