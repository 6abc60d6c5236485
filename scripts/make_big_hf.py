#!/usr/bin/env python3
"""Writes a Hugging Face directory with the layer shapes of OLMoE-1B-7B
(d 2048, 64 experts of 1024, top-8, vocabulary 50304), bf16, for measuring
how much host memory loading a multi-gigabyte checkpoint takes:

    python3 scripts/make_big_hf.py OUT_DIR [LAYERS]
    /usr/bin/time -v amoe info --checkpoint OUT_DIR --load

Standard library only. The values are a 1 MiB block of small random bf16
numbers repeated (their meaning does not matter here); the tokenizer is
the olmoe fixture's. Run by hand, never in CI.
"""
import json
import os
import random
import shutil
import struct
import sys

out = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
d, f, e, vocab, heads = 2048, 1024, 64, 50304, 16
os.makedirs(out, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
fixture = os.path.join(here, "..", "tests", "fixtures", "hf", "olmoe")
shutil.copy(os.path.join(fixture, "tokenizer.json"), out)
config = json.load(open(os.path.join(fixture, "config.json")))
config.update(
    hidden_size=d,
    intermediate_size=f,
    num_experts=e,
    num_experts_per_tok=8,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=heads,
    vocab_size=vocab,
    max_position_embeddings=4096,
    dtype="bfloat16",
)
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)

rng = random.Random(0)
# bf16 of +-[2^-8, 2^-5): exponent 0x77..0x79, random mantissa and sign.
block = b"".join(
    struct.pack("<H", (rng.getrandbits(1) << 15) | (rng.randrange(0x77, 0x7A) << 7) | rng.getrandbits(7))
    for _ in range(1 << 19)
)

tensors = [("model.embed_tokens.weight", [vocab, d]), ("model.norm.weight", [d]), ("lm_head.weight", [vocab, d])]
for l in range(layers):
    p = f"model.layers.{l}."
    tensors += [(p + "input_layernorm.weight", [d]), (p + "post_attention_layernorm.weight", [d])]
    tensors += [(p + f"self_attn.{x}_proj.weight", [d, d]) for x in "qkvo"]
    tensors += [(p + "self_attn.q_norm.weight", [d]), (p + "self_attn.k_norm.weight", [d])]
    tensors += [(p + "mlp.gate.weight", [e, d])]
    for x in range(e):
        tensors += [(p + f"mlp.experts.{x}.{n}_proj.weight", s) for n, s in (("gate", [f, d]), ("up", [f, d]), ("down", [d, f]))]

header, offset = {}, 0
for name, shape in tensors:
    n = 2
    for s in shape:
        n *= s
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
    offset += n
header["__metadata__"] = {"format": "pt"}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as w:
    w.write(struct.pack("<Q", len(h)))
    w.write(h)
    for name, shape in tensors:
        n = 2
        for s in shape:
            n *= s
        while n > 0:
            chunk = block[: min(n, len(block))]
            w.write(chunk)
            n -= len(chunk)
print(f"{out}: {layers} layer(s), {offset / 2**30:.2f} GiB of bf16 weights")
