"""dora.py: DoRA layers against PEFT (fp32, bf16, bitsandbytes NF4), by hand, training,
merging, switching with LoRA adapters, the file format, and on the embeddings."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from adapters import apply_lora, disable_adapters, lora_layers, merge_and_unload, merge_lora, set_adapter, unmerge_lora
from helpers import adapted_on_nf4_and_dequantized, ids, load_hf, lora_model, randomize_B, tied_hf_and_ours, tiny
from lora import AdapterSettings
from model import Transformer
from peft_format import load_adapter, save_adapter


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
    qmodel, x, results = adapted_on_nf4_and_dequantized(use_dora=True)
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


def test_dora_round_trips_with_peft_after_training(hf_base, tmp_path):
    # A tiny SmolLM2-shaped base, DoRA on q/v/down_proj, 3 AdamW steps (A, B and m all move): trained
    # here and loaded in PEFT, and trained in PEFT and loaded here, give the same logits (fp32, atol 1e-4)
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    ours = Transformer.from_pretrained(hf_base)
    x = torch.randint(0, ours.config.vocab_size, (1, 24))
    apply_lora(ours, r=4, alpha=8, target_modules=targets, use_dora=True, verbose=False)
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    train_steps(ours, x)
    assert all(not torch.equal(p, start[n]) for n, p in ours.named_parameters() if n in start)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(load_hf(hf_base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4

    theirs = get_peft_model(load_hf(hf_base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    train_steps(theirs, x)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = Transformer.from_pretrained(hf_base)
    load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max()
        with disable_adapters(ours):
            effect = (ours(x) - theirs(x).logits).abs().max()
    assert diff < 1e-4 and effect > 1e-2


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
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
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
