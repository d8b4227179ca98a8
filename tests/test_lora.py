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

from conftest import tiny_config
from lora import (LoRAError, LoRALinear, apply_lora, count_parameters, disable_adapters, load_adapter,
                  load_adapter_weights, lora_layers, merge_and_unload, merge_lora, save_adapter, set_adapter,
                  unmerge_lora)
from model import Transformer

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
            if adapter in m.lora_B:
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
    layer.add_adapter("a", r=4, alpha=8)
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
        assert {m.scaling["default"] for _, m in lora_layers(model)} == {expected}


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
    with pytest.raises(LoRAError, match=r"adapter_model.safetensors: base_model.model.model.layers.2.self_attn."
                                        r"q_proj.lora_A.weight: this model has no linear layer"):
        load_adapter(tiny(), path)

    for change, match in ((dict(use_dora=True), "use_dora=True is not supported"),
                          (dict(modules_to_save=["lm_head"]), "modules_to_save=.* is not supported"),
                          (dict(bias="lora_only"), "bias='lora_only' is not supported"),
                          (dict(peft_type="IA3"), "peft_type 'IA3' is not LORA")):
        path = write_adapter(tmp_path / "changed", lora_model(), **change)
        with pytest.raises(LoRAError, match=f"adapter_config.json: {match}"):
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
    quant = pytest.importorskip("quant")
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


def test_qlora_equals_lora_on_the_dequantized_weights():
    # the NF4 base computes with its dequantized weight, so LoRA over NF4 == LoRA over a plain
    # model holding the dequantized weights: logits and A/B gradients agree (fp32, atol 1e-5)
    quant = pytest.importorskip("quant")
    qmodel = quant.quantize_model(tiny())
    plain = tiny()
    plain.load_state_dict(plain.state_dict() | {f"{n}.weight": m.dequantize(torch.float32)
                                                for n, m in qmodel.named_modules() if hasattr(m, "dequantize")})
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
    quant = pytest.importorskip("quant")
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


def test_ddp_trains_and_saves_the_unwrapped_names(tmp_path):
    # one-process gloo group: DDP gives the same LoRA gradients as no DDP (atol 1e-6), and saving
    # through the wrapper writes PEFT's names (no "module.")
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
        save_adapter(net, tmp_path / "adapter")
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
