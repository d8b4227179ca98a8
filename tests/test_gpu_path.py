"""What a CPU can check of the GPU path: bf16 training through the same code (what autograd keeps,
which dtypes the trained tensors and their optimizer states have), NF4 statistics that no cast can
round, attention in a form a fused kernel takes, torch.compile against eager, and offloaded
checkpointing against plain. What only a GPU shows (synchronizations, kernels, NCCL) is in
test_cuda.py."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from adapters import apply_lora, lora_layers
from config import TrainConfig
from dora import DoRAEmbedding, DoRALinear
from helpers import TINY, tiny_config, write_jsonl
from lora import AdapterSettings, LoRAEmbedding, LoRALinear
from loss import CausalLMLoss
import model as model_module
from model import Transformer
from quant import NF4Linear, quantize_model
import train


def saved_tensors(fn):
    """(dtype, numel, tensor) of every tensor autograd keeps for backward while fn() runs."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def adapted_layer(kind, base, dropout):
    settings = AdapterSettings(r=8, alpha=16, dropout=dropout, use_dora=kind.startswith("dora"))
    layer = {"lora": LoRALinear, "dora": DoRALinear, "lora_emb": LoRAEmbedding, "dora_emb": DoRAEmbedding}[kind](base)
    layer.add_adapter("default", settings)
    layer.active = "default"
    with torch.no_grad():  # the zero factor (B, or the embeddings' A) drawn too: an update that is not nothing
        for p in layer.adapter_tensors("default").values():
            if not p.any():
                p.normal_(0, 0.05)
    return layer.train()


@pytest.mark.parametrize("kind, nf4, dropout", [(k, nf4, p) for k in ("lora", "dora") for nf4 in (False, True)
                                                for p in (0.0, 0.1)]
                         + [("lora_emb", False, 0.0), ("dora_emb", False, 0.0)])
def test_bf16_adapters_keep_nothing_activation_sized_in_fp32(kind, nf4, dropout):
    # A bf16 layer with fp32 adapter weights, on 512 tokens: autograd keeps no fp32 tensor with as
    # many numbers as the tokens (the adapters compute in bf16 from their fp32 weights), and on an
    # NF4 base nothing weight-sized at all (W is rebuilt in backward). The trained tensors stay fp32.
    tokens, d_in, d_out = 512, 64, 96
    if kind.endswith("emb"):
        base = nn.Embedding(200, d_in).bfloat16().requires_grad_(False)
        x = torch.randint(0, 200, (2, tokens // 2))
    else:
        base = nn.Linear(d_in, d_out, bias=True).bfloat16().requires_grad_(False)
        base = NF4Linear.from_linear(base) if nf4 else base
        x = torch.randn(2, tokens // 2, d_in, dtype=torch.bfloat16, requires_grad=True)
    layer = adapted_layer(kind, base, dropout)
    y, saved = saved_tensors(lambda: layer(x))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    trained = layer.adapter_tensors("default")
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in trained.values()), "fp32 master weights and gradients"
    big_fp32 = [(d, n) for d, n, _ in saved if d == torch.float32 and n >= tokens]
    assert not big_fp32, f"fp32 tensors kept for backward: {big_fp32}"
    if nf4:
        weight_sized = [(d, n) for d, n, _ in saved if n == d_in * d_out]  # no activation has 6144 numbers
        assert not weight_sized, f"weight-sized tensors kept for backward: {weight_sized}"


def test_lora_layer_in_bf16_computes_the_fp32_result_to_bf16_precision():
    # The same layer in bf16 and fp32 (bf16-representable weights and inputs): outputs agree to
    # bf16's resolution (rtol 2e-2), so casting the adapter to the input's dtype changes nothing else.
    base = nn.Linear(64, 96).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(base.weight.bfloat16().float())
    layer = adapted_layer("lora", base, 0.0).eval()
    x = torch.randn(4, 64).bfloat16().float()
    ref = layer(x)
    layer.base.bfloat16()
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_nf4_statistics_survive_any_cast():
    # Module.to(dtype) (and FSDP2's mixed precision, which casts every floating-point parameter)
    # would round fp32 statistics to bf16; stored as int32 bits, they are not floating point.
    w = torch.randn(96, 64)
    for double_quant in (False, True):
        m = NF4Linear.from_weight(w, double_quant=double_quant)
        before = m.dequantize(torch.float32)
        assert not any(p.is_floating_point() for n, p in m.named_parameters() if n != "bias")
        m.to(torch.bfloat16)
        assert torch.equal(m.dequantize(torch.float32), before)


def test_packed_attention_with_gqa_gives_sdpa_no_mask_with_enable_gqa(monkeypatch):
    # No fused CUDA kernel takes a mask together with enable_gqa: with a mask (packing, or new
    # tokens after a cache), K/V must come with as many heads as Q. Checked on every SDPA call.
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        calls.append((attn_mask is not None, enable_gqa, q.shape[1], k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    m = Transformer(tiny_config()).eval()  # 4 query heads, 2 K/V heads
    ids = torch.randint(0, 128, (2, 12))
    plain = m(ids)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    packed = m(ids, doc_ids=torch.zeros_like(ids))  # one document per row: the plain causal mask
    assert calls and all(k == q and not gqa for masked, gqa, q, k in calls if masked)
    assert torch.allclose(packed, plain, atol=1e-5)
    calls.clear()
    m(ids)
    assert all(gqa and k == 2 for masked, gqa, q, k in calls), "without a mask, K/V are shared, not copied"


def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing():
    # --gradient_checkpointing offload keeps each block's input in host memory: on a CPU a copy,
    # so the loss and every LoRA gradient equal plain checkpointing's bit for bit (and no
    # checkpointing within fp32 rounding, 1e-5 of the largest entry).
    torch.manual_seed(0)
    base = Transformer(tiny_config())
    ids = torch.randint(0, 128, (2, 16))
    results = {}
    for mode in (None, "on", "offload"):
        torch.manual_seed(1)
        m = apply_lora(Transformer(tiny_config()), r=4, alpha=8, target_modules="all-linear", verbose=False)
        m.load_state_dict(base.state_dict(), strict=False)
        for _, layer in lora_layers(m):
            nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
        m.enable_gradient_checkpointing(mode).train()
        loss = CausalLMLoss(m)(ids, ids, None, None)
        loss.backward()
        results[mode] = (loss.item(), [p.grad for p in m.parameters() if p.requires_grad])
    assert results["offload"][0] == results["on"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["offload"][1], results["on"][1]))
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(results[None][1], results["on"][1]))


@pytest.mark.parametrize("nf4", [False, True])
def test_a_block_compiles_without_graph_breaks(nf4):
    # The NF4 matmul and dequantization are custom operators: dynamo traces a whole block (LoRA,
    # DoRA, dropout, NF4) as one graph.
    m = Transformer(tiny_config())
    if nf4:
        quantize_model(m)
    apply_lora(m, r=4, alpha=8, target_modules="all-linear", dropout=0.1, use_dora=nf4, verbose=False)
    x = torch.randn(2, 16, 64)
    freqs = torch.arange(16)[None, :, None].float() * m.inv_freq
    emb = torch.cat((freqs, freqs), -1)[:, None]
    explained = torch._dynamo.explain(m.model.layers[0].train())(x, emb.cos(), emb.sin(), None, 0)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("flags", [{}, {"load_in_4bit": True, "use_dora": True, "gradient_checkpointing": "on"}])
def test_compiled_blocks_give_the_loss_and_gradients_of_eager(tiny_checkpoint, flags):
    # train.py's model with --compile against without, fp32, on one micro batch: the loss within
    # 1e-5 (relative) and every LoRA gradient within 1e-4 of its largest entry (inductor fuses and
    # reorders float operations, so not bit for bit).
    ids = torch.randint(0, 128, (2, 24))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(model_path=str(tiny_checkpoint), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          compile=compiled, **flags)
        m = train.build_model(cfg, tiny_checkpoint, "cpu", 1, verbose=False)
        for _, layer in lora_layers(m):
            nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
        loss = CausalLMLoss(m, fused=True)(ids, ids, None, None)
        loss.backward()
        results.append((loss.item(), [p.grad for p in m.parameters() if p.requires_grad]))
    (eager_loss, eager), (comp_loss, comp) = results
    assert abs(eager_loss - comp_loss) <= 1e-5 * abs(eager_loss)
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(eager, comp))


def test_bf16_training_run_on_cpu_keeps_fp32_adapters_and_optimizer_states(tiny_checkpoint, tmp_path):
    # train.py --precision bf16 through the same code a GPU runs: it learns, and the adapter it
    # saves, and the AdamW moments in its checkpoint, are fp32.
    out = tmp_path / "out"
    cfg = TrainConfig(model_path=str(tiny_checkpoint), data_path=str(write_jsonl(tmp_path / "t.jsonl", TINY)),
                      output_dir=str(out), micro_batch_size=2, effective_batch_size=4, num_epochs=10,
                      learning_rate=1e-2, lora_r=4, lora_alpha=8, precision="bf16", use_dora=True,
                      save_every=5, keep_checkpoints=0)
    train.train(cfg)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    state = load_file(out / "checkpoints" / "step-15" / "trainer_state.safetensors")
    moments = {k: t.dtype for k, t in state.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert moments and set(moments.values()) == {torch.float32}
