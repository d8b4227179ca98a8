"""merge.py: an adapter merged into a Hugging Face checkpoint."""
import json

import torch
from safetensors import safe_open

from adapters import apply_lora, lora_layers
from helpers import ids, randomize_B, tiny, write_checkpoint
from model import Transformer
from peft_format import save_adapter


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
