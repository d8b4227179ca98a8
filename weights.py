"""A checkpoint folder's safetensors files, read and written one tensor at a time.

Its own file because three others use checkpoints this way and none of them is about files:
model.open_checkpoint reads a base through them (for Transformer.from_pretrained, fsdp.py's
sharded load and merge.py alike), merge.py writes its merged shards and reads them back for the
GGUF export, hub.py lists the shards to fetch. A tensor is read with its file opened for it
alone: the file is memory-mapped and unmapped once the tensor is freed, where a handle held open
over a whole file would keep every page it has read resident (the whole checkpoint, by the end).
Only safetensors are read, never pickles.
"""
import json
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from common import CheckpointError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def weight_files(path):
    """{tensor key: safetensors file name} for a single-file or sharded checkpoint."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})") from None
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are loaded, never pickles)")
    with opened(single) as f:
        return {k: "model.safetensors" for k in f.keys()}


def check_keys(path, files, expected, tied):
    """The checkpoint's tensor keys (files: {key: file}) are exactly `expected`, or the first
    missing or unexpected one is named. A tied lm_head is not expected (some tied checkpoints store
    it anyway), nor rotary tables older checkpoints kept."""
    tied = {"lm_head.weight"} if tied else set()
    expected, found = set(expected) - tied, {k for k in files if not k.endswith("rotary_emb.inv_freq")} - tied
    for what, keys in (("missing", sorted(expected - found)), ("unexpected", sorted(found - expected))):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{path}: {what} tensor {keys[0]}{more}")


@contextmanager
def opened(file):
    """safe_open(file), for the headers or tensors read inside; a damaged file (safetensors raises its
    own error types) named in one line."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_tensor(file, key):
    """One tensor of a safetensors file, the file opened for it alone."""
    with opened(file) as f:
        return f.get_tensor(key)


def stored_dtype(path):
    """The dtype a checkpoint stores its weights in, read from a header alone."""
    files = weight_files(path)
    key = next(iter(files))
    with opened(Path(path) / files[key]) as f:
        stored = f.get_slice(key).get_dtype()  # "BF16"
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(stored, torch.float32)


def checked_shapes(path, expected, tied):
    """{key: (file, shape)} for expected {key: shape} (in its order), after checking from the files'
    headers alone that the checkpoint holds exactly these tensors with these shapes."""
    path = Path(path)
    files = weight_files(path)
    check_keys(path, files, expected, tied)
    shapes = {}
    for file in sorted({files[k] for k in expected}):
        with opened(path / file) as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in expected})
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{path / files[k]}: {k} has shape {shapes[k]}, expected {shape}")
    return {k: (path / files[k], shape) for k, shape in expected.items()}


def write_safetensors(shapes, dtype, tensor, out, max_shard_size):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json, for
    {key: shape} (in checkpoint order, all of `dtype`); tensor(key) gives each when its turn comes.
    A shard ends before the tensor that would take it past max_shard_size bytes."""
    size = lambda k: torch.Size(shapes[k]).numel() * dtype.itemsize  # noqa: E731
    shards, current, total = [], [], 0
    for k in shapes:
        if current and total + size(k) > max_shard_size:
            shards.append(current)
            current, total = [], 0
        current.append(k)
        total += size(k)
    shards.append(current)
    if len(shards) == 1:
        write_shard(out / "model.safetensors", {k: shapes[k] for k in shards[0]}, dtype, tensor)
        return
    weight_map = {}
    for i, keys in enumerate(tqdm(shards, desc="writing shards", leave=False)):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / name, {k: shapes[k] for k in keys}, dtype, tensor)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(map(size, shapes))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_shard(file, shapes, dtype, tensor):
    """One safetensors file, byte for byte what safetensors' save_file writes for these tensors
    (tests/test_workflow.py), a tensor at a time: u64 header length, the JSON header (metadata,
    then each tensor's dtype, shape and byte range, by name), padded with spaces to 8 bytes, then
    the tensors' bytes in the header's order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in sorted(shapes):  # save_file's order (by dtype, then name): here one dtype
        n = torch.Size(shapes[k]).numel() * dtype.itemsize
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k in sorted(shapes):
            t = tensor(k)
            assert t.dtype == dtype and tuple(t.shape) == tuple(shapes[k]), k
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
