"""On a CUDA GPU: bf16 training against fp32 on the CPU, bitsandbytes' CUDA dequantization against
ours, the 8-bit optimizers, model splitting, generation, and bench.py.

Marked `cuda` and skipped without a GPU (the only tests CI lets skip): `python -m pytest -m cuda tests`.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapters import apply_lora
from config import TrainConfig
from generate import generate
from helpers import DTYPES, ROOT, TINY, bits_equal, make_tiny_checkpoint, tiny_config, weight, write_jsonl
from model import Transformer
from quant import NF4Linear, _dequantize_bnb, dequantize_nf4, quantize_nf4

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run(script, *args, cpu=False):
    """A script in a fresh process; cpu=True hides the GPUs from it (train.py then runs fp32 on CPU)."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_cli(ckpt, out, *flags, cpu=False):
    """train.py on TINY (lr 1e-2, 2 micro batches of 2 per step, no dropout); the logged losses."""
    data = write_jsonl(out.parent / "tiny.jsonl", TINY)
    run("train.py", "--model_path", ckpt, "--data_path", data, "--output_dir", out, "--micro_batch_size", 2,
        "--effective_batch_size", 4, "--learning_rate", "1e-2", "--warmup_steps", 1, "--lora_dropout", 0,
        "--lora_r", 8, "--lora_alpha", 16, *flags, cpu=cpu)
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def same_lora_weights(params, weights):
    """Give the LoRA weights `weights` ({name: tensor}); when None, draw B away from zero first and
    return what was drawn, so the next model (another device or dtype) starts the same."""
    with torch.no_grad():
        if weights is None:
            for n, p in params.items():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
            weights = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(weights[n])
    return weights


# --- bf16 on the GPU against fp32 on the CPU ------------------------------------------------------

@pytest.fixture
def bf16_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny checkpoint with its weights rounded to bf16 (stored fp32): loaded in either dtype
    the model holds the same numbers, and NF4 quantizes them to the same codes."""
    path = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoint, path)
    tensors = load_file(path / "model.safetensors")
    save_file({k: t.bfloat16().float() for k, t in tensors.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("qlora", [False, True])
def test_bf16_lora_step_on_cuda_matches_fp32_on_cpu(bf16_checkpoint, qlora):
    # The same weights, LoRA weights (B random, so A gets gradients too) and batch: the loss of
    # the bf16 model on the GPU within 1% of fp32 on the CPU, every LoRA gradient within 5%
    # (relative norm of the difference). bf16 keeps 8 bits of mantissa (0.4% per rounding); the
    # adapters and their gradients are fp32 in both. (bf16 against fp32 on the CPU: 0.03% and
    # 1.3% at most over three seeds, LoRA and QLoRA alike.)
    ids = torch.randint(0, 128, (2, 32))
    results, weights = [], None
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = Transformer.from_pretrained(bf16_checkpoint, dtype=dtype, device=device,
                                            quantize="nf4" if qlora else None)
        apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
        params = lora_params(model)
        weights = same_lora_weights(params, weights)
        x = ids.to(device)
        loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().cpu() for n, p in params.items()}))
    (loss_fp32, grads_fp32), (loss_bf16, grads_bf16) = results
    assert abs(loss_bf16 - loss_fp32) < 0.01 * loss_fp32, (loss_bf16, loss_fp32)
    for n, g in grads_fp32.items():
        assert grads_bf16[n].dtype == torch.float32 and (grads_bf16[n] - g).norm() < 0.05 * g.norm(), n


@pytest.mark.parametrize("flags", [[], ["--load_in_4bit"], ["--gradient_checkpointing"], ["--use_dora"],
                                   ["--load_in_4bit", "--use_dora", "--lora_dropout", "0.1"],
                                   ["--gradient_checkpointing", "offload"], ["--compile"], ["--sample_packing"]])
def test_train_py_in_bf16_on_cuda_follows_fp32_on_cpu(bf16_checkpoint, tmp_path, flags):
    # train.py picks bf16 on CUDA and fp32 on CPU. The first step's loss (B = 0: the base model's
    # loss, whatever A's random init on each device) agrees within 1%; both runs then learn.
    steps = ["--max_steps", 8, "--save_every", 0, *flags]
    gpu = train_cli(bf16_checkpoint, tmp_path / "gpu", *steps)
    cpu = train_cli(bf16_checkpoint, tmp_path / "cpu", *steps, cpu=True)
    assert len(gpu) == len(cpu) == 8
    assert abs(gpu[0] - cpu[0]) < 0.01 * cpu[0], (gpu[0], cpu[0])
    assert gpu[-1] < 0.7 * gpu[0] and cpu[-1] < 0.7 * cpu[0], (gpu, cpu)


# --- NF4 on the GPU -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(100, 70), (3, 5), (257, 129), (100, 80), (1536, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_cuda_dequantize_equals_ours_bit_for_bit(shape, dtype, double_quant):
    # Quantized here (on the CPU, equal to bitsandbytes: test_quant.py), then dequantized on the
    # GPU by bitsandbytes' fused kernel and by ours: the same bits, and the same as on the CPU.
    # NF4Linear.dequantize uses bitsandbytes' kernel on CUDA (it is faster), so the two must agree.
    q = quantize_nf4(weight(shape, dtype), double_quant=double_quant)
    on_gpu = lambda t: None if t is None else t.cuda()
    qc = dataclasses.replace(q, packed=q.packed.cuda(), absmax=q.absmax.cuda(), nested_absmax=on_gpu(q.nested_absmax),
                             offset=on_gpu(q.offset))
    ours = dequantize_nf4(qc)
    assert ours.is_cuda and bits_equal(ours.cpu(), dequantize_nf4(q)), "ours on the GPU == ours on the CPU"
    assert bits_equal(_dequantize_bnb(qc, dtype), ours), "bitsandbytes' CUDA kernel == ours"


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_on_cuda_computes_with_its_dequantized_weight(bias):
    w = weight((48, 100), torch.bfloat16).cuda()
    b = torch.randn(48, device="cuda").bfloat16() if bias else None
    m = NF4Linear.from_weight(w, b)
    w_q = dequantize_nf4(quantize_nf4(w))
    assert bits_equal(m.dequantize(), w_q)
    x = torch.randn(2, 5, 100, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = m(x), F.linear(x_ref, w_q, b)
    assert bits_equal(y, y_ref), "forward == F.linear with the dequantized weight"
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert bits_equal(x.grad, x_ref.grad), "grad w.r.t. input"


# --- 8-bit optimizers -----------------------------------------------------------------------------

@pytest.fixture
def small_checkpoint(tmp_path):
    # Wide enough that most LoRA matrices (r=8: A 8 x 512, B 512 x 8) reach bitsandbytes'
    # min_8bit_size of 4096 elements; smaller ones keep 32-bit state.
    return make_tiny_checkpoint(tmp_path / "small", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                num_key_value_heads=4)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_step_like_adamw(small_checkpoint, tmp_path, optimizer):
    # The same run with torch's AdamW and with bitsandbytes' 8-bit AdamW (states quantized
    # blockwise to 8 bits, ~1% error): every step's loss within 2%, and the learned B matrices
    # (zero at the start, so B is the whole update) point the same way (cosine > 0.95).
    steps = ["--max_steps", 6, "--save_every", 0]
    ref = train_cli(small_checkpoint, tmp_path / "adamw", *steps)
    eight = train_cli(small_checkpoint, tmp_path / optimizer, *steps, "--optimizer", optimizer)
    assert all(abs(a - b) < 0.02 * a for a, b in zip(ref, eight)), (ref, eight)
    assert eight[-1] < eight[0]
    a = load_file(tmp_path / "adamw" / "adapter_model.safetensors")
    b = load_file(tmp_path / optimizer / "adapter_model.safetensors")
    for k in a:
        if "lora_B" in k:
            assert F.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0) > 0.95, k


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizer_state_is_checkpointed_and_resumed(small_checkpoint, tmp_path, optimizer):
    # A checkpoint at step 2 holds the 8-bit states; resuming from it (the finished adapter
    # removed, as after a crash) repeats steps 3-4 of the uninterrupted run (within 1e-3: CUDA
    # kernels may sum in another order from run to run).
    out = tmp_path / "run"
    flags = ["--max_steps", 4, "--save_every", 2, "--optimizer", optimizer]
    full = train_cli(small_checkpoint, out, *flags)
    state = load_file(out / "checkpoints" / "step-2" / "trainer_state.safetensors")
    assert any(t.dtype == torch.uint8 for t in state.values()), "8-bit optimizer states saved"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink()
    resumed = train_cli(small_checkpoint, out, *flags, "--resume")
    assert len(resumed) == 4 and all(abs(a - b) < 1e-3 * a for a, b in zip(full, resumed)), (full, resumed)


# --- model splitting ------------------------------------------------------------------------------

def test_split_model_gives_the_logits_and_gradients_of_one_piece(tiny_checkpoint):
    # Loaded on the GPU, then split over two devices, the GPU and the CPU, so activations really
    # move between pieces (embeddings, final norm and lm_head stay on the first): fp32 logits and
    # LoRA gradients equal the unsplit model's on the CPU within 1e-4 (CUDA and CPU kernels sum in
    # other orders; no TF32, PyTorch's default), and the KV cache follows each block (greedy tokens equal).
    ids = torch.randint(0, 128, (2, 16))
    results, weights = [], None
    for split in (False, True):
        model = Transformer.from_pretrained(tiny_checkpoint, device="cuda" if split else "cpu")
        if split:
            model.split_layers([torch.device("cuda"), torch.device("cpu")])
            assert [b.input_layernorm.weight.device.type for b in model.model.layers] == ["cuda", "cpu"]
        apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
        params = lora_params(model)
        weights = same_lora_weights(params, weights)
        logits = model(ids.to(model.lm_head.weight.device))
        logits.logsumexp(-1).mean().backward()
        tokens = list(generate(model, [5, 6, 7], max_new_tokens=8))
        results.append((logits.detach().cpu(), {n: p.grad.cpu() for n, p in params.items()}, tokens))
    (logits, grads, tokens), (split_logits, split_grads, split_tokens) = results
    torch.testing.assert_close(split_logits, logits, atol=1e-4, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(split_grads[n], g, atol=1e-4, rtol=1e-4)
    assert split_tokens == tokens


def test_train_py_enable_model_splitting(tiny_checkpoint, tmp_path):
    # --enable_model_splitting spreads the blocks over every visible GPU (one process); on one
    # GPU all pieces share it. The first loss equals an unsplit CUDA run's (B = 0: init-free), and it learns.
    steps = ["--max_steps", 8, "--save_every", 0]
    plain = train_cli(tiny_checkpoint, tmp_path / "plain", *steps)
    split = train_cli(tiny_checkpoint, tmp_path / "split", *steps, "--enable_model_splitting")
    assert abs(split[0] - plain[0]) < 1e-3 * plain[0] and split[-1] < 0.7 * split[0], (plain, split)


# --- generation -----------------------------------------------------------------------------------

def test_generation_on_cuda_equals_cpu(tiny_checkpoint):
    # fp32 on both (no TF32: PyTorch's default for matmuls): the same greedy tokens; bf16 on the
    # GPU: the prompt's last logits within 2% of fp32's largest (0.4% with bf16 on the CPU).
    prompt = [5, 6, 7, 8]
    cpu = Transformer.from_pretrained(tiny_checkpoint)
    gpu = Transformer.from_pretrained(tiny_checkpoint, device="cuda")
    assert list(generate(gpu, prompt, 24)) == list(generate(cpu, prompt, 24))
    bf16 = Transformer.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        expected = cpu(torch.tensor([prompt]))[0, -1]
        got = bf16(torch.tensor([prompt], device="cuda"))[0, -1].float().cpu()
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_generate_py_on_cuda(tiny_checkpoint):
    # bf16 by default on CUDA; the timing line goes to stderr (a random model may stop at once)
    r = run("generate.py", "--model_path", tiny_checkpoint, "--prompt", "w1 w2", "--max_new_tokens", 8,
            "--device", "cuda")
    assert "tok/s" in r.stderr


def test_real_model_answers_paris_in_bf16_on_cuda(smollm2):
    r = run("generate.py", "--model_path", smollm2, "--prompt", "What is the capital of France?",
            "--max_new_tokens", 30, "--device", "cuda")
    assert "Paris" in r.stdout


# --- bench.py -------------------------------------------------------------------------------------

def write_config_json(path, c):
    """A config.json of Config c's shape, for bench.py --config_json."""
    path.write_text(json.dumps(dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                    intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                    num_attention_heads=c.num_attention_heads,
                                    num_key_value_heads=c.num_key_value_heads,
                                    max_position_embeddings=c.max_position_embeddings)))
    return path


def test_bench_py_on_cuda(tmp_path):
    # Every measure on a small random config, bf16 on the GPU; figures are not asserted, only
    # that each is printed and nothing failed.
    c = tiny_config(hidden_size=256, intermediate_size=512)
    config = write_config_json(tmp_path / "small.json", c)
    r = run("bench.py", "--device", "cuda", "--config_json", config, "--steps", 2, "--repeat", 1, "--seq_len", 64,
            "--new_tokens", 8)
    for line in ("machine: matmul", "generate: ours", "quantize: NF4", "QLoRA model loaded: ", "train LoRA: ",
                 "train QLoRA (NF4): ", "MiB max allocated"):
        assert line in r.stdout, r.stdout
    assert "failed" not in r.stdout, r.stdout


# --- the GPU path: synchronizations, kernels, NCCL, memory ----------------------------------------

def one_step(cfg, path, rows):
    """train.py's step on `rows` (collated to one micro batch), up to the step's one read of its
    figures: (loss, grad_norm) as device tensors."""
    import data
    import train
    from tokenizer import Tokenizer

    model = train.build_model(cfg, path, torch.device("cuda"), 1, verbose=False)
    loss_fn = train.make_loss(cfg, model, 1, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(cfg, params)
    tok = Tokenizer(path)
    examples = [dict(input_ids=i, labels=l, position_ids=list(range(len(i))), doc_ids=[0] * len(i))
                for i, l in (data.tokenize(r, tok, "row") for r in rows)]
    batch = data.pack(examples, 256) if cfg.sample_packing else examples

    def step():
        micro = [train.batch_to(data.collate(batch, tok.pad_id), "cuda")]
        loss = train.forward_backward(loss_fn, micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm
    return step, optimizer


@pytest.mark.parametrize("flags", [{}, {"load_in_4bit": True}, {"sample_packing": True},
                                   {"load_in_4bit": True, "use_dora": True, "lora_dropout": 0.1},
                                   {"gradient_checkpointing": "offload"}])
def test_a_warmed_up_training_step_never_waits_for_the_gpu(tiny_checkpoint, flags):
    # Between the step's start and its one read of (loss, grad_norm), no operation synchronizes
    # the host with the GPU: torch raises on any (a .item(), a boolean mask, a pageable copy).
    cfg = TrainConfig(model_path=str(tiny_checkpoint), lora_r=8, lora_alpha=16, **flags)
    step, _ = one_step(cfg, tiny_checkpoint, TINY)
    step()  # warm-up: allocations, the optimizer's states, lazy initializations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad_norm = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack([loss, grad_norm])).all()


def test_fused_adamw_is_the_default_on_cuda(tiny_checkpoint):
    _, optimizer = one_step(TrainConfig(model_path=str(tiny_checkpoint)), tiny_checkpoint, TINY)
    assert optimizer.defaults["fused"] is True


def test_packed_gqa_attention_runs_on_a_fused_kernel():
    # With the math kernel excluded, packed (masked) grouped-query attention still runs, forward
    # and backward, in bf16: K/V are repeated for the mask, which the memory-efficient kernel takes.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = Transformer(tiny_config()).to("cuda", torch.bfloat16)
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    doc_ids = (torch.arange(64, device="cuda") // 16).expand(2, 64)  # four documents per row
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        model(ids, doc_ids=doc_ids).float().logsumexp(-1).mean().backward()


@pytest.mark.parametrize("offload", [False, True])
def test_train_py_fsdp_as_a_world_of_one_on_nccl(bf16_checkpoint, tmp_path, offload):
    # --fsdp without torchrun (a process group of one, NCCL for CUDA tensors and gloo for CPU
    # ones), with and without --fsdp_cpu_offload (shards, gradients and the optimizer's states on
    # the host): the losses follow the run without --fsdp within 2% (bf16), and it learns.
    steps = ["--max_steps", 8, "--save_every", 4, "--load_in_4bit", "--gradient_checkpointing"]
    plain = train_cli(bf16_checkpoint, tmp_path / "plain", *steps)
    sharded = train_cli(bf16_checkpoint, tmp_path / "fsdp", *steps, "--fsdp",
                        *(["--fsdp_cpu_offload"] if offload else []))
    assert all(abs(a - b) < 0.02 * a for a, b in zip(plain, sharded)), (plain, sharded)
    assert sharded[-1] < 0.7 * sharded[0]


def test_paged_optimizer_states_stay_paged_after_resuming():
    # bitsandbytes' load_state_dict moves states with .to(device); checkpoint.keep_paged puts
    # the ones it pages (tensors of 1e5 elements or more) back in paged memory.
    import bitsandbytes as bnb

    from checkpoint import keep_paged

    p = torch.nn.Parameter(torch.randn(512, 256, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = bnb.optim.PagedAdamW8bit([p])
    opt.step()
    assert opt.state[p]["state1"].is_paged
    resumed = bnb.optim.PagedAdamW8bit([p])
    resumed.load_state_dict(opt.state_dict())
    keep_paged(resumed)
    state = resumed.state[p]
    assert state["state1"].is_paged and state["state2"].is_paged
    assert torch.equal(state["state1"], opt.state[p]["state1"])
    resumed.step()  # and it still steps


def test_offloaded_checkpointing_fits_more_in_the_same_memory(tiny_checkpoint):
    # Plain checkpointing keeps each block's input on the GPU; offload keeps it in pinned host
    # memory: the peak of a long-sequence step is lower, and the gradients are the same (within 1%
    # of each one's largest entry: attention's backward kernels may sum in another order per run).
    results = {}
    ckpt = make_tiny_checkpoint(tiny_checkpoint.parent / "deep", num_hidden_layers=16, hidden_size=256,
                                intermediate_size=512)
    ids = torch.randint(0, 128, (1, 4096), device="cuda")
    for mode in ("on", "offload"):
        model = Transformer.from_pretrained(ckpt, dtype=torch.bfloat16, device="cuda")
        apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
        model.enable_gradient_checkpointing(mode).train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(ids).float().logsumexp(-1).mean().backward()
        results[mode] = (torch.cuda.max_memory_allocated(), [p.grad.float() for p in lora_params(model).values()])
        del model
    (peak_on, grads_on), (peak_off, grads_off) = results["on"], results["offload"]
    assert peak_off < peak_on, (peak_off, peak_on)
    assert all((a - b).abs().max() <= 1e-6 + 1e-2 * a.abs().max() for a, b in zip(grads_on, grads_off))


def test_recipes_lower_the_peak_of_a_bf16_step_with_the_same_gradients(tiny_checkpoint):
    # activations.recomputed on the GPU: a step keeping the normed inputs and SwiGLU's product as recipes
    # peaks lower than one keeping them (Block.forward(recompute=False)), and the adapter gradients
    # agree within 1% of each one's largest entry (attention's backward may sum in another order).
    from functools import partialmethod

    from model import Block

    results, forward = {}, Block.forward
    ckpt = make_tiny_checkpoint(tiny_checkpoint.parent / "wide", num_hidden_layers=8, hidden_size=256,
                                intermediate_size=1024)
    ids = torch.randint(0, 128, (2, 2048), device="cuda")
    try:
        for recompute in (True, False):
            Block.forward = partialmethod(forward, recompute=recompute)
            model = Transformer.from_pretrained(ckpt, dtype=torch.bfloat16, device="cuda")
            apply_lora(model, r=8, alpha=16, target_modules="all-linear", verbose=False)
            model.train()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            model.hidden(ids).float().square().mean().backward()
            results[recompute] = (torch.cuda.max_memory_allocated(),
                                  [p.grad.float() for p in lora_params(model).values()])
            del model
    finally:
        Block.forward = forward
    (peak, grads), (peak_kept, grads_kept) = results[True], results[False]
    assert peak < peak_kept, (peak, peak_kept)
    assert all((a - b).abs().max() <= 1e-6 + 1e-2 * a.abs().max() for a, b in zip(grads, grads_kept))


def test_peak_memory_of_a_step_is_within_the_estimate(small_checkpoint, tmp_path):
    # --estimate_memory's total for a small QLoRA run bounds the measured peak allocated memory of
    # its training steps (after loading: the peak statistics reset once the model is built), +15%.
    import memory

    cfg = TrainConfig(model_path=str(small_checkpoint), load_in_4bit=True, micro_batch_size=2, max_seq_len=256,
                      gradient_checkpointing="on")
    step, _ = one_step(cfg, small_checkpoint, TINY * 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    peak, estimate = torch.cuda.max_memory_allocated(), memory.estimate_for_run(cfg)["total"]
    assert peak <= 1.15 * estimate, (peak, estimate)


def test_bench_builds_a_config_in_bf16_on_the_device(tmp_path):
    # bench.py --config_json on CUDA: the model is made in bf16 where it runs, so the peak while
    # building is the model itself (within 5%), not an fp32 copy first (1.5x); a known card is named.
    import argparse

    import bench

    c = tiny_config(hidden_size=512, intermediate_size=1024)
    config = write_config_json(tmp_path / "small.json", c)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = bench.our_model(argparse.Namespace(config_json=str(config), device="cuda"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.cuda.max_memory_allocated() - before <= 1.05 * bench.held_bytes(model)
    card = bench.card_peaks("cuda")
    if any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100")):
        assert card is not None and card[1] >= 312e12, card
