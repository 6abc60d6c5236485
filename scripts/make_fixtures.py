#!/usr/bin/env python3
"""Make the tiny Hugging Face model fixtures in tests/fixtures/hf/.

Run by hand, never in CI. It needs the pinned environment of
scripts/fixtures-requirements.txt:

    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -r scripts/fixtures-requirements.txt
    .venv-fixtures/bin/python scripts/make_fixtures.py           # (re)write tests/fixtures/hf/<name>/
    .venv-fixtures/bin/python scripts/make_fixtures.py --check   # regenerate into a temp dir, compare sha256s
    .venv-fixtures/bin/python scripts/make_fixtures.py --out DIR # write somewhere else
    .venv-fixtures/bin/python scripts/make_fixtures.py --check-export DIR [--prompt TEXT | --ids 1,2,3]
                                                                 # load an `amoe export --format hf`
                                                                 # directory, print its logits (JSON)

For every family it builds a tiny random model (fixed seed, float32 init, then
cast to the fixture's dtype), saves it with save_pretrained (safetensors), adds
the shared byte-level BPE tokenizer trained on web/assets/sonnets.txt, loads the
saved directory back in float32 with eager attention and writes expected.json:
the reference logits at every prompt position and a 16-token greedy
continuation (full recomputation each step, argmax, no early stop) with the
top-1/top-2 margin of each step. Floats are written as the shortest decimal
that round-trips to the float32 value (parse as f64, cast to f32: exact).

Nothing is fetched: no model or tokenizer is loaded from a hub, only from the
directories this script writes (HF_HUB_OFFLINE=1).
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
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "web" / "assets" / "sonnets.txt"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "hf"

TOKENIZER_VOCAB = 512
EOT = "<|endoftext|>"  # id 0: bos, eos and the only special token
# 26 tokens with the tokenizer below (checked at run time: 20..32).
PROMPT = "When I do count the clock that tells the time, And see the brave day"
NEW_TOKENS = 16
EMBED_STD = 0.15
SEED = 20240917

# Per fixture: the transformers config class, the model class, the config
# arguments, the dtype of the stored file, and (for one) a shard size.
# `axes` is a short note of what the fixture exercises (copied to expected.json).
COMMON = dict(
    hidden_size=64,
    max_position_embeddings=256,
    rope_theta=10000.0,
    bos_token_id=0,
    eos_token_id=0,
    vocab_size=TOKENIZER_VOCAB,
)

FIXTURES: list[dict] = [
    dict(
        name="mixtral",
        config_class="MixtralConfig",
        model_class="MixtralForCausalLM",
        dtype=torch.bfloat16,
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # != 64 / 4
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        axes="GQA 4q/2kv, explicit head_dim 24 (!= 64/4), E=4 k=2 (softmax over all E, top-k renormalized), "
        "sliding_window 8 < prompt, untied head, bf16",
    ),
    dict(
        name="qwen2_moe",
        config_class="Qwen2MoeConfig",
        model_class="Qwen2MoeForCausalLM",
        dtype=torch.float16,
        max_shard_size="200KB",
        config=dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,  # the dense layer 0
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            qkv_bias=True,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        axes="MHA 4/4 with q/k/v bias, E=8 k=4, norm_topk_prob false, shared expert (I=48) with sigmoid gate, "
        "layer 0 dense (mlp_only_layers [0], I=64), untied head, f16, sharded (index + 3 shards)",
    ),
    dict(
        name="qwen3_moe",
        config_class="Qwen3MoeConfig",
        model_class="Qwen3MoeForCausalLM",
        dtype=torch.bfloat16,
        config=dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # q_proj out 128 != hidden 64
            intermediate_size=64,  # the dense layer 0
            moe_intermediate_size=32,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        axes="GQA 4q/2kv, explicit head_dim 32 (q_proj 64->128), per-head q/k RMSNorm (weight [head_dim]), "
        "E=16 k=8, norm_topk_prob true, layer 0 dense (mlp_only_layers [0]), untied head, bf16",
    ),
    dict(
        name="olmoe",
        config_class="OlmoeConfig",
        model_class="OlmoeForCausalLM",
        dtype=torch.float32,
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            clip_qkv=None,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        axes="GQA 4q/2kv, q/k RMSNorm over the whole projection (q_norm [64], k_norm [32]) before the head split, "
        "E=8 k=4, no renormalization, untied head, f32",
    ),
    dict(
        name="granitemoe",
        config_class="GraniteMoeConfig",
        model_class="GraniteMoeForCausalLM",
        dtype=torch.bfloat16,
        embed_std=0.3,  # the residual stream starts at 0.5 * 0.3
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,  # per expert
            num_local_experts=16,
            num_experts_per_tok=8,
            embedding_multiplier=0.5,
            attention_multiplier=0.125,  # replaces 1/sqrt(head_dim) = 0.25
            residual_multiplier=2.0,
            logits_scaling=2.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        axes="GQA 4q/2kv, fused 3-D experts input_linear [E,2I,H] / output_linear [E,H,I], E=16 k=8 "
        "(softmax over the top-k logits), embedding/attention/residual multipliers and logits_scaling != 1, "
        "tied head, bf16",
    ),
    dict(
        name="llama",
        config_class="LlamaConfig",
        model_class="LlamaForCausalLM",
        dtype=torch.float16,
        config=dict(
            COMMON,
            vocab_size=TOKENIZER_VOCAB + 8,  # 8 padding rows past the tokenizer
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=96,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        axes="MQA 4q/1kv, rope_scaling llama3 (factor 8, low 1, high 4, original 64), tied head, "
        "vocab 520 > tokenizer 512 (8 padding rows), f16",
    ),
    dict(
        name="mistral",
        config_class="MistralConfig",
        model_class="MistralForCausalLM",
        dtype=torch.bfloat16,
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            sliding_window=12,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        axes="GQA 4q/2kv, explicit head_dim 32, sliding_window 12 < prompt, untied head, bf16",
    ),
    dict(
        name="qwen2",
        config_class="Qwen2Config",
        model_class="Qwen2ForCausalLM",
        dtype=torch.float32,
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        axes="GQA 4q/2kv, q/k/v bias (no o bias), tied head, f32",
    ),
    dict(
        name="qwen3",
        config_class="Qwen3Config",
        model_class="Qwen3ForCausalLM",
        dtype=torch.float16,
        config=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        axes="GQA 4q/2kv, explicit head_dim 32, per-head q/k RMSNorm, tied head, f16",
    ),
]

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ----------------------------------------------------------------------------
# Tokenizer


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE, 512 ids: <|endoftext|> = 0, the 256 byte symbols, 255 merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    assert tok.token_to_id(EOT) == 0
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


# ----------------------------------------------------------------------------
# Models


def reinit(model: torch.nn.Module, seed: int, embed_std: float) -> None:
    """Deterministic weights that make every tensor matter.

    The library init leaves norms at 1 and biases at 0 (a loader that dropped
    them would pass) and uses std 0.02 (router and output logits nearly tied).
    Here: embeddings N(0, EMBED_STD^2) (or the fixture's embed_std), so that with a tied head the token's own embedding
    does not outweigh the blocks and greedy decoding does not just repeat the
    last token; weights N(0, 1/fan_in) with fan_in the last dim
    (3-D fused expert banks too); norm weights 1 + N(0, 0.1^2); biases N(0, 0.1^2).
    Parameters are visited in named_parameters() order (tied ones once).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("bias"):
                v = 0.1 * torch.randn(shape, generator=gen)
            elif p.dim() == 1:  # RMSNorm weights
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif "embed_tokens" in name:
                v = embed_std * torch.randn(shape, generator=gen)
            else:
                v = torch.randn(shape, generator=gen) / float(shape[-1]) ** 0.5
            p.copy_(v.to(p.dtype))


def f32(x: float) -> float:
    """The float32 value as the float whose repr is its shortest round-trip decimal."""
    return float(str(np.float32(x)))


def f32_rows(t: torch.Tensor) -> list:
    a = t.detach().to(torch.float32).cpu().numpy()
    return [[float(str(v)) for v in row] for row in a]


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensor_table(model_dir: Path) -> dict:
    table = {}
    for st in sorted(model_dir.glob("*.safetensors")):
        for name, info in read_safetensors_header(st).items():
            if name == "__metadata__":
                continue
            table[name] = {"dtype": info["dtype"], "shape": info["shape"], "file": st.name}
    return dict(sorted(table.items()))


def check_layout(spec: dict, table: dict, cfg) -> None:
    """The stored names and shapes are the published checkpoints' ones (see README)."""
    name = spec["name"]
    names = set(table)
    H = cfg.hidden_size

    def has(n, shape=None):
        assert n in names, f"{name}: missing {n}"
        if shape is not None:
            assert table[n]["shape"] == list(shape), f"{name}: {n} {table[n]['shape']} != {shape}"

    has("model.embed_tokens.weight", (cfg.vocab_size, H))
    has("model.norm.weight", (H,))
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in names, f"{name}: tied head stored"
    else:
        has("lm_head.weight", (cfg.vocab_size, H))
    if name == "mixtral":
        E, I = cfg.num_local_experts, cfg.intermediate_size
        has("model.layers.0.block_sparse_moe.gate.weight", (E, H))
        for e in range(E):
            has(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight", (I, H))
            has(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight", (I, H))
            has(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight", (H, I))
    if name in ("qwen2_moe", "qwen3_moe", "olmoe"):
        E = cfg.num_experts
        I = cfg.moe_intermediate_size if name != "olmoe" else cfg.intermediate_size
        sparse = 1 if name != "olmoe" else 0
        has(f"model.layers.{sparse}.mlp.gate.weight", (E, H))
        for e in range(E):
            has(f"model.layers.{sparse}.mlp.experts.{e}.gate_proj.weight", (I, H))
            has(f"model.layers.{sparse}.mlp.experts.{e}.up_proj.weight", (I, H))
            has(f"model.layers.{sparse}.mlp.experts.{e}.down_proj.weight", (H, I))
        if name != "olmoe":  # dense first layer
            has("model.layers.0.mlp.gate_proj.weight", (cfg.intermediate_size, H))
            assert "model.layers.0.mlp.gate.weight" not in names
    if name == "qwen2_moe":
        S = cfg.shared_expert_intermediate_size
        has("model.layers.1.mlp.shared_expert.gate_proj.weight", (S, H))
        has("model.layers.1.mlp.shared_expert.down_proj.weight", (H, S))
        has("model.layers.1.mlp.shared_expert_gate.weight", (1, H))
        has("model.layers.0.self_attn.q_proj.bias", (H,))
    if name in ("qwen3_moe", "qwen3"):
        has("model.layers.0.self_attn.q_norm.weight", (cfg.head_dim,))
        has("model.layers.0.self_attn.k_norm.weight", (cfg.head_dim,))
        has("model.layers.0.self_attn.q_proj.weight", (cfg.num_attention_heads * cfg.head_dim, H))
    if name == "olmoe":
        hd = H // cfg.num_attention_heads
        has("model.layers.0.self_attn.q_norm.weight", (cfg.num_attention_heads * hd,))
        has("model.layers.0.self_attn.k_norm.weight", (cfg.num_key_value_heads * hd,))
    if name == "granitemoe":
        E, I = cfg.num_local_experts, cfg.intermediate_size
        has("model.layers.0.block_sparse_moe.input_linear.weight", (E, 2 * I, H))
        has("model.layers.0.block_sparse_moe.output_linear.weight", (E, H, I))
        has("model.layers.0.block_sparse_moe.router.layer.weight", (E, H))
    if name == "qwen2":
        for p in ("q", "k", "v"):
            has(f"model.layers.0.self_attn.{p}_proj.bias")
        assert "model.layers.0.self_attn.o_proj.bias" not in names
    if name in ("mixtral", "mistral"):
        has("model.layers.0.self_attn.q_proj.weight", (cfg.num_attention_heads * cfg.head_dim, H))
    want = DTYPE_NAMES[spec["dtype"]]
    st_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[want]
    bad = [n for n, i in table.items() if i["dtype"] != st_dtype]
    assert not bad, f"{name}: tensors not {st_dtype}: {bad[:3]}"


@torch.no_grad()
def reference(model_dir: Path, input_ids: list[int]) -> dict:
    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{model_dir.name}: {key}: {info[key]}"
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([input_ids], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0]
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
    return {"logits": f32_rows(logits), "new_tokens": new, "margins": margins}


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def make_fixture(spec: dict, tok: Tokenizer, out_root: Path, input_ids: list[int]) -> None:
    out = out_root / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config_class = getattr(transformers, spec["config_class"])
    model_class = getattr(transformers, spec["model_class"])
    cfg = config_class(**spec["config"])
    assert cfg.vocab_size >= tok.get_vocab_size()
    torch.manual_seed(SEED)
    model = model_class(cfg)  # float32 (the default dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reinit(model, SEED, spec.get("embed_std", EMBED_STD))
    model.to(spec["dtype"])
    model.eval()
    kwargs = {}
    if "max_shard_size" in spec:
        kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
    save_tokenizer(tok, out, cfg.max_position_embeddings)
    del model

    saved_cfg = json.loads((out / "config.json").read_text())
    table = tensor_table(out)
    check_layout(spec, table, cfg)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if "max_shard_size" in spec:
        assert 2 <= len(shards) <= 3 and (out / "model.safetensors.index.json").exists(), shards
    else:
        assert shards == ["model.safetensors"], shards

    ref = reference(out, input_ids)
    expected = {
        "model_type": saved_cfg["model_type"],
        "architecture": spec["model_class"],
        "dtype": DTYPE_NAMES[spec["dtype"]],
        "axes": spec["axes"],
        "prompt": PROMPT,
        "input_ids": input_ids,
        "bos_prepended": False,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "logits_shape": [len(input_ids), cfg.vocab_size],
        "logits": ref["logits"],
        "logits_note": "float32 logits at every prompt position, computed in float32 with eager attention from "
        "the stored weights (upcast exactly); each number is the shortest decimal that round-trips to the float32",
        "greedy": {
            "new_tokens": ref["new_tokens"],
            "margins": ref["margins"],
            "text": tok.decode(ref["new_tokens"], skip_special_tokens=False),
            "note": "manual loop: full recomputation each step, argmax (first index on exact ties), no stop at eos; "
            "margins[i] = top1 - top2 of the logits that chose new_tokens[i]",
        },
        "tensors": table,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "seed": SEED,
    }
    write_json(out / "expected.json", expected)


def generate(out_root: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = train_tokenizer()
    input_ids = tok.encode(PROMPT).ids
    assert 20 <= len(input_ids) <= 32, len(input_ids)
    assert tok.decode(input_ids) == PROMPT
    out_root.mkdir(parents=True, exist_ok=True)
    for spec in FIXTURES:
        make_fixture(spec, tok, out_root, input_ids)
        print(f"wrote {out_root / spec['name']}", flush=True)


def digests(root: Path) -> dict[str, str]:
    out = {}
    for spec in FIXTURES:
        d = root / spec["name"]
        if not d.exists():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check(against: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="amoe-fixtures-") as tmp:
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


def check_export(model_dir: Path, prompt: str, ids: list[int] | None, against: Path | None) -> int:
    """Load a directory written by `amoe export --format hf` the way the fixtures' reference is made
    (float32, eager attention, every stored tensor used and none missing), tokenize the prompt with
    its own tokenizer files, and print JSON: the ids, the float32 logits at every position (shortest
    round-trip decimals), a 16-token greedy continuation. With --against FILE (a JSON object with
    "logits" [T][V] and optionally the "input_ids" they were computed for, which are then run
    instead of the prompt: e.g. amoe's CPU forward written by tests/hf_export.rs), also the largest
    absolute difference."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    config = json.loads((model_dir / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    theirs = json.loads(against.read_text()) if against is not None else None
    if ids is None and theirs is not None and theirs.get("input_ids"):
        ids = [int(x) for x in theirs["input_ids"]]  # the ids the other side ran
    input_ids = ids if ids is not None else tok.encode(prompt, add_special_tokens=False)
    if not input_ids:
        print("check-export: no input ids", file=sys.stderr)
        return 1
    ref = reference(model_dir, input_ids)
    out = {
        "model_dir": str(model_dir),
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
        "prompt": prompt if ids is None else None,
        "input_ids": input_ids,
        "logits_shape": [len(ref["logits"]), len(ref["logits"][0])],
        "logits": ref["logits"],
        "greedy": {
            "new_tokens": ref["new_tokens"],
            "margins": ref["margins"],
            "text": tok.decode(ref["new_tokens"], skip_special_tokens=False),
        },
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    if theirs is not None:
        other = np.array(theirs["logits"], dtype=np.float64)
        ours = np.array(ref["logits"], dtype=np.float64)
        if other.shape != ours.shape:
            print(f"check-export: {against} has logits {list(other.shape)}, the export {list(ours.shape)}", file=sys.stderr)
            return 1
        diff = float(np.abs(other - ours).max())
        out["max_abs_diff"] = diff
        print(f"max |logit difference| against {against}: {diff:.3g}", file=sys.stderr)
    print(json.dumps(out, separators=(",", ":"), allow_nan=False))
    print(
        f"{model_dir}: {out['architecture']} loaded, {len(input_ids)} ids, logits {out['logits_shape']}, "
        f"greedy {out['greedy']['text']!r}",
        file=sys.stderr,
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the fixture directories")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare sha256 with --out")
    ap.add_argument("--check-export", type=Path, metavar="DIR",
                    help="load a directory written by `amoe export --format hf` and print its logits (JSON)")
    ap.add_argument("--prompt", default=PROMPT, help="with --check-export: the text to run")
    ap.add_argument("--ids", help="with --check-export: comma-separated token ids instead of --prompt")
    ap.add_argument("--against", type=Path, metavar="FILE",
                    help='with --check-export: JSON with "logits" [T][V] (and "input_ids", run instead of '
                    '--prompt) to compare; prints the max abs difference')
    args = ap.parse_args()
    if args.check_export is not None:
        ids = [int(x) for x in args.ids.split(",")] if args.ids else None
        return check_export(args.check_export, args.prompt, ids, args.against)
    if args.check:
        return check(args.out)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
