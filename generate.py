"""Text generation and chat with a KV cache, with or without LoRA adapters.

    python generate.py --prompt "What is the capital of France?"          # chat, greedy
    python generate.py --no_chat --prompt "The capital of France is"      # raw completion
    python generate.py --adapter_path out/lora                            # with a trained adapter
    python generate.py                                                    # interactive chat on stdin

Only the generated text goes to stdout (streamed as it arrives); timings go to stderr.
"""
import argparse
import sys
import time

import torch

from model import Transformer, default_device, default_dtype, exit_on_input_error, resolve_checkpoint
from tokenizer import TEMPLATES, Tokenizer

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token id from logits (vocab,): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
             eos_ids=(), seed=None, stats=None):
    """Yield new token ids one at a time. The prompt is run once (prefill) into the KV cache;
    each further step feeds one token. stats, a dict if given, receives the timings."""
    device = model.model.embed_tokens.weight.device
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within the model's "
                         f"{model.config.max_position_embeddings} positions")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    model.setup_cache(1, max_len)
    try:
        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=device)
        logits = model.lm_head(model.hidden(ids)[:, -1])[0]  # only the last position's logits
        token = sample(logits, temperature, top_k, top_p, generator)
        t1 = time.perf_counter()
        n = 1
        yield token
        for pos in range(len(prompt_ids), max_len - 1):
            if token in eos_ids:
                break
            logits = model(torch.tensor([[token]], device=device), start=pos)[0, -1]
            token = sample(logits, temperature, top_k, top_p, generator)
            n += 1
            yield token
        if stats is not None:
            t2 = time.perf_counter()
            # the first new token comes from the prefill; decode_s covers the other n - 1
            stats.update(prompt_tokens=len(prompt_ids), prefill_s=t1 - t0, new_tokens=n, decode_s=t2 - t1)
    finally:
        model.setup_cache(None, None)


def stream_text(tokenizer, tokens, eos_ids, out=sys.stdout):
    """Print the decoded text as tokens arrive; return the whole text (without the eos token)."""
    ids, printed = [], ""
    for t in tokens:
        if t in eos_ids:  # generate() stops after it
            continue
        ids.append(t)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    text = tokenizer.decode(ids)
    out.write(text[len(printed):] + "\n")
    out.flush()
    return text


def load(model_path, adapters=(), load_in_4bit=False, device=None, dtype=None, chat_template=None):
    """Model and tokenizer, with named adapters loaded ({name: path}); the first is active."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_checkpoint(model_path)
    tokenizer = Tokenizer(path, template=chat_template)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, quantize="nf4" if load_in_4bit else None)
    if adapters:
        from lora import load_adapter, set_adapter
        for name, adapter_path in adapters.items():
            load_adapter(model, adapter_path, adapter_name=name)
        set_adapter(model, next(iter(adapters)))
    return model.eval(), tokenizer


def parse_adapters(specs):
    """["out/a", "b=out/b"] -> {"default": "out/a", "b": "out/b"}."""
    adapters = {}
    for spec in specs or []:
        name, _, path = spec.rpartition("=") if "=" in spec else ("default", "", spec)
        if name in adapters:
            raise SystemExit(f"generate.py: error: --adapter_path: adapter name {name!r} given twice")
        adapters[name] = path
    return adapters


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=DEFAULT_MODEL, help="checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--adapter_path", action="append", metavar="[NAME=]DIR",
                   help="LoRA adapter folder (PEFT format); repeat for several, the first is used")
    p.add_argument("--no_chat", action="store_true", help="raw completion: no chat template")
    p.add_argument("--chat_template", choices=TEMPLATES, help="override the template detected from the checkpoint")
    p.add_argument("--system", help="system prompt (default: the checkpoint template's own, if any)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load_in_4bit", action="store_true", help="NF4-quantize the base's linear layers")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    with exit_on_input_error("generate.py"):
        model, tokenizer = load(args.model_path, parse_adapters(args.adapter_path), args.load_in_4bit,
                                args.device, chat_template=args.chat_template)
    chat = not args.no_chat and tokenizer.template is not None
    if not args.no_chat and not chat:
        print("generate.py: this checkpoint has no chat template; raw completion (--no_chat)", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def reply(prompt):
        if chat:
            messages.append({"role": "user", "content": prompt})
            ids = tokenizer.encode(tokenizer.render(messages, add_generation_prompt=True)[0], bos=False)
        else:
            ids = tokenizer.encode(prompt)
        stats = {}
        tokens = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          tokenizer.eos_ids, args.seed, stats)
        text = stream_text(tokenizer, tokens, tokenizer.eos_ids)
        messages.append({"role": "assistant", "content": text})
        print(f"[prompt {stats['prompt_tokens']} tok at {stats['prompt_tokens'] / stats['prefill_s']:.1f} tok/s, "
              f"{stats['new_tokens']} new, decoding at {(stats['new_tokens'] - 1) / max(stats['decode_s'], 1e-9):.1f} tok/s]", file=sys.stderr)

    if args.prompt is not None:
        reply(args.prompt)
        return
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        reply(prompt)


if __name__ == "__main__":
    main()
