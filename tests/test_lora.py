"""lora.py: the LoRA math, training only A and B, merging, several adapters, the PEFT file
format, refusing adapters that don't fit, QLoRA, DDP, and interop with PEFT on SmolLM2."""
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import (apply_lora, count_parameters, disable_adapters, lora_layers, merge_and_unload, merge_lora,
                      set_adapter, unmerge_lora)
from config import TrainConfig
from helpers import chat, hf_model, tiny_config, write_checkpoint, write_jsonl
from lora import AdapterSettings, LoRAError, LoRALinear
from model import Transformer
from peft_format import load_adapter, load_adapter_weights, save_adapter
import quant

BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw)).eval()


def ids(n=12, vocab=128):
    return torch.randint(0, vocab, (2, n))


def randomize_B(model, adapter="default", std=0.05):
    """A fresh adapter is a no-op (B = 0); give B values so the adapter does something."""
    with torch.no_grad():
        for _, m in lora_layers(model):
            if isinstance(m, LoRALinear) and adapter in m.lora_B:
                m.lora_B[adapter].weight.normal_(0, std)


def lora_model(**kw):
    model = tiny()
    apply_lora(model, verbose=False, **kw)
    randomize_B(model)
    return model


# --- the math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_fresh_adapter_is_the_base_model_exactly(targets):
    # logits before and after apply_lora: bitwise equal (B = 0 adds exact zeros)
    model, x = tiny(), ids()
    base = model(x)
    apply_lora(model, target_modules=targets, verbose=False)
    assert torch.equal(model(x), base)


def test_layer_computes_base_plus_scaled_BA():
    # one layer, by hand: base(x) + alpha/r * x A^T B^T (atol 1e-6, fp32)
    base = nn.Linear(16, 24)
    layer = LoRALinear(base)
    layer.add_adapter("a", AdapterSettings(r=4, alpha=8))
    layer.active = "a"
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (4, 16) and B.shape == (24, 4)
    x.requires_grad_(True)
    ours, plain = layer(x), base(x) + 2.0 * x @ A.T @ B.T
    assert torch.allclose(ours, plain, atol=1e-6)
    # and the gradients w.r.t. x, A and B (ours adds the update with one addmm; atol 1e-5)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, A, B), g), torch.autograd.grad(plain, (x, A, B), g)):
        assert torch.allclose(a, b, atol=1e-5)
    # A starts as nn.Linear's default init: uniform within 1/sqrt(in)
    assert A.abs().max() <= 1 / math.sqrt(16) and A.std() > 0.5 / math.sqrt(3 * 16)


def test_rslora_scaling():
    # scaling is alpha / r, or alpha / sqrt(r) with rsLoRA (exact floats)
    for use_rslora, expected in ((False, 16 / 4), (True, 16 / 2)):
        model = tiny()
        apply_lora(model, r=4, alpha=16, use_rslora=use_rslora, verbose=False)
        assert {m.settings["default"].scaling for _, m in lora_layers(model)} == {expected}


def test_only_A_and_B_train():
    # requires_grad is exactly the active adapter's A and B; after a backward, the frozen weights
    # have no gradient and an optimizer step over *all* parameters leaves them bit-identical.
    model = tiny()
    apply_lora(model, target_modules="all-linear", verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids()).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
        if n.endswith("lora_A.default.weight"):  # B = 0 at the start, so A's gradient is exactly 0
            assert not p.grad.any()
        if n.endswith("lora_B.default.weight"):
            assert p.grad.any()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_adapters_follow_the_model_train_eval_mode():
    # apply_lora on a model in eval mode: dropout off, two forwards bitwise equal; in train mode on
    model, x = lora_model(dropout=0.5), ids()
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_bf16_adapter_on_fp32_model():
    # adapter weights in bf16, activations in and out stay fp32; matches the fp32 math (atol 1e-2)
    model = tiny()
    apply_lora(model, dtype=torch.bfloat16, verbose=False)
    randomize_B(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    x = torch.randn(2, 64)
    out = layer(x)
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    assert out.dtype == torch.float32
    assert torch.allclose(out, layer.base(x) + 2.0 * x @ A.T @ B.T, atol=1e-2)


# --- merging --------------------------------------------------------------------------------------

def test_merge_unmerge_and_unload():
    model, x = lora_model(target_modules="all-linear"), ids()
    layer = model.model.layers[1].mlp.down_proj
    W = layer.base.weight.detach().clone()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = model(x)
    merge_lora(model)
    # W_merged = W + scaling * B @ A (atol 1e-6); merged logits = unmerged (atol 1e-5)
    assert torch.allclose(layer.base.weight, W + 2.0 * B @ A, atol=1e-6)
    assert layer.merged == "default"
    assert torch.allclose(model(x), out, atol=1e-5)
    W_merged = layer.base.weight.detach().clone()
    merge_lora(model)  # a second merge changes nothing (bitwise)
    assert torch.equal(layer.base.weight, W_merged)
    unmerge_lora(model)  # restores W (atol 1e-6) and the unmerged path
    assert torch.allclose(layer.base.weight, W, atol=1e-6) and layer.merged is None
    assert torch.allclose(model(x), out, atol=1e-5)
    # merge_and_unload: plain nn.Linear layers, Hugging Face key names, same logits (atol 1e-5)
    merge_and_unload(model)
    assert not lora_layers(model) and type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert set(model.state_dict()) == set(tiny().state_dict())
    assert torch.allclose(model(x), out, atol=1e-5)


def test_lm_head_adapter_merges_into_an_untied_copy(capsys):
    # lm_head shares its weight with the embedding table; merging an adapter of lm_head gives it
    # its own copy: the embeddings are untouched and the logits (|l| ~ 10) those of base + adapter (atol 1e-4)
    model = tiny(tie_word_embeddings=True)
    embeddings = model.model.embed_tokens.weight.clone()
    apply_lora(model, target_modules=["lm_head", "q_proj"], verbose=False)
    randomize_B(model)
    x = ids()
    with torch.no_grad():
        base = model(x)
        with disable_adapters(model):
            effect = (model(x) - base).abs().max()
        merge_and_unload(model)
        merged = model(x)
    assert "lm_head is untied from the embeddings" in capsys.readouterr().out
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert (merged - base).abs().max() < 1e-4 and effect > 1e-2


def test_merged_adapter_cannot_be_switched_or_disabled():
    model = lora_model()
    apply_lora(model, adapter_name="other", verbose=False)
    merge_lora(model)
    with pytest.raises(LoRAError, match="unmerge_lora first"):
        set_adapter(model, "default")
    with pytest.raises(LoRAError, match="unmerge_lora first"):
        with disable_adapters(model):
            pass


# --- targets and several adapters -----------------------------------------------------------------

def test_all_linear_targets_the_7_block_linears():
    model = tiny(tie_word_embeddings=False)
    apply_lora(model, target_modules="all-linear", verbose=False)
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 7 * 2
    for i in range(2):
        assert {n.rsplit(".", 1)[1] for n in names if f"layers.{i}." in n} == BLOCK_LINEARS
    assert type(model.lm_head) is nn.Linear


def test_unknown_target_lists_the_layers():
    with pytest.raises(LoRAError) as e:
        apply_lora(tiny(), target_modules=["q_proj", "qkv_proj"], verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and "'qkv_proj' matches no layer" in msg
    assert all(name in msg for name in BLOCK_LINEARS)


def test_trainable_summary_line(capsys):
    # PEFT's line: q_proj + v_proj on 2 layers, r=8: 2 * (8*64 + 64*8 + 8*64 + 32*8) = 3584
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model)
    assert count_parameters(model) == (3584, total + 3584)
    assert capsys.readouterr().out == (f"trainable params: 3,584 || all params: {total + 3584:,} || "
                                       f"trainable%: {100 * 3584 / (total + 3584):.4f}\n")


def test_several_adapters_set_adapter_and_disable():
    # Two adapters on the same model give, when active, the same logits (exactly) as each alone.
    x = ids()
    base = tiny()(x)
    alone = {}
    for name, kw in (("a", dict(r=4)), ("b", dict(r=8, target_modules="all-linear", use_rslora=True))):
        model = tiny()
        torch.manual_seed(1 if name == "a" else 2)
        apply_lora(model, verbose=False, **kw)
        randomize_B(model)
        alone[name] = (model(x), {n: p for n, p in model.state_dict().items() if "lora" in n})
    model = tiny()
    for name, kw in (("a", dict(r=4)), ("b", dict(r=8, target_modules="all-linear", use_rslora=True))):
        apply_lora(model, adapter_name=name, verbose=False, **kw)
    model.load_state_dict({n.replace(".default.", f".{name}."): p
                           for name, (_, sd) in alone.items() for n, p in sd.items()}, strict=False)
    assert model.model.layers[0].self_attn.q_proj.active == "b"  # the last added is active
    assert torch.equal(model(x), alone["b"][0])
    set_adapter(model, "a")
    assert torch.equal(model(x), alone["a"][0])
    # only the active adapter trains; layers without it (k_proj...) compute as the base
    assert all("lora_A.a." in n or "lora_B.a." in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.model.layers[0].self_attn.k_proj.active is None
    with disable_adapters(model):  # the base model, exactly
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), alone["a"][0])  # and back
    with pytest.raises(LoRAError, match="no adapter named 'c'"):
        set_adapter(model, "c")
    with pytest.raises(LoRAError, match="already has an adapter named 'a'"):
        apply_lora(model, adapter_name="a", verbose=False)


# --- the PEFT format on disk ----------------------------------------------------------------------

def test_save_writes_peft_files(tmp_path):
    model = lora_model(r=4, alpha=8, dropout=0.1, target_modules=["v_proj", "q_proj"])
    save_adapter(model, tmp_path, base_model_name_or_path="org/base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
                    for i in range(2) for p in "qv" for ab in "AB"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path="org/base", revision=None, r=4,
        lora_alpha=8, lora_dropout=0.1, use_rslora=False, target_modules=["q_proj", "v_proj"], bias="none",
        fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None, use_dora=False,
        layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})


def test_save_load_round_trip(tmp_path):
    # a fresh base + load_adapter gives bitwise the logits of the trained model
    model, x = lora_model(r=4, alpha=8, target_modules="all-linear", use_rslora=True), ids()
    save_adapter(model, tmp_path)
    other = tiny()
    config = load_adapter(other, tmp_path)
    assert config["use_rslora"] and config["r"] == 4
    assert torch.equal(other(x), model(x))
    # resuming: load_adapter_weights copies into an existing adapter of the same shape
    resumed = tiny()
    apply_lora(resumed, r=4, alpha=8, target_modules="all-linear", use_rslora=True, verbose=False)
    load_adapter_weights(resumed, tmp_path)
    assert torch.equal(resumed(x), model(x))
    different = tiny()
    apply_lora(different, r=4, alpha=8, use_rslora=True, verbose=False)
    with pytest.raises(LoRAError, match="its layers differ"):
        load_adapter_weights(different, tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    # a crash while writing leaves the previous adapter intact and no temporary folder behind
    model = lora_model()
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_B(model)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def write_adapter(path, model, **config_changes):
    save_adapter(model, path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return path


def test_mismatched_adapters_are_refused(tmp_path):
    wider = tiny(hidden_size=96, num_attention_heads=4)
    apply_lora(wider, verbose=False)
    path = write_adapter(tmp_path / "wider", wider)
    with pytest.raises(LoRAError) as e:
        load_adapter(tiny(), path)
    assert str(e.value) == (f"{path / 'adapter_model.safetensors'}: base_model.model.model.layers.0.self_attn."
                            "q_proj.lora_A.weight has shape (8, 96) but this model needs (8, 64) "
                            "(an adapter for another base?)")

    deeper = tiny(num_hidden_layers=3)  # layers.2 does not exist in a 2-layer model
    apply_lora(deeper, verbose=False)
    path = write_adapter(tmp_path / "deeper", deeper)
    with pytest.raises(LoRAError, match=r"adapter_model.safetensors: unexpected tensor base_model.model.model.layers.2."
                                        r"self_attn.q_proj.lora_A.weight: this model has no layer"):
        load_adapter(tiny(), path)

    for change, match in ((dict(modules_to_save=["lm_head"]), "modules_to_save=.* is not supported"),
                          (dict(bias="lora_only"), "bias='lora_only' is not supported"),
                          (dict(peft_type="IA3"), "peft_type 'IA3' is not LORA")):
        path = write_adapter(tmp_path / "changed", lora_model(), **change)
        with pytest.raises(LoRAError, match=f"adapter_config.json: {match}"):
            load_adapter(tiny(), path)

    # a config saying DoRA over a file without magnitudes, and the other way round
    path = write_adapter(tmp_path / "no-magnitudes", lora_model(), use_dora=True)
    with pytest.raises(LoRAError, match="adapter_model.safetensors: model.layers.0.self_attn.q_proj has no "
                                        "lora_magnitude_vector"):
        load_adapter(tiny(), path)
    path = write_adapter(tmp_path / "magnitudes", lora_model(use_dora=True), use_dora=False)
    with pytest.raises(LoRAError, match=r"unexpected tensor .*q_proj.lora_magnitude_vector \(use_dora=False; "):
        load_adapter(tiny(), path)

    path = tmp_path / "extra"
    save_adapter(lora_model(), path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 64)  # a base weight: never loaded
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(LoRAError, match="unexpected tensor base_model.model.lm_head.weight"):
        load_adapter(tiny(), path)

    # PEFT saves the base lm_head beside an adapter of it: this model's own is accepted, another refused
    head = tiny(tie_word_embeddings=True)
    apply_lora(head, target_modules=["lm_head"], verbose=False)
    path = write_adapter(tmp_path / "head", head)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"] = tiny(tie_word_embeddings=True).lm_head.weight.detach()
    save_file(tensors, path / "adapter_model.safetensors")
    load_adapter(tiny(tie_word_embeddings=True), path)
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(128, 64)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(LoRAError, match="lm_head.base_layer.weight differs from this model's lm_head"):
        load_adapter(tiny(tie_word_embeddings=True), path)

    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(tiny(), tmp_path / "missing")
    model = tiny()
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)  # a refused adapter leaves the model untouched


# --- QLoRA, DDP, gradient checkpointing -----------------------------------------------------------

def test_qlora_trains_merges_and_loads(tmp_path, capsys):
    model, x = tiny(), ids()
    total = count_parameters(model)[1]
    quant.quantize_model(model)
    apply_lora(model, target_modules="all-linear", verbose=False)
    assert count_parameters(model)[1] == total + count_parameters(model)[0]  # NF4 weights count as in*out
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    randomize_B(model)
    save_adapter(model, tmp_path)
    out = model(x)
    # loading onto another NF4 model: bitwise the same logits
    other = quant.quantize_model(tiny())
    load_adapter(other, tmp_path)
    assert torch.equal(other(x), out)
    # merging dequantizes each NF4 layer into an nn.Linear (same logits, atol 1e-5); unmerging can't
    capsys.readouterr()
    merge_lora(model)
    assert capsys.readouterr().out == "merge_lora: dequantized 14 NF4 layers to torch.float32 to merge into them\n"
    assert type(model.model.layers[0].self_attn.q_proj.base) is nn.Linear
    assert torch.allclose(model(x), out, atol=1e-5)
    with pytest.raises(LoRAError, match="cannot unmerge model.layers.0.self_attn.q_proj: its NF4 weight"):
        unmerge_lora(model)


def quantized_and_dequantized():
    """A tiny model with NF4 linear layers, and a plain one holding their dequantized weights."""
    qmodel = quant.quantize_model(tiny())
    plain = tiny()
    plain.load_state_dict(plain.state_dict() | {f"{n}.weight": m.dequantize(torch.float32)
                                                for n, m in qmodel.named_modules() if hasattr(m, "dequantize")})
    return qmodel, plain


def test_qlora_equals_lora_on_the_dequantized_weights():
    # the NF4 base computes with its dequantized weight, so LoRA over NF4 == LoRA over a plain
    # model holding the dequantized weights: logits and A/B gradients agree (fp32, atol 1e-5)
    qmodel, plain = quantized_and_dequantized()
    x, results = ids(), []
    for model in (qmodel, plain):
        torch.manual_seed(3)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
        randomize_B(model)
        out = model(x)
        out.logsumexp(-1).mean().backward()
        results.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    (q_out, q_grads), (p_out, p_grads) = results
    assert torch.allclose(q_out, p_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(q_grads, p_grads))


def test_merge_and_unload_leaves_untargeted_nf4_layers_alone():
    # targeted layers become nn.Linear (merged), the others stay NF4; same logits (atol 1e-5)
    model, x = quant.quantize_model(tiny()), ids()
    apply_lora(model, target_modules=["q_proj", "down_proj"], verbose=False)
    randomize_B(model)
    out = model(x)
    merge_and_unload(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.k_proj) is quant.NF4Linear
    assert torch.allclose(model(x), out, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    # non-reentrant checkpointing with dropout 0.1: same loss and LoRA gradients (atol 1e-6),
    # since the recomputed forward replays the same dropout masks
    grads = []
    for checkpointing in (False, True):
        model = lora_model(dropout=0.1).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(3)
        model(ids()).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_ddp_trains_and_saves_peft_names(tmp_path):
    # one-process gloo group: DDP gives the same LoRA gradients as no DDP (atol 1e-6), and saving
    # the model inside the wrapper (as train.py does) writes PEFT's names (no "module.")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        x, grads = ids(), []
        for wrap in (False, True):
            model = lora_model().train()
            net = nn.parallel.DistributedDataParallel(model) if wrap else model
            net(x).logsumexp(-1).mean().backward()
            grads.append([p.grad for p in model.parameters() if p.requires_grad])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
        save_adapter(model, tmp_path / "adapter")
        assert all(k.startswith("base_model.model.model.layers.")
                   for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    finally:
        dist.destroy_process_group()


# --- interop with PEFT on a real checkpoint -------------------------------------------------------

@pytest.fixture
def hf_base(smollm2):
    pytest.importorskip("peft", reason="peft is needed to compare with PEFT")
    transformers = pytest.importorskip("transformers", reason="transformers is needed to compare with PEFT")

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return load


def test_our_adapter_loads_in_peft(smollm2, hf_base, tmp_path):
    # saved here, loaded by PeftModel.from_pretrained with no warning from PEFT: same logits
    # (fp32, atol 1e-4); the same trainable / all parameter counts as PEFT's
    from peft import PeftModel

    ours = Transformer.from_pretrained(smollm2)
    apply_lora(ours, r=8, alpha=16, target_modules=["q_proj", "v_proj"], verbose=False)
    randomize_B(ours, std=0.02)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(smollm2))
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(hf_base(), tmp_path, is_trainable=True).eval()
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters() == (460_800, 134_975_808)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x), theirs(x).logits
        with disable_adapters(ours), theirs.disable_adapter():
            ours_base, theirs_base = ours(x), theirs(x).logits
    assert (ours_base - theirs_base).abs().max() < 1e-4  # the base models agree
    assert (ours_logits - ours_base).abs().max() > 1e-2  # the adapter changes the logits...
    assert (ours_logits - theirs_logits).abs().max() < 1e-4  # ...identically in both


def test_our_lm_head_adapter_loads_in_peft(smollm2, hf_base, tmp_path):
    # an adapter of the tied lm_head (and q_proj), saved here: same logits in PEFT (fp32, atol 1e-4)
    from peft import PeftModel

    ours = Transformer.from_pretrained(smollm2)
    apply_lora(ours, r=4, alpha=8, target_modules=["lm_head", "q_proj"], verbose=False)
    randomize_B(ours, std=0.02)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(hf_base(), tmp_path).eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x), theirs(x).logits
        with disable_adapters(ours):
            effect = (ours(x) - ours_logits).abs().max()
    assert (ours_logits - theirs_logits).abs().max() < 1e-4 and effect > 1e-2


@pytest.mark.parametrize("peft_config, n_layers", [
    (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 60),
    (dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True), 210),
    (dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), 31),  # lm_head tied to the embeddings
])
def test_peft_adapter_loads_here(smollm2, hf_base, tmp_path, peft_config, n_layers):
    # made and saved by PEFT with random nonzero A and B: same logits here (fp32, atol 1e-4)
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(hf_base(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                  **peft_config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(smollm2)
    load_adapter(ours, tmp_path)
    assert len(lora_layers(ours)) == n_layers
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max()
        with disable_adapters(ours):
            effect = (ours(x) - theirs(x).logits).abs().max()
    assert diff < 1e-4 and effect > 1e-2  # the adapter changes the logits, identically in both


def test_qlora_on_smollm2_learns(smollm2):
    # QLoRA on the real model (NF4 base, bf16 compute, fp32 adapters): 4 AdamW steps on one
    # sentence lower its loss, and the NF4 buffers stay bit-identical
    from tokenizer import Tokenizer

    text = ("The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair "
            "and is one of the most visited monuments in the world.")
    x = torch.tensor([Tokenizer(smollm2).encode(text)])
    model = Transformer.from_pretrained(smollm2, dtype=torch.bfloat16, quantize="nf4")
    apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
    model.train()
    frozen = {n: b.clone() for n, b in model.named_parameters() if "packed" in n or "absmax" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert frozen and all(torch.equal(b, frozen[n]) for n, b in model.named_parameters() if n in frozen)


# --- DoRA -----------------------------------------------------------------------------------------

def peft_dora_layer(base, r=4, alpha=8, dropout=0.0, bias=False):
    """PEFT's own DoRA layer around a copy of `base`, with random A, B and magnitude."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True, init_lora_weights=False)
    layer = PeftLinear(copy.deepcopy(base), "default", config, r=r, lora_alpha=alpha, lora_dropout=dropout,
                       use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(base.out_features))
    return layer


def our_copy_of(peft_layer, base, dropout=0.0):
    from dora import DoRALinear

    ours = DoRALinear(base)
    ours.add_adapter("default", AdapterSettings(r=4, alpha=8, dropout=dropout, use_dora=True))
    ours.active = "default"
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(peft_layer.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].copy_(peft_layer.lora_magnitude_vector["default"].weight)
    return ours


@pytest.mark.parametrize("dropout, bias", [(0.0, True), (0.3, False)])
def test_dora_layer_equals_peft(dropout, bias):
    # One layer, training mode: ours and PEFT's use_dora=True layer give the same output and the
    # same gradients for x, A, B and the magnitude (fp32, atol 1e-6 + rtol 1e-5: the sums are
    # grouped differently), with dropout too (PEFT then recomputes W x on the dropped input, and
    # so do we: same seed, same masks)
    pytest.importorskip("peft", reason="peft is the reference for DoRA")
    base = nn.Linear(16, 24, bias=bias)
    theirs = peft_dora_layer(base, dropout=dropout).train()
    ours = our_copy_of(theirs, base, dropout).train()
    # m starts as the row norms of W (+ s B A); here both hold the same perturbed m
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    out_theirs = theirs(x)
    torch.manual_seed(7)
    out_ours = ours(x)
    assert torch.allclose(out_ours, out_theirs, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out_ours)
    ours_params = [ours.lora_A["default"].weight, ours.lora_B["default"].weight, ours.lora_magnitude_vector["default"]]
    theirs_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                     theirs.lora_magnitude_vector["default"].weight]
    for a, b in zip(torch.autograd.grad(out_ours, [x] + ours_params, g),
                    torch.autograd.grad(out_theirs, [x] + theirs_params, g)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dora_by_hand_and_fresh_magnitude():
    # the paper's formula, written out: m * (W + sBA) / ||W + sBA||_row, plus bias (atol 1e-6);
    # a fresh DoRA adapter starts at m = ||W||_row and B = 0: the base layer exactly (bitwise in eval)
    from dora import DoRALinear

    base = nn.Linear(16, 24)
    layer = DoRALinear(base)
    layer.add_adapter("a", AdapterSettings(r=4, alpha=8, use_dora=True))
    layer.active = "a"
    x = torch.randn(3, 16)
    assert torch.allclose(layer.lora_magnitude_vector["a"], base.weight.norm(dim=1), atol=0, rtol=0)
    assert torch.allclose(layer(x), base(x), atol=1e-6)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
        layer.lora_magnitude_vector["a"].mul_(1.5)
    V = base.weight + 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    W = layer.lora_magnitude_vector["a"][:, None] * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ W.T + base.bias, atol=1e-5)


def test_dora_trains_A_B_and_magnitude_merges_and_unmerges():
    # DoRA's trainable tensors are A, B and m; merged logits equal unmerged (atol 1e-5), unmerge
    # restores W (atol 1e-6); the merged weight is m * V / ||V||_row (atol 1e-6)
    model, x = tiny(), ids()
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", use_dora=True, verbose=False)
    randomize_B(model)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude_vector["default"]))
    trainable = {part for n, p in model.named_parameters() if p.requires_grad
                 for part in n.split(".") if part.startswith("lora_")}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    layer = model.model.layers[0].mlp.up_proj
    W = layer.base.weight.detach().clone()
    V = W + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    with torch.no_grad():
        out = model(x)
        merge_lora(model)
        m = layer.lora_magnitude_vector["default"]
        assert torch.allclose(layer.base.weight, m[:, None] * V / V.norm(dim=1, keepdim=True), atol=1e-6)
        assert (model(x) - out).abs().max() < 1e-5
        unmerge_lora(model)
        assert torch.allclose(layer.base.weight, W, atol=1e-6)
        assert (model(x) - out).abs().max() < 1e-5
        merge_and_unload(model)
        assert (model(x) - out).abs().max() < 1e-5


def test_dora_and_lora_adapters_switch_on_one_model(tmp_path):
    # a LoRA adapter and a DoRA adapter on the same layers: each, when active, gives the logits
    # it gives alone (bitwise), saves with use_dora as it is, and merges and unmerges in turn
    x = ids()
    model = lora_model(r=4, alpha=8)
    lora_out = model(x)
    apply_lora(model, r=4, alpha=8, use_dora=True, adapter_name="d", verbose=False)
    randomize_B(model, "d")
    from dora import DoRALinear
    assert isinstance(model.model.layers[0].self_attn.q_proj, DoRALinear)
    dora_out = model(x)
    save_adapter(model, tmp_path / "d", adapter_name="d")
    save_adapter(model, tmp_path / "l", adapter_name="default")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "l" / "adapter_config.json").read_text())["use_dora"] is False
    assert not any("magnitude" in k for k in load_file(tmp_path / "l" / "adapter_model.safetensors"))
    set_adapter(model, "default")
    assert torch.equal(model(x), lora_out)
    other = tiny()
    load_adapter(other, tmp_path / "d")
    assert torch.equal(other(x), dora_out)
    with torch.no_grad():
        for name, expected in (("d", dora_out), ("default", lora_out)):
            set_adapter(model, name)
            merge_lora(model)
            assert (model(x) - expected).abs().max() < 1e-5
            unmerge_lora(model)


def test_dora_file_format(tmp_path):
    # PEFT's keys: <module>.lora_magnitude_vector (no ".weight"), shape (out,), use_dora: true
    model = lora_model(r=4, alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"].shape == (32,)
    assert len(tensors) == 2 * 2 * 3
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    other, x = tiny(), ids()
    load_adapter(other, tmp_path)
    assert torch.equal(other(x), model(x))


def test_qlora_dora_equals_dora_on_the_dequantized_weights():
    # DoRA over an NF4 base takes the norm of the dequantized weight: logits and gradients equal
    # DoRA over a plain model holding the dequantized weights (fp32, atol 1e-5)
    qmodel, plain = quantized_and_dequantized()
    x, results = ids(), []
    for model in (qmodel, plain):
        torch.manual_seed(3)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear", use_dora=True, verbose=False)
        randomize_B(model)
        out = model(x)
        out.logsumexp(-1).mean().backward()
        results.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    (q_out, q_grads), (p_out, p_grads) = results
    assert torch.allclose(q_out, p_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(q_grads, p_grads))
    with torch.no_grad():  # merging goes into the dequantized weight
        merge_lora(qmodel)
        assert (qmodel(x) - q_out).abs().max() < 1e-5


def train_steps(model, x, steps=3, lr=1e-2):
    """A few AdamW steps of next-token loss on x, on whatever requires grad (ours or PEFT's)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_dora_round_trips_with_peft_after_training(smollm2, hf_base, tmp_path):
    # SmolLM2, DoRA on q/v/down_proj, 3 AdamW steps (A, B and m all move): trained here and
    # loaded in PEFT, and trained in PEFT and loaded here, give the same logits (fp32, atol 1e-4)
    from peft import LoraConfig, PeftModel, get_peft_model

    x = torch.randint(0, 49152, (1, 24))
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = Transformer.from_pretrained(smollm2)
    apply_lora(ours, r=4, alpha=8, target_modules=targets, use_dora=True, verbose=False)
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    train_steps(ours, x)
    assert all(not torch.equal(p, start[n]) for n, p in ours.named_parameters() if n in start)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(hf_base(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4

    theirs = get_peft_model(hf_base(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    train_steps(theirs, x)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = Transformer.from_pretrained(smollm2)
    load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max()
        with disable_adapters(ours):
            effect = (ours(x) - theirs(x).logits).abs().max()
    assert diff < 1e-4 and effect > 1e-2


# --- LoRA on the token embeddings -----------------------------------------------------------------

def tied_hf_and_ours(tmp_path):
    """A random tiny Llama with tied embeddings, from transformers, and ours loaded from its files."""
    hf = hf_model("smollm2")  # tie_word_embeddings=True
    hf.save_pretrained(tmp_path / "base")
    return hf, Transformer.from_pretrained(tmp_path / "base")


def test_embedding_adapter_round_trips_with_peft(tmp_path):
    # LoRA on embed_tokens (and q_proj) of a tied model, both ways with PEFT: same logits (fp32,
    # atol 1e-4). PEFT's keys: lora_embedding_A (r, vocab), lora_embedding_B (dim, r); PEFT also
    # saves the base embedding table beside them, accepted here since it is this model's own.
    # As in PEFT, the adapter changes the input embeddings only; the tied lm_head reads the
    # original table.
    pytest.importorskip("peft", reason="peft is the reference for embedding adapters")
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    hf, ours = tied_hf_and_ours(tmp_path)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        base = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about tied embeddings in the adapter
        theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                               init_lora_weights=False)).eval()
        theirs.save_pretrained(tmp_path / "theirs")
    tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (72, 4)
    load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4 and (ours(x) - base).abs().max() > 1e-2
        assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied: lm_head is not adapted

    mine = Transformer.from_pretrained(tmp_path / "base")
    apply_lora(mine, r=4, alpha=8, target_modules=["embed_tokens"], verbose=False)
    with torch.no_grad():
        assert torch.equal(mine(x), base)  # A starts at zero (B random, as PEFT)
        mine.model.embed_tokens.lora_embedding_A["default"].normal_()
    save_adapter(mine, tmp_path / "mine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tied_hf_and_ours(tmp_path / "again")[0], tmp_path / "mine").eval()
    with torch.no_grad():
        assert (mine(x) - theirs(x).logits).abs().max() < 1e-4


def test_embedding_adapter_merges_into_an_untied_copy(tmp_path, capsys):
    # Merging an embedding adapter of a tied model unties lm_head first: merged logits equal the
    # unmerged ones (atol 1e-4) and lm_head keeps the original table. PEFT's merge_and_unload
    # writes into the shared table, so its lm_head changes too and its merged logits differ from
    # its own unmerged ones (by far more than 1): there PEFT is wrong and we are not.
    pytest.importorskip("peft", reason="peft shows the other behaviour")
    import warnings

    from peft import LoraConfig, get_peft_model

    hf, ours = tied_hf_and_ours(tmp_path)
    table = ours.model.embed_tokens.weight.detach().clone()
    x = torch.randint(0, 128, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                               init_lora_weights=False)).eval()
        theirs.save_pretrained(tmp_path / "theirs")
        load_adapter(ours, tmp_path / "theirs")
        with torch.no_grad():
            unmerged, theirs_unmerged = ours(x), theirs(x).logits
            merge_and_unload(ours)
            theirs_merged = theirs.merge_and_unload()(x).logits
            merged = ours(x)
    assert "changes model.embed_tokens, so lm_head is untied" in capsys.readouterr().out
    assert (merged - unmerged).abs().max() < 1e-4 and torch.equal(ours.lm_head.weight, table)
    assert not ours.config.tie_word_embeddings and type(ours.model.embed_tokens) is nn.Embedding
    assert (theirs_merged - theirs_unmerged).abs().max() > 1.0


def test_merge_py_merges_dora_and_embedding_adapters(tmp_path, capsys):
    # merge.py on a tied tiny base with a DoRA adapter of the blocks and, separately, an adapter
    # of the embeddings: each merged checkpoint gives the adapted model's logits (fp32, atol 1e-4);
    # the embedding one unties lm_head (config.json says so) and keeps lm_head's original table
    from merge import merge
    base = tmp_path / "base"
    model = tiny(tie_word_embeddings=True)
    write_checkpoint(base, model)
    x = ids()
    for name, kw in (("dora", dict(target_modules="all-linear", use_dora=True)),
                     ("embed", dict(target_modules=["embed_tokens", "v_proj"]))):
        adapted = Transformer.from_pretrained(base)
        apply_lora(adapted, r=4, alpha=8, verbose=False, **kw)
        randomize_B(adapted)
        with torch.no_grad():
            for _, m in lora_layers(adapted):
                for t in m.adapter_tensors("default").values():
                    t.mul_(1 + 0.1 * torch.randn_like(t))  # m, and the embeddings' A, away from their start
            expected = adapted(x)
            assert (expected - model(x)).abs().max() > 1e-2
        save_adapter(adapted, tmp_path / name)
        out = merge(base, tmp_path / name, tmp_path / f"merged-{name}")
        with torch.no_grad():
            assert (Transformer.from_pretrained(out)(x) - expected).abs().max() < 1e-4
        tied = json.loads((out / "config.json").read_text())["tie_word_embeddings"]
        assert tied is (name == "dora")
        if name == "embed":
            with safe_open(out / "model.safetensors", "pt") as f:
                assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight)


def test_train_py_use_dora_trains_and_saves_a_dora_adapter(tiny_checkpoint, tmp_path):
    # train.py --use_dora, the embeddings included: the loss falls, the saved adapter says
    # use_dora and holds magnitudes, (dim,) for the embeddings
    import train
    rows = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40}") for i in range(8)]
    out = tmp_path / "out"
    cfg = TrainConfig(model_path=str(tiny_checkpoint), data_path=str(write_jsonl(tmp_path / "t.jsonl", rows)),
                      output_dir=str(out), lora_r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                      target_modules="q_proj,v_proj,embed_tokens", learning_rate=1e-2, warmup_steps=0,
                      micro_batch_size=4, effective_batch_size=4, max_steps=6, save_every=0, seed=0)
    train.train(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (64,)


def test_qwen3_peft_adapter_loads_here_and_qlora_runs(tmp_path):
    # A tiny random Qwen3 (q_norm/k_norm, own head_dim) from transformers: PEFT's all-linear
    # adapter (its names: q_proj ... down_proj) loads here with the same logits (fp32, atol 1e-4);
    # with an NF4 base, q_norm/k_norm stay full precision and LoRA trains
    pytest.importorskip("peft", reason="peft names the Qwen3 targets")
    from peft import LoraConfig, get_peft_model
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path / "base")
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = Transformer.from_pretrained(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(ours)} == BLOCK_LINEARS
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    qlora = Transformer.from_pretrained(tmp_path / "base", quantize="nf4")
    assert type(qlora.model.layers[0].self_attn.q_norm.weight) is nn.Parameter
    apply_lora(qlora, r=4, alpha=8, target_modules="all-linear", use_dora=True, verbose=False)
    qlora(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in qlora.parameters() if p.requires_grad)


def test_dora_layer_on_a_bf16_base_equals_peft():
    # a bf16 base with fp32 adapters (as get_peft_model and apply_lora make them): the same output
    # as PEFT's DoRA layer, up to one bf16 rounding (rtol 1e-2), and gradients of A, B and m
    # within 1e-2 relative to their largest entry
    pytest.importorskip("peft", reason="peft is the reference for DoRA")
    base = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    theirs = peft_dora_layer(base)
    for d in (theirs.lora_A, theirs.lora_B, theirs.lora_magnitude_vector):
        d.float()
    ours = our_copy_of(theirs, base)
    assert ours.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.dtype == out_theirs.dtype == torch.bfloat16
    assert torch.allclose(out_ours.float(), out_theirs.float(), rtol=1e-2, atol=1e-2)
    g = torch.randn_like(out_ours)
    ours_params = [ours.lora_A["default"].weight, ours.lora_B["default"].weight, ours.lora_magnitude_vector["default"]]
    theirs_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                     theirs.lora_magnitude_vector["default"].weight]
    for a, b in zip(torch.autograd.grad(out_ours, ours_params, g), torch.autograd.grad(out_theirs, theirs_params, g)):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_qlora_dora_layer_equals_peft_on_bitsandbytes_nf4():
    # QLoRA-DoRA: our DoRALinear over quant.NF4Linear against PEFT's DoRA over bitsandbytes'
    # Linear4bit (NF4, double quantization, fp32 compute) made from the same weight: the same
    # output and gradients of A, B and m (atol 1e-5): both take the norm of the dequantized weight
    pytest.importorskip("peft", reason="peft is the reference for DoRA")
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    import quant
    from dora import DoRALinear

    lin = nn.Linear(64, 48)
    q = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    theirs = PeftLinear4bit(q, "default", config=config, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    ours = DoRALinear(quant.NF4Linear.from_linear(lin))
    ours.add_adapter("default", AdapterSettings(r=4, alpha=8, use_dora=True))
    ours.active = "default"
    pairs = [(ours.lora_A["default"].weight, theirs.lora_A["default"].weight),
             (ours.lora_B["default"].weight, theirs.lora_B["default"].weight),
             (ours.lora_magnitude_vector["default"], theirs.lora_magnitude_vector["default"].weight)]
    with torch.no_grad():
        for a, b in pairs:
            a.copy_(b)
    x = torch.randn(3, 64)
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - out_theirs).abs().max() < 1e-5
    g = torch.randn_like(out_ours)
    for a, b in zip(torch.autograd.grad(out_ours, [a for a, _ in pairs], g),
                    torch.autograd.grad(out_theirs, [b for _, b in pairs], g)):
        assert (a - b).abs().max() < 1e-5


def test_dora_embedding_round_trips_with_peft_and_merges(tmp_path):
    # DoRA on embed_tokens (m: one number per embedding dimension, norms down the vocabulary) and
    # q_proj of a tied model: PEFT's adapter loads here and ours in PEFT with the same logits (fp32,
    # atol 1e-4); merged (lm_head untied first) the logits stay those of the adapter (atol 1e-4)
    pytest.importorskip("peft", reason="peft is the reference for DoRA")
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    hf, ours = tied_hf_and_ours(tmp_path)
    x = torch.randint(0, 128, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                               use_dora=True, init_lora_weights=False)).eval()
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "magnitude" in n:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "theirs" / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (72,)
    load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(x).logits
        assert (ours(x) - expected).abs().max() < 1e-4
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(tied_hf_and_ours(tmp_path / "again")[0], tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(x).logits - expected).abs().max() < 1e-4
        table = ours.model.embed_tokens.weight.clone()
        merge_lora(ours)
        assert (ours(x) - expected).abs().max() < 1e-4
        unmerge_lora(ours)  # restores the table up to fp32 rounding of W + delta (|delta| up to ~10 here): atol 1e-5
        assert torch.allclose(ours.model.embed_tokens.weight, table, atol=1e-5)
        merge_and_unload(ours)
        assert (ours(x) - expected).abs().max() < 1e-4
