"""model.py: logits against the Hugging Face implementation, KV cache, GQA, RoPE, loading."""
import json
import math
import weakref
from functools import partialmethod

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adapters import apply_lora
from common import CheckpointError
from helpers import FAMILIES, hf_model, randomize_B, tiny, tiny_config, write_checkpoint
from model import Block, Config, SwiGLU, Transformer, apply_rope, rope_inv_freq

ORIGINAL_BLOCK_FORWARD = Block.forward


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(family, tmp_path):
    # Saved by transformers (its own config.json spelling, safetensors), loaded by us: fp32 logits
    # within 1e-4 of Hugging Face's eager implementation, over 40 positions (past the llama3
    # config's original 16, so the scaled frequencies are used).
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert (got - expected).abs().max() < 1e-4


def test_config_spellings_agree():
    # Hub checkpoints write rope_theta + rope_scaling ("type" in older ones); transformers 5
    # writes rope_parameters. All three must give the same Config.
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    old = Config.from_dict(dict(rope_theta=500000.0, rope_scaling=dict(scaling, type="llama3")))
    hub = Config.from_dict(dict(rope_theta=500000.0, rope_scaling=dict(scaling, rope_type="llama3")))
    new = Config.from_dict(dict(rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0)))
    assert old == hub == new and new.rope_theta == 500000.0 and new.rope_scaling["rope_type"] == "llama3"
    plain = Config.from_dict(dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)))
    assert plain.rope_scaling is None and plain.rope_theta == 1e6


@pytest.mark.parametrize("bad, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope scaling type 'yarn' is not supported"),
])
def test_unsupported_config_is_an_error(bad, message):
    with pytest.raises(CheckpointError, match=message):
        Config.from_dict(bad)


def test_kv_cache_decoding_equals_full_recompute():
    # Prefill 7 tokens, then 3 at once, then one at a time through the cache: every position's
    # logits equal one full forward over the whole sequence (atol 1e-5, fp32).
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 16)
        steps = [model(ids[:, :7]), model(ids[:, 7:10], start=7)]
        steps += [model(ids[:, t:t + 1], start=t) for t in range(10, 16)]
        model.setup_cache(None, None)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_gqa_equals_repeated_kv_heads():
    # 4 query heads sharing 2 K/V heads == 4 heads whose K/V weights repeat each shared head.
    gqa = Transformer(tiny_config(num_key_value_heads=2)).eval()
    mha = Transformer(tiny_config(num_key_value_heads=4)).eval()
    sd = gqa.state_dict()
    for k, w in sd.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # (2 * D, C) -> (4 * D, C)
            sd[k] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-6)


def test_rope_is_a_rotation_of_pairs_i_and_i_plus_half():
    # Direct formula: dimension pair (i, i + D/2) at position p turns by angle p * theta^(-2i/D).
    config = tiny_config()
    D, theta = config.head_dim, config.rope_theta
    x = torch.randn(1, 1, 5, D)
    pos = torch.arange(5).float()
    angles = pos[:, None] * torch.tensor([theta ** (-2 * i / D) for i in range(D // 2)])  # (T, D/2)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag], dim=-1)
    freqs = pos[:, None] * rope_inv_freq(config)
    emb = torch.cat([freqs, freqs], -1)
    assert torch.allclose(apply_rope(x, emb.cos(), emb.sin()), expected, atol=1e-5)


def test_llama3_rope_scaling_matches_published_formula():
    # Llama 3.1's frequency rule, written per frequency as in Meta's reference code.
    s = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192)
    config = tiny_config(hidden_size=512, num_attention_heads=4, rope_theta=500000.0, rope_scaling=s)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    expected = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    got = rope_inv_freq(config)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6)
    assert (got < base).any() and (got == base).any()  # both regimes are exercised


def test_qwen2_has_and_uses_qkv_bias():
    model = Transformer(tiny_config(model_type="qwen2")).eval()
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "model.layers.0.self_attn.o_proj.bias" not in keys
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        before = model(ids)
        model.model.layers[0].self_attn.v_proj.bias.fill_(0.5)
        assert not torch.allclose(model(ids), before)


def test_sharded_checkpoint_loads_to_the_same_logits(tmp_path):
    model = Transformer(tiny_config(tie_word_embeddings=True)).eval()
    write_checkpoint(tmp_path / "one", model)
    write_checkpoint(tmp_path / "three", model, shards=3)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        one = Transformer.from_pretrained(tmp_path / "one")(ids)
        three = Transformer.from_pretrained(tmp_path / "three")(ids)
    assert torch.equal(one, three) and torch.equal(one, model(ids))
    loaded = Transformer.from_pretrained(tmp_path / "three")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


class Allocations(TorchDispatchMode):
    """Every tensor op while active: `made` lists (op, bytes) of each new storage on a real device
    (not meta, and not a view of an input), so bytes allocated and random inits can be counted."""

    def __init__(self):
        super().__init__()
        self.made, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        real = lambda t: isinstance(t, torch.Tensor) and t.device.type != "meta"
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if real(t)}
        for t in tree_leaves(out):
            if real(t):
                self.ops.append(func)
                if t.untyped_storage().data_ptr() not in inputs:
                    self.made.append((func, t.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_does_not_materialize_twice(tmp_path, dtype):
    # Counted op by op while loading an fp32 checkpoint: no parameter is initialized on a real
    # device (the model is built on meta), and the only allocations are one copy of the weights
    # in the target dtype (none for fp32: the tensors read from the file are kept), plus less than
    # 1 KiB for the rotary frequencies. The plain way (build with random weights, then load)
    # allocates at least one whole copy more.
    model = Transformer(tiny_config())
    write_checkpoint(tmp_path, model)
    one_copy = sum(v.numel() for v in model.state_dict().values()) * dtype.itemsize
    with Allocations() as plain:
        Transformer(tiny_config()).to(dtype).load_state_dict(load_file(tmp_path / "model.safetensors"))
    with Allocations() as ours:
        loaded = Transformer.from_pretrained(tmp_path, dtype=dtype)
    inits = {torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default, torch.ops.aten.ones.default}
    assert inits & set(plain.ops) and not inits & set(ours.ops)  # the check sees inits, and ours has none
    made = sum(n for _, n in ours.made)
    expected = one_copy if dtype != torch.float32 else 0
    assert expected <= made < expected + 1024, [(str(f), n) for f, n in ours.made if n >= 1024]
    assert sum(n for _, n in plain.made) - made >= one_copy  # what "twice" looks like: a whole copy more
    for k, v in loaded.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == dtype, k
        assert torch.equal(v, model.state_dict()[k].to(dtype)), k


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    model = Transformer(tiny_config())
    write_checkpoint(tmp_path / "ok", model)
    sd = load_file(tmp_path / "ok" / "model.safetensors")

    def variant(name, tensors):
        d = tmp_path / name
        write_checkpoint(d, model)
        save_file(tensors, d / "model.safetensors")
        return d

    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(variant("missing", {k: v for k, v in sd.items()
                                                        if k != "model.layers.1.mlp.up_proj.weight"}))
    with pytest.raises(CheckpointError, match="unexpected tensor extra.weight"):
        Transformer.from_pretrained(variant("extra", {**sd, "extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(3,\), expected \(64,\)"):
        Transformer.from_pretrained(variant("shape", {**sd, "model.norm.weight": torch.zeros(3)}))
    corrupt = tmp_path / "corrupt"
    write_checkpoint(corrupt, model)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Transformer.from_pretrained(corrupt)
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(corrupt)
    unknown = tmp_path / "ok" / "config.json"
    unknown.write_text(json.dumps({**json.loads(unknown.read_text()), "model_type": "falcon"}))
    with pytest.raises(CheckpointError, match="model_type 'falcon' is not supported"):
        Transformer.from_pretrained(tmp_path / "ok")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = Transformer(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 12))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_swiglu_keeps_two_tensors_and_gives_autograds_gradients():
    # SwiGLU.apply(g, u) = silu(g) * u with hand-written backward, against autograd (fp32, atol 1e-6)
    g, u = torch.randn(3, 7, 40, requires_grad=True), torch.randn(3, 7, 40, requires_grad=True)
    ours, plain = SwiGLU.apply(g, u), torch.nn.functional.silu(g) * u
    assert torch.equal(ours, plain)
    assert len(ours.grad_fn.saved_tensors) == 2  # autograd's version also keeps silu(g)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (g, u), grad), torch.autograd.grad(plain, (g, u), grad)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("use_dora, dtype", [(False, torch.float32), (True, torch.float32),
                                             (False, torch.bfloat16)])
def test_recipes_free_normed_inputs_and_swiglus_product_with_the_same_gradients(monkeypatch, use_dora, dtype):
    # Block.forward(recompute=True) keeps the LoRA inputs of q_proj (the normed x), gate_proj (the
    # normed y) and down_proj (SwiGLU's product) as recipes: once the loss is computed nothing holds
    # those tensors, where recompute=False holds all of them; the loss and every adapter gradient are
    # bit for bit the same (torch.equal; fp32, and a bf16 base with fp32 adapters as on a GPU)
    results, x = [], torch.randint(0, 128, (2, 12))
    for recompute in (True, False):
        monkeypatch.setattr(Block, "forward", partialmethod(ORIGINAL_BLOCK_FORWARD, recompute=recompute))
        model = tiny().to(dtype).train()
        apply_lora(model, r=4, alpha=8, target_modules="all-linear", use_dora=use_dora, verbose=False)
        randomize_B(model)
        inputs = []
        for block in model.model.layers:
            for layer in (block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.down_proj):
                layer.register_forward_hook(lambda layer, args, out: inputs.append(weakref.ref(args[0])))
        loss = model(x).logsumexp(-1).mean()
        held = [ref() is not None for ref in inputs]
        loss.backward()
        results.append((held, loss, [p.grad for p in model.parameters() if p.requires_grad]))
    (held, loss, grads), (held_plain, loss_plain, grads_plain) = results
    assert len(held) == 6 and not any(held) and all(held_plain)
    assert torch.equal(loss, loss_plain) and all(torch.equal(a, b) for a, b in zip(grads, grads_plain))


def test_doc_ids_keep_packed_examples_apart():
    # Two examples packed in one row (positions restarting) give the logits each gives alone.
    model = Transformer(tiny_config()).eval()
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, position_ids=pos, doc_ids=doc)
        assert torch.allclose(out[:, :5], model(a), atol=1e-5)
        assert torch.allclose(out[:, 5:], model(b), atol=1e-5)


def test_qwen3_config_spellings_agree():
    # Qwen3-0.6B's config.json as published (rope_theta, rope_scaling: null, head_dim 128 where
    # hidden_size / heads is 64), and the same config as transformers 5 writes it (rope_parameters)
    hub = dict(architectures=["Qwen3ForCausalLM"], attention_bias=False, head_dim=128, hidden_size=1024,
               intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28, model_type="qwen3",
               num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06,
               rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
               use_sliding_window=False, vocab_size=151936)
    ours = Config.from_dict(hub)
    assert ours.head_dim == 128 and ours.qk_norm and not ours.qkv_bias and ours.rope_scaling is None
    transformers = pytest.importorskip("transformers")
    written = transformers.Qwen3Config(**{k: v for k, v in hub.items() if k not in ("architectures", "model_type")})
    assert "rope_parameters" in written.to_dict()
    assert Config.from_dict(written.to_dict()) == ours
