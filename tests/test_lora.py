"""lora.py: LoRA's invariants, merging, several adapters, the PEFT format both ways, QLoRA."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from lora import (LoRAError, LoRALinear, apply_lora, disable_adapters, load_adapter, merge_and_unload, merge_lora,
                  save_adapter, set_adapter, unmerge_lora)
from model import Transformer
from quant import NF4Linear, quantize_model


def tiny(**kw):
    return Transformer(tiny_config(**kw)).eval()


def randomize_adapters(model, std=0.05):
    """B starts at zero; give A and B random values so the adapter changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def test_fresh_adapter_changes_nothing():
    model = tiny()
    with torch.no_grad():
        base = model(IDS)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear")
        assert torch.equal(model(IDS), base)  # B = 0: bitwise the base model


def test_only_a_and_b_train():
    model = tiny()
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0  # B moved


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny()
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(model)
    q = model.model.layers[1].self_attn.q_proj
    w0 = q.base.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        # W_merged == W + (alpha / r) * B @ A
        expected = w0 + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
        assert torch.allclose(q.base.weight, expected, atol=1e-7)
        assert torch.allclose(model(IDS), unmerged, atol=1e-5)  # fp32 rounding only
        merge_lora(model)  # merging twice changes nothing after the first
        assert torch.allclose(q.base.weight, expected, atol=1e-7)
        unmerge_lora(model)
        assert torch.allclose(q.base.weight, w0, atol=1e-6)
        assert torch.allclose(model(IDS), unmerged, atol=1e-5)


def test_rslora_scaling():
    model = tiny()
    apply_lora(model, r=16, alpha=8, target_modules=["q_proj"], use_rslora=True)
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / 4  # alpha / sqrt(r)
    apply_lora(model, r=16, alpha=8, target_modules=["q_proj"], adapter_name="plain")
    assert model.model.layers[0].self_attn.q_proj.scaling["plain"] == 8 / 16  # alpha / r


def test_several_adapters_switch_and_disable():
    model = tiny()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name="a")
    randomize_adapters(model)
    apply_lora(model, r=2, alpha=4, target_modules=["o_proj", "v_proj"], adapter_name="b")
    randomize_adapters(model)
    with torch.no_grad():
        out_b = model(IDS)
        set_adapter(model, "a")
        out_a = model(IDS)
        with disable_adapters(model):
            assert torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), out_a)  # restored after the context
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}  # only the active adapter trains
    with pytest.raises(LoRAError, match="no adapter named 'c'"):
        set_adapter(model, "c")


def test_all_linear_targets_the_seven_block_linears():
    model = tiny()
    apply_lora(model, target_modules="all-linear")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert len(wrapped) == 2 * 7 and not any("lm_head" in n for n in wrapped)


def test_unknown_target_lists_the_names():
    with pytest.raises(LoRAError, match="'qkv_proj' matches no layer; the model's linear layers are: "
                                        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(tiny(), target_modules=["q_proj", "qkv_proj"])


def test_save_load_round_trip_in_peft_format(tmp_path):
    model = tiny()
    fresh = copy.deepcopy(model)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "down_proj"], dropout=0.05)
    randomize_adapters(model)
    save_adapter(model, tmp_path, base_model_name_or_path="org/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # what PEFT, vLLM and llama.cpp's converter read
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "use_rslora", "bias", "base_model_name_or_path", "use_dora", "modules_to_save")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["down_proj", "q_proj"], "use_rslora": False, "bias": "none",
        "base_model_name_or_path": "org/base", "use_dora": False, "modules_to_save": None}
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = sorted(f.keys())
    assert keys == sorted(f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
                          for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_mismatched_adapters_are_refused(tmp_path):
    model = tiny()
    apply_lora(model, r=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "a")
    with pytest.raises(LoRAError, match=r"q_proj.lora_A.weight has shape \(4, 64\), this model needs \(4, 96\)"):
        load_adapter(tiny(hidden_size=96), tmp_path / "a")
    with pytest.raises(LoRAError, match="names no linear layer of this model"):
        load_adapter(tiny(num_hidden_layers=1), tmp_path / "a")
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(tiny(), tmp_path / "missing")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora=True is not supported"):
        load_adapter(tiny(), tmp_path / "a")


# --- against PEFT, on the real model ---------------------------------------------------------------

@pytest.fixture
def peft_and_hf():
    return pytest.importorskip("peft"), pytest.importorskip("transformers")


def test_our_adapter_loads_in_peft_with_the_same_logits(smollm2, peft_and_hf, tmp_path):
    peft, transformers = peft_and_hf
    ours = Transformer.from_pretrained(smollm2)
    apply_lora(ours, r=8, alpha=16, target_modules="all-linear")
    randomize_adapters(ours, 0.02)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(smollm2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
        with disable_adapters(ours):
            assert (ours(ids) - a).abs().max() > 0.1  # the adapter matters
    assert (a - b).abs().max() < 1e-4  # fp32


@pytest.mark.parametrize("targets, rslora", [(["q_proj", "v_proj"], False), ("all-linear", True)])
def test_peft_adapter_loads_here_with_the_same_logits(smollm2, peft_and_hf, tmp_path, targets, rslora):
    peft, transformers = peft_and_hf
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=rslora,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random, nonzero B
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(smollm2)
    load_adapter(ours, tmp_path)
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4  # fp32


# --- QLoRA -----------------------------------------------------------------------------------------

def test_qlora_equals_lora_on_the_dequantized_weight():
    # The NF4 base computes with its dequantized weight: LoRA over NF4 == LoRA over a plain model
    # holding the dequantized weights (fp32, atol 1e-5), for the output and for A/B's gradients.
    plain = tiny()
    qmodel = quantize_model(copy.deepcopy(plain))
    plain.load_state_dict(plain.state_dict() | {
        n + ".weight": m.dequantize(torch.float32) for n, m in qmodel.named_modules() if isinstance(m, NF4Linear)})
    for m in (qmodel, plain):
        torch.manual_seed(3)
        apply_lora(m, r=4, alpha=8, target_modules="all-linear")
        randomize_adapters(m)
    outs = []
    for m in (qmodel, plain):
        out = m(IDS)
        out.logsumexp(-1).mean().backward()
        outs.append((out, [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs[0][1], outs[1][1]))


def test_merge_into_nf4_gives_a_linear_with_the_same_outputs():
    model = quantize_model(tiny())
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    randomize_adapters(model)
    with torch.no_grad():
        before = model(IDS)
        merge_and_unload(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        assert isinstance(model.model.layers[0].self_attn.k_proj, NF4Linear)  # untouched layers stay NF4
        assert torch.allclose(model(IDS), before, atol=1e-5)


def test_qlora_smollm2_agrees_with_bf16_and_learns(smollm2):
    # NF4 rounds each weight to 16 levels per block: on a real text, the NF4 model's loss stays
    # within 25% of the bf16 model's and its next-token choice agrees at 60% of positions or more
    # (measured: +18% loss, 77% agreement, the same loss as with bitsandbytes' own NF4 weights; a
    # 135M model, itself from a 4-bit file, feels 4 bits more than large ones); then training
    # A/B over the frozen NF4 base lowers the loss.
    from tokenizer import Tokenizer

    tok = Tokenizer(smollm2)
    ids = torch.tensor([tok.encode("The Eiffel Tower is in Paris, the capital of France. It was built in 1889 "
                                   "for the World's Fair and is one of the most visited monuments in the world. "
                                   "Gustave Eiffel's company designed and built the tower, which was criticised "
                                   "at first by some of France's leading artists and intellectuals.")])
    bf16 = Transformer.from_pretrained(smollm2, dtype=torch.bfloat16)
    nf4 = Transformer.from_pretrained(smollm2, dtype=torch.bfloat16, quantize="nf4")

    def lm_loss(model):
        return torch.nn.functional.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[0, 1:])

    with torch.no_grad():
        agree = (bf16(ids).argmax(-1) == nf4(ids).argmax(-1)).float().mean()
        assert lm_loss(nf4) < 1.25 * lm_loss(bf16)
    assert agree >= 0.6
    apply_lora(nf4, r=8, alpha=16, target_modules="all-linear")
    nf4.train()
    opt = torch.optim.AdamW([p for p in nf4.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = lm_loss(nf4)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
