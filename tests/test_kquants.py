"""k-quants (kquants.py, merge.py --gguf q4_k_m|q5_k_m|q6_k) against llama.cpp's llama-quantize.

- Byte parity: for SmolLM2-135M-Instruct and tiny llama (untied), qwen2 (tied, q/k/v biases),
  qwen3, and SentencePiece llama2 (Llama 2's layout) and mistral (Mistral 7B v0.3's) checkpoints
  whose rows split into 256s, our q4_k_m/q5_k_m/q6_k file equals, as a whole
  file and tensor by tensor (name, type, sha256 of its bytes), what llama-quantize writes from our
  bf16 (SmolLM2) or f32 (tiny) GGUF of the same checkpoint: recorded in
  tests/fixtures/kquants_llama_quantize.json by tests/fixtures/kquants_reference.py. The tiny
  checkpoints carry rows ggml treats specially (all zero, constant, sparse, all of one sign,
  +v and -v tied for the largest magnitude, heavy tails) in every weight.
- Read back with gguf-py's dequantize: every weight within two quantization steps of its
  sub-block's range, and the relative RMS error below 1.5 * 2^-bits on Gaussian weights.
"""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import gguf_export
from helpers import ROOT, SMOLLM2_TOKENIZER, write_sentencepiece_tokenizer
import kquants
import merge
from model import Config, Transformer
from weights import opened, read_tensor, weight_files

gguf = pytest.importorskip("gguf")  # the reference reader and dequantizer (test-only)

RECORDED = ROOT / "tests" / "fixtures" / "kquants_llama_quantize.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(RECORDED.read_text())
FTYPES = ("q4_k_m", "q5_k_m", "q6_k")
TINY = ("llama", "qwen2", "qwen3")
# Llama 2's layout (MHA, 32000 pieces) and Mistral 7B v0.3's (GQA, 32768): mistral_common's tokenizer.model
# file and the family's published template
SENTENCEPIECE = {"llama2": ("tokenizer.model.v1", "meta-llama-Llama-2-7b-chat-hf.jinja"),
                 "mistral": ("mistral_instruct_tokenizer_240323.model.v3",
                             "mistralai-Mistral-Large-Instruct-2407.jinja")}


def edge_rows(w):
    """Rows 0-6 of a 2-D weight made into the cases the quantizer branches on."""
    n = w.shape[1]
    w[0] = 0
    w[1] = 0.01
    w[2] = w[2] * (torch.arange(n) % 10 == 0)
    w[3] = w[3].abs()
    w[4] = -w[4].abs()
    w[5, ::16], w[5, 8::16] = 0.1, -0.1  # +v and -v both the largest magnitude, in either order
    w[6] = w[6] ** 3 * 50
    return w


def kquant_checkpoint(path, model_type):
    """A tiny checkpoint with rows of 256 and 512 (so every weight takes a k-quant) and 2 layers
    (use_more_bits gives layer 1's attn_v and ffn_down Q6_K in q4_k_m, not layer 0's): fp32
    weights from a seeded generator; SmolLM2's tokenizer (its first 512 tokens), or for llama2 and
    mistral a real SentencePiece one (helpers.write_sentencepiece_tokenizer) and its whole vocabulary."""
    extra = {"llama": dict(model_type="llama", tie_word_embeddings=False),
             "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
             "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=64),
             "llama2": dict(model_type="llama", tie_word_embeddings=False, num_key_value_heads=4),
             "mistral": dict(model_type="mistral", tie_word_embeddings=False)}[model_type]
    vocab_size = 512
    if model_type in SENTENCEPIECE:
        model_file, template = SENTENCEPIECE[model_type]
        template = (ROOT / "tests" / "data" / "templates" / template).read_text()
        vocab_size = write_sentencepiece_tokenizer(path, model_file, template)
    c = Config(**{**dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                         rope_theta=10000.0), **extra})
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Transformer(c).checkpoint_state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for key in sorted(shapes):
        w = torch.randn(shapes[key], generator=g) * 0.05
        state[key] = edge_rows(w) if w.dim() == 2 else 1 + w
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "llama2": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    config = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                         "rms_norm_eps", "rope_theta")}
    if model_type in SENTENCEPIECE:
        config.update(bos_token_id=1, eos_token_id=2)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SMOLLM2_TOKENIZER / name, path / name)
    (path / "config.json").write_text(json.dumps({**config, **extra, "architectures": [arch]}))
    return path


def export(path, ftype, out):
    """Our GGUF of a checkpoint folder (no adapter), as merge.py writes it after merging."""
    files = weight_files(path)
    shapes = {}
    for key, file in files.items():
        with opened(path / file) as f:
            shapes[key] = tuple(f.get_slice(key).get_shape())
    entries = gguf_export.tensors(shapes, lambda key: read_tensor(path / files[key], key),
                                  Config.from_json(path / "config.json"), ftype)
    gguf_export.write(out, gguf_export.metadata(path, ftype), entries)
    return out


def described(file):
    """{"file_sha256", "tensors": ["name TYPE sha256[:16]", ...]}: what the fixture records."""
    r = gguf.GGUFReader(file)
    tensors = [f"{t.name} {t.tensor_type.name} {hashlib.sha256(t.data.tobytes()).hexdigest()[:16]}" for t in r.tensors]
    return {"file_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "tensors": tensors}


def sha256(file):
    return hashlib.sha256(file.read_bytes()).hexdigest()


@pytest.fixture
def smollm2_sha256(smollm2):  # after smollm2's skip when the model is absent
    return sha256(smollm2 / "model.safetensors")


def assert_as_recorded(file, ref):
    got = described(file)
    for ours, theirs in zip(got["tensors"], ref["tensors"]):
        assert ours == theirs  # name, type and bytes of each tensor, in llama-quantize's order
    assert len(got["tensors"]) == len(ref["tensors"])
    assert got["file_sha256"] == ref["file_sha256"]  # and the keys, their order, the layout: every byte


@pytest.mark.parametrize("model_type", TINY + tuple(SENTENCEPIECE))
@pytest.mark.parametrize("ftype", FTYPES)
def test_tiny_equals_llama_quantize(recorded, tmp_path, model_type, ftype):
    ref = recorded[f"tiny-{model_type}"]
    path = kquant_checkpoint(tmp_path / model_type, model_type)
    assert sha256(path / "model.safetensors") == ref["model_safetensors_sha256"], \
        "the tiny checkpoint's weights changed: re-record with tests/fixtures/kquants_reference.py"
    assert_as_recorded(export(path, ftype, tmp_path / f"{ftype}.gguf"), ref[ftype])


@pytest.mark.parametrize("ftype", FTYPES)
def test_smollm2_equals_llama_quantize(recorded, smollm2, smollm2_sha256, tmp_path, ftype):
    ref = recorded["smollm2"]
    if smollm2_sha256 != ref["model_safetensors_sha256"]:
        pytest.skip("the fixture was recorded on the SmolLM2 copy ../shared/tools/get_smollm2.sh makes; "
                    "this is another")
    out = export(smollm2, ftype, tmp_path / f"{ftype}.gguf")
    assert_as_recorded(out, ref[ftype])
    # SmolLM2's rows of 576 fall back to Q5_0 / Q5_1 / Q8_0; ffn_down (rows of 1536) takes k-quants
    types = {t.split()[0]: t.split()[1] for t in described(out)["tensors"]}
    assert types["blk.0.attn_q.weight"] == {"q4_k_m": "Q5_0", "q5_k_m": "Q5_1", "q6_k": "Q8_0"}[ftype]
    assert types["blk.4.ffn_down.weight"] == {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[ftype]
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output layer's type, Q8_0 for rows of 576


@pytest.mark.parametrize("ggml_type,bits,sub", [(kquants.Q4_K, 4, 32), (kquants.Q5_K, 5, 32), (kquants.Q6_K, 6, 16),
                                                (kquants.Q5_0, 5, 32), (kquants.Q5_1, 5, 32)])
def test_dequantized_within_the_formats_error(ggml_type, bits, sub):
    x = torch.randn(64, 1024)
    q = kquants.quantize(x, ggml_type)
    assert q.shape == (64, 1024 // kquants.BLOCK[ggml_type][0] * kquants.BLOCK[ggml_type][1])
    y = gguf.quants.dequantize(q.numpy(), gguf.GGMLQuantizationType(ggml_type))
    y = torch.from_numpy(y.reshape(x.shape).copy())
    xs, ys = x.reshape(-1, sub), y.reshape(-1, sub)
    if ggml_type in (kquants.Q6_K, kquants.Q5_0):  # symmetric: d * q over [-max|x|, max|x|]
        span = 2 * xs.abs().amax(1)
    else:  # an offset: [min(x, 0), max(x)]
        span = xs.amax(1) - xs.amin(1).clamp(max=0)
    step = span / (2 ** bits - 1)
    # the search may clip a sub-block's extremes to fit its bulk, and scales are stored in 6-8 bits
    assert ((xs - ys).abs() <= 2 * step[:, None]).all()
    assert (x - y).norm() / x.norm() < 1.5 * 2.0 ** -bits


def test_tensor_types_follow_llama_quantize():
    c = Config(vocab_size=512, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=256, model_type="llama")
    def t(name, ftype="q4_k_m", ncols=4096, tied=False):
        return kquants.tensor_type(name, ncols, ftype, c, tied)

    # use_more_bits for 32 layers: 0-3, 28-31 and every third from 6 get Q6_K on attn_v and ffn_down
    more = [i for i in range(32) if t(f"blk.{i}.attn_v.weight") == kquants.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if t(f"blk.{i}.ffn_down.weight", ncols=14336) == kquants.Q6_K] == more
    assert t("blk.4.attn_q.weight") == kquants.Q4_K and t("blk.4.attn_v.weight", "q5_k_m") == kquants.Q5_K
    assert t("output.weight") == t("token_embd.weight", tied=True) == kquants.Q6_K
    assert t("token_embd.weight") == kquants.Q4_K
    assert t("blk.4.attn_v.weight", "q6_k") == t("output.weight", "q6_k") == kquants.Q6_K
    # rows not a multiple of 256: Q5_0 / Q5_1 / Q8_0; not even of 32: F16
    assert [t("blk.4.attn_q.weight", f, ncols=576) for f in FTYPES] == [kquants.Q5_0, kquants.Q5_1, kquants.Q8_0]
    assert t("blk.4.attn_q.weight", ncols=100) == t("output.weight", ncols=100) == kquants.F16
    big = Config(**{**c.__dict__, "num_hidden_layers": 80})  # Llama 70B: the other attn_v get Q5_K
    assert kquants.tensor_type("blk.11.attn_v.weight", 8192, "q4_k_m", big, False) == kquants.Q5_K


def test_unknown_gguf_type_is_one_line_and_leaves_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # the command line: argparse's choices
        merge.main(["--model_path", "m", "--adapter_path", "a", "--output_dir", str(tmp_path / "out"),
                    "--gguf", "q4_k_s"])
    assert e.value.code == 2 and "invalid choice: 'q4_k_s'" in capsys.readouterr().err
    with pytest.raises(merge.InputError, match=r"--gguf q3_k_m: not a GGUF type this export writes \(f16, .*q6_k\)"):
        merge.merge("m", "a", tmp_path / "out", gguf="q3_k_m")  # the function: checked before any path is read
    assert not (tmp_path / "out").exists()
