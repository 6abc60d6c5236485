#!/usr/bin/env python3
"""Make the tiny GGUF model fixtures in tests/fixtures/gguf/.

Run by hand, never in CI. It needs the pinned environment of
scripts/fixtures-requirements.txt (torch, transformers, numpy, gguf):

    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -r scripts/fixtures-requirements.txt
    .venv-fixtures/bin/python scripts/make_gguf_fixtures.py            # (re)write tests/fixtures/gguf/
    .venv-fixtures/bin/python scripts/make_gguf_fixtures.py --check    # regenerate into a temp dir, compare sha256s
    .venv-fixtures/bin/python scripts/make_gguf_fixtures.py --verify   # read every .gguf back on its own and
                                                                       # recompute its expected.json
    .venv-fixtures/bin/python scripts/make_gguf_fixtures.py --out DIR  # write somewhere else

Four files are conversions of the Hugging Face fixtures in tests/fixtures/hf/
(made by scripts/make_fixtures.py), written the way llama.cpp's
convert_hf_to_gguf.py followed by `llama-quantize --pure` would write them:
the converter's metadata keys and tensor names, Q/K rows permuted for the
`llama` and `granitemoe` archs (LlamaModel.permute), experts stacked into
3-D `ffn_{gate,up,down}_exps`, Granite's fused input_linear split into gate
(first half) and up (second half), routers, norms, biases and every 1-D tensor
F32, every other tensor in the file's quant type where its ne[0] (the numpy
last dim) is a multiple of 32, otherwise F16. The fifth, qwen3_moe-k, is a new
seeded Qwen3-MoE model whose experts are Q4_K / Q6_K blocks of random bytes
(gguf-py cannot quantize to K types) and whose reference model is given exactly
those dequantized weights.

Each <stem>.gguf has a <stem>.expected.json: the ggml type and ne of every
tensor, the metadata, the prompt ids (the HF tokenizer, no BOS) and the
reference output of transformers (float32, eager attention) run on weights
that are exactly what the GGUF holds: each stored tensor read back from the
written file with gguf.GGUFReader, dequantized with gguf.quants.dequantize
(F16 upcast exactly), Q/K rows un-permuted, experts unstacked, loaded into the
HF model with no missing or unexpected keys. Logits at every prompt position
(flat, row-major [T, V]) and a 16-token greedy continuation (manual argmax
loop, full recomputation each step), floats written as the shortest decimal
that round-trips to the float32.

blocks.json holds golden vectors for a dequantizer: two blocks of random (but
valid: finite f16 scales) bytes per type and gguf.quants.dequantize's output.

Nothing is fetched (HF_HUB_OFFLINE=1); the only inputs are tests/fixtures/hf/.
"""

from __future__ import annotations

import os

# Before torch/tokenizers are imported: offline, one thread (deterministic
# reductions, and modest CPU use).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from gguf.quants import dequantize, quantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
HF_ROOT = REPO / "tests" / "fixtures" / "hf"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gguf"

NEW_TOKENS = 16
SEED = 20250101
# The fixture tokenizer's pre_tokenizer is {"type": "ByteLevel", "add_prefix_space": false,
# "use_regex": true}: the GPT-2 split regex. llama.cpp names that pre-tokenizer "gpt-2".
TOKENIZER_PRE = "gpt-2"

# Per file: the stem, the HF fixture it converts (None: generated here), the GGUF arch,
# the quant type of the 2-D+ weights whose ne[0] % 32 == 0, and general.file_type.
FILES: list[dict] = [
    dict(stem="qwen2_moe-q8_0", source="qwen2_moe", arch="qwen2moe", quant=T.Q8_0,
         ftype=LlamaFileType.MOSTLY_Q8_0),
    dict(stem="olmoe-q4_0", source="olmoe", arch="olmoe", quant=T.Q4_0,
         ftype=LlamaFileType.MOSTLY_Q4_0),
    dict(stem="granitemoe-f16", source="granitemoe", arch="granitemoe", quant=T.F16,
         ftype=LlamaFileType.MOSTLY_F16),
    dict(stem="mixtral-q4_0", source="mixtral", arch="llama", quant=T.Q4_0,
         ftype=LlamaFileType.MOSTLY_Q4_0),
    dict(stem="qwen3_moe-k", source=None, arch="qwen3moe", quant=None,
         ftype=LlamaFileType.MOSTLY_Q4_K_M),
]

# The generated Qwen3-MoE: dims that allow K-quants (ne[0] % 256 == 0 for every expert tensor).
K_TOKENIZER_FROM = "qwen3_moe"  # tokenizer files (and vocab size) reused from this HF fixture
K_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,  # no dense layer uses it; written as feed_forward_length (a reader must
    # take the expert width from expert_feed_forward_length)
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=256,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    tie_word_embeddings=False,
    attention_bias=False,
)
K_EMBED_STD = 0.15
# Scale fields of the random K-quant blocks (f16). Q4_K: d ~ U(0.75, 1.25) * Q4K_D and
# dmin ~ U(0.75, 1.25) * 7.5 * Q4K_D (7.5 = the mean 4-bit quant, so the mean weight is ~0);
# Q6_K: d ~ U(0.75, 1.25) * Q6K_D (f16 subnormals, as in real Q6_K files). Both give
# dequantized weights with std ~0.035.
Q4K_D = 1.35e-4
Q6K_D = 2.6e-5

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K]
# Byte offsets of the f16 scale fields in a block of each type (ggml-common.h).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


# ----------------------------------------------------------------------------
# Small helpers


def f32(x) -> float:
    """The float32 value as the float whose repr is its shortest round-trip decimal."""
    return float(str(np.float32(x)))


def f32_list(a: np.ndarray) -> list[float]:
    return [float(str(v)) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), on a numpy [rows, ...] array."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Every stored tensor of an HF fixture, upcast exactly to float32 numpy."""
    sd = {}
    for st in sorted(model_dir.glob("*.safetensors")):
        for name, t in safetensors.torch.load_file(str(st)).items():
            sd[name] = t.to(torch.float32).numpy()
    return sd


# ----------------------------------------------------------------------------
# HF <-> GGUF tensor mapping (convert_hf_to_gguf.py's modify_tensors, and its inverse)


def hf_to_gguf(arch: str, sd: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Float32 GGUF tensors (numpy shapes, i.e. ne reversed), in the order they are written."""
    sd = dict(sd)
    out: dict[str, np.ndarray] = {}
    L = cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    undo_permute = arch in ("llama", "granitemoe")

    def take(n: str) -> np.ndarray:
        return sd.pop(n)

    out["token_embd.weight"] = take("model.embed_tokens.weight")
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        for hf, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            for kind in ("weight", "bias"):
                n = f"{p}self_attn.{hf}_proj.{kind}"
                if n not in sd:
                    continue
                t = take(n)
                if undo_permute and hf == "q":
                    t = permute(t, H, H)
                if undo_permute and hf == "k":
                    t = permute(t, H, Hkv)
                out[f"{b}{gg}.{kind}"] = t
        for hf, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            n = f"{p}self_attn.{hf}.weight"
            if n in sd:
                out[f"{b}{gg}.weight"] = take(n)
        out[b + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        if arch == "llama":  # Mixtral
            X = cfg["num_local_experts"]
            m = p + "block_sparse_moe."
            out[b + "ffn_gate_inp.weight"] = take(m + "gate.weight")
            for w, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                out[f"{b}{gg}.weight"] = np.stack([take(f"{m}experts.{x}.{w}.weight") for x in range(X)])
        elif arch == "granitemoe":
            F = cfg["intermediate_size"]
            m = p + "block_sparse_moe."
            out[b + "ffn_gate_inp.weight"] = take(m + "router.layer.weight")
            inp = take(m + "input_linear.weight")  # [X, 2F, E]
            assert inp.shape[-2] == 2 * F
            out[b + "ffn_gate_exps.weight"] = np.ascontiguousarray(inp[:, :F, :])
            out[b + "ffn_up_exps.weight"] = np.ascontiguousarray(inp[:, F:, :])
            out[b + "ffn_down_exps.weight"] = take(m + "output_linear.weight")
        else:  # qwen2moe, qwen3moe, olmoe
            m = p + "mlp."
            if m + "gate.weight" in sd:
                X = cfg["num_experts"]
                out[b + "ffn_gate_inp.weight"] = take(m + "gate.weight")
                for w, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                              ("down_proj", "ffn_down_exps")):
                    out[f"{b}{gg}.weight"] = np.stack([take(f"{m}experts.{x}.{w}.weight") for x in range(X)])
                if m + "shared_expert_gate.weight" in sd:  # qwen2moe
                    g = take(m + "shared_expert_gate.weight")  # [1, E]
                    assert g.shape[0] == 1
                    out[b + "ffn_gate_inp_shexp.weight"] = g.reshape(-1)
                    for w, gg in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"),
                                  ("down_proj", "ffn_down_shexp")):
                        out[f"{b}{gg}.weight"] = take(f"{m}shared_expert.{w}.weight")
            else:  # a dense layer (qwen mlp_only_layers)
                for w, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                    out[f"{b}{gg}.weight"] = take(f"{m}{w}.weight")
    out["output_norm.weight"] = take("model.norm.weight")
    if not cfg.get("tie_word_embeddings", False):
        out["output.weight"] = take("lm_head.weight")
    sd.pop("lm_head.weight", None)
    assert not sd, f"unmapped HF tensors: {sorted(sd)}"
    return out


def gguf_to_hf(arch: str, g: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """The inverse of hf_to_gguf: HF state-dict names and layouts (lm_head included when tied)."""
    g = dict(g)
    sd: dict[str, np.ndarray] = {}
    L = cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    undo_permute = arch in ("llama", "granitemoe")

    def take(n: str) -> np.ndarray:
        return g.pop(n)

    sd["model.embed_tokens.weight"] = take("token_embd.weight")
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd[p + "input_layernorm.weight"] = take(b + "attn_norm.weight")
        for hf, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            for kind in ("weight", "bias"):
                n = f"{b}{gg}.{kind}"
                if n not in g:
                    continue
                t = take(n)
                if undo_permute and hf == "q":
                    t = unpermute(t, H, H)
                if undo_permute and hf == "k":
                    t = unpermute(t, H, Hkv)
                sd[f"{p}self_attn.{hf}_proj.{kind}"] = t
        for hf, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            n = f"{b}{gg}.weight"
            if n in g:
                sd[f"{p}self_attn.{hf}.weight"] = take(n)
        sd[p + "post_attention_layernorm.weight"] = take(b + "ffn_norm.weight")
        if arch == "llama":
            m = p + "block_sparse_moe."
            sd[m + "gate.weight"] = take(b + "ffn_gate_inp.weight")
            for w, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                for x, t in enumerate(take(f"{b}{gg}.weight")):
                    sd[f"{m}experts.{x}.{w}.weight"] = t
        elif arch == "granitemoe":
            m = p + "block_sparse_moe."
            sd[m + "router.layer.weight"] = take(b + "ffn_gate_inp.weight")
            sd[m + "input_linear.weight"] = np.concatenate(
                [take(b + "ffn_gate_exps.weight"), take(b + "ffn_up_exps.weight")], axis=1)
            sd[m + "output_linear.weight"] = take(b + "ffn_down_exps.weight")
        else:
            m = p + "mlp."
            if b + "ffn_gate_inp.weight" in g:
                sd[m + "gate.weight"] = take(b + "ffn_gate_inp.weight")
                for w, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                              ("down_proj", "ffn_down_exps")):
                    for x, t in enumerate(take(f"{b}{gg}.weight")):
                        sd[f"{m}experts.{x}.{w}.weight"] = t
                if b + "ffn_gate_inp_shexp.weight" in g:
                    sd[m + "shared_expert_gate.weight"] = take(b + "ffn_gate_inp_shexp.weight").reshape(1, -1)
                    for w, gg in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"),
                                  ("down_proj", "ffn_down_shexp")):
                        sd[f"{m}shared_expert.{w}.weight"] = take(f"{b}{gg}.weight")
            else:
                for w, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                    sd[f"{m}{w}.weight"] = take(f"{b}{gg}.weight")
    sd["model.norm.weight"] = take("output_norm.weight")
    if "output.weight" in g:
        sd["lm_head.weight"] = take("output.weight")
    else:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    assert not g, f"unmapped GGUF tensors: {sorted(g)}"
    return sd


# ----------------------------------------------------------------------------
# Tensor types


def is_f32_tensor(name: str, arr: np.ndarray) -> bool:
    """What the converter and llama-quantize keep in F32: 1-D tensors, norms, the MoE routers."""
    return arr.ndim == 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def pure_type(name: str, arr: np.ndarray, quant: T) -> T:
    """`llama-quantize --pure` with the quant type `quant` on a converter's F16 output."""
    if is_f32_tensor(name, arr):
        return T.F32
    if quant == T.F16:
        return T.F16
    block = gguf.GGML_QUANT_SIZES[quant][0]
    return quant if arr.shape[-1] % block == 0 else T.F16


def k_file_type(name: str, arr: np.ndarray) -> T:
    """qwen3_moe-k: experts Q4_K (gate, up) / Q6_K (down), attention Q8_0, token_embd F16, output F32."""
    if is_f32_tensor(name, arr):
        return T.F32
    if name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
        return T.Q4_K
    if name.endswith("ffn_down_exps.weight"):
        return T.Q6_K
    if ".attn_" in name:
        return T.Q8_0
    if name == "token_embd.weight":
        return T.F16
    if name == "output.weight":
        return T.F32
    raise ValueError(f"qwen3_moe-k: no type for {name}")


def encode(arr: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(arr.astype(np.float16))
    return quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    """Random bytes laid out as `shape` (numpy, last dim = ne[0]) of qtype, with finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert shape[-1] % block == 0, (shape, qtype)
    n_blocks = int(np.prod(shape)) // block
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if qtype == T.Q4_K:
        d = Q4K_D * rng.uniform(0.75, 1.25, size=(n_blocks, 1))
        dmin = 7.5 * Q4K_D * rng.uniform(0.75, 1.25, size=(n_blocks, 1))
        b[:, 0:2] = d.astype(np.float16).view(np.uint8)
        b[:, 2:4] = dmin.astype(np.float16).view(np.uint8)
    elif qtype == T.Q6_K:
        d = Q6K_D * rng.uniform(0.75, 1.25, size=(n_blocks, 1))
        b[:, 208:210] = d.astype(np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return b.reshape(*shape[:-1], shape[-1] // block * size)


# ----------------------------------------------------------------------------
# Tokenizer metadata (convert_hf_to_gguf.py's _set_vocab_gpt2 + gguf.SpecialVocab)


def tokenizer_meta(tok_dir: Path, vocab_size: int, cfg: dict, gen_cfg: dict) -> dict:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE", tj["model"]["type"]
    pre = tj["pre_tokenizer"]
    # Plain ByteLevel with the GPT-2 regex (see TOKENIZER_PRE): anything else needs another name.
    assert pre == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, pre
    assert tj["normalizer"] is None, tj["normalizer"]
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    special: set[int] = set()
    for at in tj["added_tokens"]:
        assert by_id.get(at["id"], at["content"]) == at["content"], at
        by_id[at["id"]] = at["content"]
        if at["special"]:
            special.add(at["id"])
    assert max(by_id) < vocab_size, (max(by_id), vocab_size)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL))
    merges = []
    for m in tj["model"]["merges"]:
        pair = m if isinstance(m, list) else m.split(" ", 1)
        assert len(pair) == 2
        merges.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair))

    def ident(key: str):
        v = gen_cfg.get(key, cfg.get(key))
        return v[0] if isinstance(v, list) else v

    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": TOKENIZER_PRE,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": ident("bos_token_id"),
        "tokenizer.ggml.eos_token_id": ident("eos_token_id"),
    }
    # SpecialVocab also takes pad_token_id from config.json (OLMoE's config has one).
    if cfg.get("pad_token_id") is not None:
        meta["tokenizer.ggml.padding_token_id"] = cfg["pad_token_id"]
    meta["tokenizer.ggml.add_bos_token"] = False
    return meta


# ----------------------------------------------------------------------------
# Model metadata (TextModel / LlamaModel / Qwen2MoeModel / OlmoeModel / GraniteMoeModel
# set_gguf_parameters)


def model_meta(arch: str, cfg: dict, name: str, ftype: int) -> list[tuple[str, str, object]]:
    """(key, gguf value type, value) in the order written."""
    a = arch
    kv: list[tuple[str, str, object]] = [
        ("general.type", "str", "model"),
        ("general.name", "str", name),
        (f"{a}.vocab_size", "u32", cfg["vocab_size"]),
        (f"{a}.block_count", "u32", cfg["num_hidden_layers"]),
        (f"{a}.context_length", "u32", cfg["max_position_embeddings"]),
        (f"{a}.embedding_length", "u32", cfg["hidden_size"]),
        (f"{a}.feed_forward_length", "u32", cfg["intermediate_size"]),
        (f"{a}.attention.head_count", "u32", cfg["num_attention_heads"]),
        (f"{a}.attention.head_count_kv", "u32", cfg["num_key_value_heads"]),
        (f"{a}.rope.freq_base", "f32", cfg["rope_theta"]),
        # OlmoeModel writes a hard-coded 1e-5 (the fixture's rms_norm_eps is 1e-5 too).
        (f"{a}.attention.layer_norm_rms_epsilon", "f32", 1e-5 if arch == "olmoe" else cfg["rms_norm_eps"]),
    ]
    n_exp = cfg.get("num_local_experts") if arch in ("llama", "granitemoe") else cfg.get("num_experts")
    kv.append((f"{a}.expert_count", "u32", n_exp))
    kv.append((f"{a}.expert_used_count", "u32", cfg["num_experts_per_tok"]))
    if cfg.get("head_dim") is not None and arch != "granitemoe":  # GraniteModel pops head_dim
        kv.append((f"{a}.attention.key_length", "u32", cfg["head_dim"]))
        kv.append((f"{a}.attention.value_length", "u32", cfg["head_dim"]))
    if arch in ("llama", "granitemoe"):  # LlamaModel.set_gguf_parameters
        rope_dim = cfg.get("head_dim") if arch == "llama" else None
        rope_dim = rope_dim or cfg["hidden_size"] // cfg["num_attention_heads"]
        kv.append((f"{a}.rope.dimension_count", "u32", rope_dim))
    if arch in ("qwen2moe", "qwen3moe"):
        kv.append((f"{a}.expert_feed_forward_length", "u32", cfg["moe_intermediate_size"]))
    if arch == "qwen2moe":
        kv.append((f"{a}.expert_shared_feed_forward_length", "u32", cfg["shared_expert_intermediate_size"]))
    if arch == "granitemoe":
        kv.append((f"{a}.attention.scale", "f32", cfg["attention_multiplier"]))
        kv.append((f"{a}.embedding_scale", "f32", cfg["embedding_multiplier"]))
        kv.append((f"{a}.residual_scale", "f32", cfg["residual_multiplier"]))
        kv.append((f"{a}.logit_scale", "f32", cfg["logits_scaling"]))
    kv.append(("general.file_type", "u32", int(ftype)))
    return kv


def write_gguf(path: Path, arch: str, kv: list, tok: dict, tensors: list[tuple[str, np.ndarray, T]]) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, typ, val in kv:
        if typ == "u32":
            w.add_uint32(key, int(val))
        elif typ == "f32":
            w.add_float32(key, float(val))
        elif typ == "str":
            w.add_string(key, val)
        else:
            raise ValueError(typ)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.padding_token_id" in tok:
        w.add_pad_token_id(tok["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(tok["tokenizer.ggml.add_bos_token"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, qtype in tensors:
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------
# Reading back


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray], dict[str, dict]]:
    """The reader, every tensor dequantized to float32 (numpy shape), and name -> {type, ne}."""
    r = gguf.GGUFReader(str(path))
    deq, info = {}, {}
    for t in r.tensors:
        qt = T(int(t.tensor_type))
        data = np.array(t.data)  # copy out of the memmap
        if qt == T.F32:
            v = data.astype(np.float32)
        elif qt == T.F16:
            v = data.astype(np.float32)  # exact
        else:
            v = dequantize(data, qt)
        ne = [int(x) for x in t.shape]
        assert list(v.shape) == ne[::-1], (t.name, v.shape, ne)
        deq[t.name] = v
        info[t.name] = {"type": qt.name, "ne": ne}
    return r, deq, info


def field(r: gguf.GGUFReader, key: str):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def metadata_summary(r: gguf.GGUFReader) -> dict:
    out = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list):
            out[key] = {"array_len": len(v), "first": v[:4]}
        elif isinstance(v, float):
            out[key] = f32(v)
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------
# The reference


def build_model(hf_config, sd: dict[str, np.ndarray]) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    own = model.state_dict()
    want = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing = sorted(set(own) - set(want))
    unexpected = sorted(set(want) - set(own))
    assert not missing and not unexpected, f"missing {missing} unexpected {unexpected}"
    for k, v in want.items():
        assert tuple(own[k].shape) == tuple(v.shape), (k, own[k].shape, v.shape)
    model.load_state_dict(want, strict=True)
    if hf_config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in want.items():  # nothing was cast or altered on the way in
        assert torch.equal(model.state_dict()[k], v), k
    return model


@torch.no_grad()
def run_reference(model: torch.nn.Module, input_ids: list[int]) -> dict:
    logits = model(input_ids=torch.tensor([input_ids], dtype=torch.long), use_cache=False).logits[0]
    assert logits.dtype == torch.float32
    seq = list(input_ids)
    new, margins = [], []
    for _ in range(NEW_TOKENS):
        last = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1]
        nxt = int(torch.argmax(last))
        top2 = torch.topk(last, 2).values
        new.append(nxt)
        margins.append(f32(top2[0] - top2[1]))
        seq.append(nxt)
    return {"logits": logits.numpy().astype(np.float32), "new_tokens": new, "margins": margins}


def reference_config(spec: dict, cfg: dict):
    """The transformers config the reference runs: the source's, with what GGUF cannot carry removed."""
    cfg = dict(cfg)
    notes = []
    if spec["arch"] == "llama" and cfg.get("sliding_window") is not None:
        # The converter writes no sliding window for the `llama` arch and llama.cpp's llama graph has
        # none: the GGUF describes full causal attention.
        notes.append(f"sliding_window {cfg['sliding_window']} of the HF config dropped (full causal attention): "
                     "the llama arch has no sliding-window key")
        cfg["sliding_window"] = None
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        cfg.pop(k, None)
    return AutoConfig.for_model(model_type, **cfg), notes


# ----------------------------------------------------------------------------
# Config from GGUF metadata alone (--verify)


def config_from_gguf(r: gguf.GGUFReader, names: set[str]):
    arch = field(r, "general.architecture")
    g = lambda k, d=None: (lambda v: d if v is None else v)(field(r, f"{arch}.{k}"))  # noqa: E731
    n_layer = g("block_count")
    common = dict(
        vocab_size=g("vocab_size", len(field(r, "tokenizer.ggml.tokens"))),
        max_position_embeddings=g("context_length"),
        hidden_size=g("embedding_length"),
        num_hidden_layers=n_layer,
        num_attention_heads=g("attention.head_count"),
        num_key_value_heads=g("attention.head_count_kv", g("attention.head_count")),
        rope_theta=g("rope.freq_base", 10000.0),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        bos_token_id=field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(r, "tokenizer.ggml.eos_token_id"),
        tie_word_embeddings="output.weight" not in names,
        intermediate_size=g("feed_forward_length"),
    )
    if field(r, "tokenizer.ggml.padding_token_id") is not None:
        common["pad_token_id"] = field(r, "tokenizer.ggml.padding_token_id")
    head_dim = g("attention.key_length", common["hidden_size"] // common["num_attention_heads"])
    dense = [i for i in range(n_layer) if f"blk.{i}.ffn_gate.weight" in names]
    if arch == "llama":
        assert g("rope.dimension_count", head_dim) == head_dim
        return "mixtral", dict(common, head_dim=head_dim, num_local_experts=g("expert_count"),
                               num_experts_per_tok=g("expert_used_count"), sliding_window=None)
    if arch == "granitemoe":
        assert g("rope.dimension_count", head_dim) == head_dim
        return "granitemoe", dict(common, num_local_experts=g("expert_count"),
                                  num_experts_per_tok=g("expert_used_count"),
                                  attention_multiplier=g("attention.scale"), embedding_multiplier=g("embedding_scale"),
                                  residual_multiplier=g("residual_scale"), logits_scaling=g("logit_scale"))
    if arch == "olmoe":
        return "olmoe", dict(common, num_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                             norm_topk_prob=False, clip_qkv=None)
    if arch == "qwen2moe":
        return "qwen2_moe", dict(common, num_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                                 moe_intermediate_size=g("expert_feed_forward_length"),
                                 shared_expert_intermediate_size=g("expert_shared_feed_forward_length"),
                                 norm_topk_prob=False, qkv_bias="blk.0.attn_q.bias" in names,
                                 decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False)
    if arch == "qwen3moe":
        return "qwen3_moe", dict(common, head_dim=head_dim, num_experts=g("expert_count"),
                                 num_experts_per_tok=g("expert_used_count"),
                                 moe_intermediate_size=g("expert_feed_forward_length"),
                                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense,
                                 use_sliding_window=False, attention_bias="blk.0.attn_q.bias" in names)
    raise ValueError(arch)


# ----------------------------------------------------------------------------
# One file


def versions() -> dict:
    return {
        "gguf": importlib.metadata.version("gguf"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def generated_qwen3_moe() -> tuple[dict, dict[str, np.ndarray]]:
    """The seeded Qwen3-MoE (float32): its config dict and its state dict (experts to be replaced)."""
    tok_dir = HF_ROOT / K_TOKENIZER_FROM
    src_cfg = json.loads((tok_dir / "config.json").read_text())
    cfg = dict(K_CONFIG, model_type="qwen3_moe", vocab_size=src_cfg["vocab_size"],
               bos_token_id=src_cfg["bos_token_id"], eos_token_id=src_cfg["eos_token_id"])
    hf_cfg = AutoConfig.for_model("qwen3_moe", **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # the same init as scripts/make_fixtures.py's reinit
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("bias"):
                v = 0.1 * torch.randn(shape, generator=gen)
            elif p.dim() == 1:
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif "embed_tokens" in name:
                v = K_EMBED_STD * torch.randn(shape, generator=gen)
            else:
                v = torch.randn(shape, generator=gen) / float(shape[-1]) ** 0.5
            p.copy_(v)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return cfg, sd


def make_file(spec: dict, out: Path) -> dict:
    stem, arch = spec["stem"], spec["arch"]
    if spec["source"] is not None:
        src = HF_ROOT / spec["source"]
        cfg = json.loads((src / "config.json").read_text())
        sd = load_hf_weights(src)
        tok_dir = src
        hf_expected = json.loads((src / "expected.json").read_text())
    else:
        cfg, sd = generated_qwen3_moe()
        tok_dir = HF_ROOT / K_TOKENIZER_FROM
        hf_expected = json.loads((tok_dir / "expected.json").read_text())
    gen_cfg = json.loads((tok_dir / "generation_config.json").read_text())
    prompt = hf_expected["prompt"]

    # 1. HF -> GGUF (float32), exactly invertible.
    g = hf_to_gguf(arch, sd, cfg)
    back = gguf_to_hf(arch, g, cfg)
    for k, v in sd.items():
        assert np.array_equal(back[k], v), f"{stem}: {k} does not round-trip"

    # 2. Types and bytes.
    rng = np.random.default_rng(SEED)
    tensors = []
    for name, arr in g.items():
        if spec["quant"] is None:
            qtype = k_file_type(name, arr)
        else:
            qtype = pure_type(name, arr, spec["quant"])
        if qtype in (T.Q4_K, T.Q6_K):
            data = random_k_blocks(rng, arr.shape, qtype)
        else:
            data = encode(arr, qtype)
        tensors.append((name, data, qtype))

    # 3. Write.
    tok = tokenizer_meta(tok_dir, cfg["vocab_size"], cfg, gen_cfg)
    kv = model_meta(arch, cfg, f"amoe fixture {stem}", spec["ftype"])
    path = out / f"{stem}.gguf"
    write_gguf(path, arch, kv, tok, tensors)

    # 4. Read back what the file holds; the reference model gets exactly that.
    r, deq, info = read_gguf(path)
    assert list(info) == [n for n, _, _ in tensors], "tensor order"
    for name, data, qtype in tensors:
        assert info[name]["type"] == qtype.name, (name, info[name], qtype)
        want = dequantize(data, qtype) if qtype not in (T.F32, T.F16) else data.astype(np.float32)
        assert np.array_equal(deq[name], want), name
    hf_sd = gguf_to_hf(arch, deq, cfg)
    hf_config, notes = reference_config(spec, cfg)
    model = build_model(hf_config, hf_sd)

    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    input_ids = hf_tok.encode(prompt, add_special_tokens=False)
    assert input_ids == hf_expected["input_ids"], (input_ids, hf_expected["input_ids"])
    ref = run_reference(model, input_ids)
    logits = ref["logits"]

    expected = {
        "file": path.name,
        "arch": arch,
        "source": f"tests/fixtures/hf/{spec['source']}" if spec["source"] else
        f"generated by scripts/make_gguf_fixtures.py (Qwen3MoeForCausalLM, seed {SEED}; tokenizer of "
        f"tests/fixtures/hf/{K_TOKENIZER_FROM})",
        "file_type": int(spec["ftype"]),
        "file_type_name": LlamaFileType(int(spec["ftype"])).name,
        "hf_config": {k: v for k, v in hf_config.to_diff_dict().items() if k not in ("transformers_version",)},
        "qk_permuted": arch in ("llama", "granitemoe"),
        "notes": notes,
        "metadata": metadata_summary(r),
        "tensors": info,
        "prompt": prompt,
        "input_ids": input_ids,
        "bos_prepended": False,
        "logits_shape": list(logits.shape),
        "logits": f32_list(logits),
        "logits_note": "float32 logits at every prompt position, row-major [T, V] flattened, computed by transformers "
        "in float32 with eager attention from the weights the GGUF holds (dequantized with gguf.quants.dequantize, "
        "F16 upcast exactly, Q/K un-permuted); each number is the shortest decimal that round-trips to the float32",
        "greedy": {
            "new_tokens": ref["new_tokens"],
            "margins": ref["margins"],
            "text": hf_tok.decode(ref["new_tokens"], skip_special_tokens=False),
            "note": "manual loop: full recomputation each step, argmax (first index on exact ties), no stop at eos; "
            "margins[i] = top1 - top2 of the logits that chose new_tokens[i]",
        },
        "versions": versions(),
        "seed": SEED,
    }
    if spec["source"] is None:
        expected["dequant_head"] = {
            name: f32_list(deq[name][0].reshape(-1)[:8]) for name, _, q in tensors if q in (T.Q4_K, T.Q6_K)
        }
        expected["dequant_head_note"] = ("first 8 dequantized values of expert 0 (row 0, columns 0..7 in the numpy "
                                         "layout, i.e. the first 8 elements of the tensor) of every K-quant tensor")
        expected["kquant_std"] = {name: f32(deq[name].std()) for name, _, q in tensors if q in (T.Q4_K, T.Q6_K)}
    write_json(out / f"{stem}.expected.json", expected)

    # Against the source fixture's own (unquantized, and for mixtral windowed) logits: for information.
    hf_logits = np.array(hf_expected["logits"], dtype=np.float32).reshape(-1)
    diff = float(np.abs(hf_logits - logits.reshape(-1)).max()) if spec["source"] else None
    same_greedy = ref["new_tokens"] == hf_expected["greedy"]["new_tokens"] if spec["source"] else None
    return {"stem": stem, "size": path.stat().st_size, "types": info, "vs_hf_max_abs": diff,
            "vs_hf_same_greedy": same_greedy, "greedy": ref["new_tokens"]}


# ----------------------------------------------------------------------------
# blocks.json


def make_blocks(out: Path) -> None:
    rng = np.random.default_rng(SEED + 1)
    entries = []
    for qtype in BLOCK_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        b = rng.integers(0, 256, size=(2, size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            # Block 0: normal f16 scales in [0.001, 0.05) with a random sign; block 1: f16 subnormals
            # (< 2^-14 = 6.1e-5, positive), as Q6_K's d often is in real files.
            v0 = rng.uniform(0.001, 0.05) * (1 if rng.random() < 0.5 else -1)
            v1 = rng.uniform(1e-6, 6e-5)
            b[0, off:off + 2] = np.array([v0], dtype=np.float16).view(np.uint8)
            b[1, off:off + 2] = np.array([v1], dtype=np.float16).view(np.uint8)
            assert np.array([v1], dtype=np.float16)[0] < np.float16(2.0 ** -14)
        vals = dequantize(b.reshape(-1), qtype)
        assert vals.shape == (2 * block,) and np.isfinite(vals).all()
        entries.append({
            "type": qtype.name,
            "type_id": int(qtype),
            "block_size": block,
            "type_size": size,
            "n_blocks": 2,
            "f16_scale_offsets": F16_FIELDS[qtype],
            "hex": b.reshape(-1).tobytes().hex(),
            "values": f32_list(vals),
        })
    write_json(out / "blocks.json", {
        "note": "golden vectors for a ggml dequantizer: per type, 2 consecutive blocks of random bytes whose f16 "
        "scale fields (f16_scale_offsets, per block) were set to finite values (block 0: normal, |d| in "
        "[0.001, 0.05); block 1: f16 subnormals), and gguf.quants.dequantize's float32 output for the whole "
        "2-block byte string (shortest round-trip decimals)",
        "seed": SEED + 1,
        "versions": {"gguf": importlib.metadata.version("gguf"), "numpy": np.__version__},
        "blocks": entries,
    })


# ----------------------------------------------------------------------------
# Driver


def generated_names() -> list[str]:
    names = ["blocks.json"]
    for spec in FILES:
        names += [f"{spec['stem']}.gguf", f"{spec['stem']}.expected.json"]
    return names


def generate(out: Path) -> list[dict]:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    make_blocks(out)
    print(f"wrote {out / 'blocks.json'}", flush=True)
    results = []
    for spec in FILES:
        res = make_file(spec, out)
        results.append(res)
        extra = ""
        if res["vs_hf_max_abs"] is not None:
            extra = (f"; vs the HF fixture's logits: max |diff| {res['vs_hf_max_abs']:.3g}, "
                     f"same greedy: {res['vs_hf_same_greedy']}")
        print(f"wrote {out / (spec['stem'] + '.gguf')} ({res['size']} bytes){extra}", flush=True)
    return results


def digests(root: Path) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in generated_names() if (root / n).exists()}


def check(against: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="amoe-gguf-fixtures-") as tmp:
        generate(Path(tmp))
        new = digests(Path(tmp))
    old = digests(against)
    bad = 0
    for path in sorted(set(new) | set(old)):
        if new.get(path) != old.get(path):
            bad += 1
            print(f"DIFFERS: {path}  committed={old.get(path, 'absent')[:16]} regenerated={new.get(path, 'absent')[:16]}")
    print(f"{len(new)} files regenerated, {bad} differ")
    return 1 if bad else 0


def verify(root: Path) -> int:
    """Rebuild each reference from the .gguf alone (hparams from its metadata, weights dequantized from its
    tensors, tokens from its vocab) and compare with its expected.json, bit for bit."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    bad = 0
    for spec in FILES:
        path = root / f"{spec['stem']}.gguf"
        exp = json.loads((root / f"{spec['stem']}.expected.json").read_text())
        r, deq, info = read_gguf(path)
        print(f"== {path.name}: {len(r.tensors)} tensors, {len(r.fields)} fields, arch {field(r, 'general.architecture')}")
        by_type: dict[str, list[str]] = {}
        for name, i in info.items():
            by_type.setdefault(i["type"], []).append(f"{name}{i['ne']}")
        for typ, names in sorted(by_type.items()):
            print(f"   {typ:5s} ({len(names)}): {', '.join(names)}")
        assert info == exp["tensors"], "tensor table differs from expected.json"
        model_type, cfg = config_from_gguf(r, set(info))
        ref_cfg = exp["hf_config"]
        for k, v in cfg.items():  # what the metadata says = what the reference ran
            rv = ref_cfg.get(k, getattr(AutoConfig.for_model(model_type), k, None))
            same = f32(v) == f32(rv) if isinstance(v, float) or isinstance(rv, float) else v == rv
            if not same:
                print(f"   config {k}: from GGUF {v!r}, reference {rv!r}")
                bad += 1
        hf_config = AutoConfig.for_model(model_type, **cfg)
        model = build_model(hf_config, gguf_to_hf(spec["arch"], deq, cfg))
        tokens = field(r, "tokenizer.ggml.tokens")
        text = "".join(tokens[i] for i in exp["input_ids"])
        byte_dec = {v: k for k, v in _bytes_to_unicode().items()}
        assert bytes(byte_dec[c] for c in text).decode("utf-8") == exp["prompt"], "ids do not spell the prompt"
        ref = run_reference(model, exp["input_ids"])
        got = f32_list(ref["logits"])
        diff = float(np.abs(np.array(got) - np.array(exp["logits"])).max())
        same = got == exp["logits"] and ref["new_tokens"] == exp["greedy"]["new_tokens"]
        print(f"   logits {list(ref['logits'].shape)} max |diff| {diff:.3g}, bit-identical: {same}; "
              f"greedy {ref['new_tokens']}")
        bad += 0 if same else 1
    print("verify:", "OK" if not bad else f"{bad} problems")
    return 1 if bad else 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (the byte-level alphabet the tokens are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the files")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare sha256 with --out")
    ap.add_argument("--verify", action="store_true",
                    help="rebuild every reference from its .gguf alone and compare with its expected.json")
    args = ap.parse_args()
    if args.check:
        return check(args.out)
    if args.verify:
        return verify(args.out)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
