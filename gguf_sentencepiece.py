"""The vocabulary of a SentencePiece tokenizer (Llama 2, TinyLlama, Mistral 7B v0.1-v0.3) as llama.cpp's
"llama" tokenizer model takes it: every piece with its score and type, read from tokenizer.model.

Its own file because tokenizer.json does not hold what GGUF needs: llama.cpp's SentencePiece
tokenizer merges by the pieces' scores and treats <0x00>..<0xFF> as byte fallback by their type,
and both live only in tokenizer.model, a protobuf (sentencepiece_model.proto's ModelProto), read
here by hand, without the sentencepiece or protobuf packages:

    ModelProto   field 1, repeated: SentencePiece (a length-delimited message); others skipped
    SentencePiece  1: piece (string), 2: score (float32), 3: type (enum; absent means NORMAL)

The tokens, scores and types are what convert_hf_to_gguf.py writes (tests/test_gguf.py):
the model's pieces, padded to the model's vocab_size with [PADi] (UNUSED, -10000), then the added
tokens of added_tokens.json and tokenizer_config.json's added_tokens_decoder over them (-1000).
"""
import struct

from common import CheckpointError
from tokenizer import read_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's = GGUF's token types


def varint(data, i):
    n = shift = 0
    while True:
        b = data[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if b < 0x80:
            return n, i


def fields(data):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            n, i = varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield key >> 3, wire, value


def read_pieces(file):
    """[(piece, score, type)] of a tokenizer.model."""
    pieces = []
    try:
        for number, wire, value in fields(file.read_bytes()):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, _, v in fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                pieces.append((piece, score, kind))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{file}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise CheckpointError(f"{file}: not a SentencePiece model (no pieces)")
    return pieces


def vocab(path, vocab_size, added_token):
    """(tokens, scores, types) of the checkpoint folder `path`, vocab_size long; added_token(entry
    of added_tokens_decoder) gives an added token's (text, type), as for the BPE families."""
    tokens, scores = [f"[PAD{i}]" for i in range(vocab_size)], [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, (piece, score, kind) in enumerate(read_pieces(path / "tokenizer.model")[:vocab_size]):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL  # a USER_DEFINED piece: NORMAL
    added = {i: (text, USER_DEFINED) for text, i in read_json(path / "added_tokens.json").items()}
    decoder = read_json(path / "tokenizer_config.json").get("added_tokens_decoder", {})
    added |= {int(i): added_token(token) for i, token in decoder.items()}
    for i, (text, kind) in added.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, -1000.0, kind
    return tokens, scores, types
