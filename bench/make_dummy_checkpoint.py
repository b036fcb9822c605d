#!/usr/bin/env python3
"""Writes a real-layout Hugging Face Llama checkpoint with random weights for start-up timing
(bench/gpu_startup.sh, issue 8): config.json from a given config, the Llama tensor names and shapes
(model.embed_tokens, model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
input_layernorm, post_attention_layernorm}, model.norm, lm_head), random values (normal, std 0.02;
norms 1) made on the GPU with torch, saved with safetensors in shards of about --shard-gb GB with
model.safetensors.index.json, as Hugging Face shards them. With --tokenizer synthetic it also writes a
byte-level BPE tokenizer.json of the config's vocabulary size (128,256 entries for Llama 3: 256 byte
tokens, merges up to vocab - 256, then 256 special tokens named like Llama 3's) and a
tokenizer_config.json, so the server loads a tokenizer of the real size; random text, not Llama 3's merges.

usage: python3 bench/make_dummy_checkpoint.py --config bench/configs/llama-3.1-8b --out /tmp/l8 \
           [--device cuda] [--dtype bfloat16] [--shard-gb 5] [--tokenizer synthetic|none|DIR]
Prints one JSON line: bytes written, shards, seconds.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time

import torch
from safetensors.torch import save_file


def llama_tensors(cfg):
    """(name, shape, kind) in Hugging Face order; kind is 'w' (random matrix) or 'norm' (ones) or 'bias'."""
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or h // nh
    v = cfg["vocab_size"]
    attn_bias = cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    out = [("model.embed_tokens.weight", (v, h), "w")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), "norm"))
        for name, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            out.append((p + f"self_attn.{name}.weight", (rows, h), "w"))
            if attn_bias:
                out.append((p + f"self_attn.{name}.bias", (rows,), "bias"))
        out.append((p + "self_attn.o_proj.weight", (h, nh * hd), "w"))
        if attn_bias:
            out.append((p + "self_attn.o_proj.bias", (h,), "bias"))
        out.append((p + "post_attention_layernorm.weight", (h,), "norm"))
        out.append((p + "mlp.gate_proj.weight", (inter, h), "w"))
        out.append((p + "mlp.up_proj.weight", (inter, h), "w"))
        out.append((p + "mlp.down_proj.weight", (h, inter), "w"))
        if mlp_bias:
            out.append((p + "mlp.gate_proj.bias", (inter,), "bias"))
            out.append((p + "mlp.up_proj.bias", (inter,), "bias"))
            out.append((p + "mlp.down_proj.bias", (h,), "bias"))
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h), "w"))
    return out


def bytes_to_unicode():
    """GPT-2's byte-to-printable-character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def synthetic_tokenizer(vocab_size, n_special=256, seed=0):
    """A valid byte-level BPE tokenizer.json with vocab_size entries: 256 byte tokens, merges of two
    existing tokens (biased toward short ones, so tokens look like words' pieces) up to
    vocab_size - n_special, then n_special added special tokens named like Llama 3's."""
    rng = random.Random(seed)
    base = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(base)}
    tokens = list(base)
    merges = []
    n_regular = vocab_size - n_special
    letters = [bytes_to_unicode()[b] for b in range(ord("a"), ord("z") + 1)]
    pieces = list(letters)
    while len(tokens) < n_regular:
        a = rng.choice(pieces) if rng.random() < 0.7 else rng.choice(tokens[:256])
        b = rng.choice(letters) if rng.random() < 0.8 else rng.choice(pieces)
        t = a + b
        if t in vocab or len(t) > 16:
            continue
        vocab[t] = len(tokens)
        tokens.append(t)
        merges.append([a, b])
        pieces.append(t)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    k = 3
    while len(names) < n_special:
        names.append(f"<|reserved_special_token_{k}|>")
        k += 1
    added = [{"id": n_regular + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(names[:n_special])]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [n_regular], "tokens": ["<|begin_of_text|>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    tok_cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 131072,
               "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
    return tok, tok_cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json or its directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--tokenizer", default="synthetic", help="synthetic, none, or a directory to copy tokenizer files from")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    cfg_path = a.config if a.config.endswith(".json") else os.path.join(a.config, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    os.makedirs(a.out, exist_ok=True)
    cfg_out = dict(cfg)
    cfg_out["torch_dtype"] = a.dtype
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg_out, f, indent=2)
    dtype = getattr(torch, a.dtype)
    device = torch.device(a.device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    specs = llama_tensors(cfg)
    limit = int(a.shard_gb * 1e9)
    # Group tensors into shards of at most `limit` bytes, in order (a single larger tensor gets its own).
    groups, cur, cur_bytes = [], [], 0
    for name, shape, kind in specs:
        n = elem
        for d in shape:
            n *= d
        if cur and cur_bytes + n > limit:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, kind))
        cur_bytes += n
    if cur:
        groups.append(cur)
    weight_map, total = {}, 0
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, kind in group:
            if kind == "norm":
                t = torch.ones(shape, dtype=dtype, device=device)
            elif kind == "bias":
                t = torch.zeros(shape, dtype=dtype, device=device)
            else:
                t = torch.randn(shape, dtype=torch.float32 if device.type == "cpu" else dtype, device=device,
                                generator=gen).mul_(0.02).to(dtype)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * elem
        save_file(tensors, os.path.join(a.out, fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname} ({len(group)} tensors)", file=sys.stderr, flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    gen_cfg = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"), "do_sample": False}
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump(gen_cfg, f, indent=2)
    if a.tokenizer == "synthetic":
        tok, tok_cfg = synthetic_tokenizer(cfg["vocab_size"], n_special=min(256, cfg["vocab_size"] // 4), seed=a.seed)
        with open(os.path.join(a.out, "tokenizer.json"), "w") as f:
            json.dump(tok, f, ensure_ascii=False)
        with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
    elif a.tokenizer != "none":
        for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            src = os.path.join(a.tokenizer, fn)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(a.out, fn))
    print(json.dumps({"out": a.out, "bytes": total, "shards": len(groups), "tensors": len(specs),
                      "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
