"""lora.py and adapters.py: the LoRA math, training only A and B, merging, several adapters,
LoRA on the embeddings, QLoRA, DDP and gradient checkpointing."""
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from adapters import (apply_lora, count_parameters, disable_adapters, lora_layers, merge_and_unload, merge_lora,
                      set_adapter, unmerge_lora)
from helpers import (BLOCK_LINEARS, adapted_on_nf4_and_dequantized, ids, lora_model, randomize_B, tied_hf_and_ours,
                     tiny)
from lora import AdapterSettings, LoRAError, LoRALinear
from model import Transformer
from peft_format import load_adapter, save_adapter
import quant


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


def test_qlora_equals_lora_on_the_dequantized_weights():
    # the NF4 base computes with its dequantized weight, so LoRA over NF4 == LoRA over a plain
    # model holding the dequantized weights: logits and A/B gradients agree (fp32, atol 1e-5)
    _, _, results = adapted_on_nf4_and_dequantized()
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


def test_qlora_in_bf16_learns_and_keeps_the_nf4_base(tiny_checkpoint):
    # QLoRA as loaded from a checkpoint (NF4 base, bf16 compute, fp32 adapters): 4 AdamW steps on
    # one sentence lower its loss, and the NF4 buffers stay bit-identical. (That LoRA teaches the
    # real model new facts: test_train.py's test_real_model_learns_invented_facts.)
    from tokenizer import Tokenizer

    text = " ".join(f"w{7 * i % 100}" for i in range(40))
    x = torch.tensor([Tokenizer(tiny_checkpoint).encode(text)])
    model = Transformer.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "NF4Linear"
    apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
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
