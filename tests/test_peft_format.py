"""peft_format.py: PEFT's files on disk, save/load round trips, refusing adapters that don't
fit, and interop with PEFT itself (our adapters load there, theirs load here)."""
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import apply_lora, count_parameters, disable_adapters, lora_layers
from helpers import BLOCK_LINEARS, hf_model, ids, load_hf, lora_model, randomize_B, tied_hf_and_ours, tiny
from lora import LoRAError
from model import Transformer
from peft_format import load_adapter, load_adapter_weights, save_adapter


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


def test_our_adapter_loads_in_peft(hf_base, tmp_path):
    # saved here, loaded by PeftModel.from_pretrained with no warning from PEFT: same logits
    # (fp32, atol 1e-4); the same trainable / all parameter counts as PEFT's, and as the shapes say
    from peft import PeftModel

    ours = Transformer.from_pretrained(hf_base)
    apply_lora(ours, r=8, alpha=16, target_modules=["q_proj", "v_proj"], verbose=False)
    randomize_B(ours, std=0.02)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(hf_base))
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    base = load_hf(hf_base)
    n_base = sum(p.numel() for p in base.parameters())  # transformers' count: the tied table once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).eval()
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    # r (in + out) per adapted linear: q_proj d -> heads * head_dim, v_proj d -> kv_heads * head_dim
    # (on SmolLM2-135M: 30 * 8 * (576 + 576 + 576 + 192) = 460,800)
    c = ours.config
    n_lora = c.num_hidden_layers * 8 * (2 * c.hidden_size
                                        + (c.num_attention_heads + c.num_key_value_heads) * c.head_dim)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters() == (n_lora, n_base + n_lora)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x), theirs(x).logits
        with disable_adapters(ours), theirs.disable_adapter():
            ours_base, theirs_base = ours(x), theirs(x).logits
    assert (ours_base - theirs_base).abs().max() < 1e-4  # the base models agree
    assert (ours_logits - ours_base).abs().max() > 1e-2  # the adapter changes the logits...
    assert (ours_logits - theirs_logits).abs().max() < 1e-4  # ...identically in both


def test_our_lm_head_adapter_loads_in_peft(hf_base, tmp_path):
    # an adapter of the tied lm_head (and q_proj), saved here: same logits in PEFT (fp32, atol 1e-4)
    from peft import PeftModel

    ours = Transformer.from_pretrained(hf_base)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the base is tied, as SmolLM2
    apply_lora(ours, r=4, alpha=8, target_modules=["lm_head", "q_proj"], verbose=False)
    randomize_B(ours, std=0.02)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(load_hf(hf_base), tmp_path / "adapter").eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x), theirs(x).logits
        with disable_adapters(ours):
            effect = (ours(x) - ours_logits).abs().max()
    assert (ours_logits - theirs_logits).abs().max() < 1e-4 and effect > 1e-2


@pytest.mark.parametrize("peft_config, per_block, outside", [
    (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 2, 0),
    (dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True), 7, 0),
    (dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), 1, 1),  # lm_head tied to the embeddings
])
def test_peft_adapter_loads_here(hf_base, tmp_path, peft_config, per_block, outside):
    # made and saved by PEFT with random nonzero A and B: same logits here (fp32, atol 1e-4), and
    # adapters on per_block linears of each block plus `outside` others (all-linear: not lm_head)
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(load_hf(hf_base), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                         **peft_config)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = Transformer.from_pretrained(hf_base)
    load_adapter(ours, tmp_path / "adapter")
    assert len(lora_layers(ours)) == per_block * ours.config.num_hidden_layers + outside
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max()
        with disable_adapters(ours):
            effect = (ours(x) - theirs(x).logits).abs().max()
    assert diff < 1e-4 and effect > 1e-2  # the adapter changes the logits, identically in both


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
