#!/usr/bin/env python3
"""Makes the random-weight Hugging Face models that tests/gpu/compare_transformers.py checks ironllm against.

    python3 tests/gpu/make_models.py OUT_DIR [--only REGEX] [--device cuda|cpu] [--seed N]

Every model is built with transformers from a config written here, given deterministic random weights
(one torch.Generator seeded with --seed; the weights do not depend on transformers' own init scheme),
and saved with save_pretrained (safetensors) twice: float32 and bfloat16 (the same weights cast), each
with the SmolLM2 tokenizer files copied from tests/fixtures/reference/smollm2_hf (vocab 49152).

    llama-hd32   LlamaForCausalLM  hidden 256, 4 layers, 8 heads / 2 kv (GQA 4:1), head_dim 32, llama3 rope
    llama-hd64   LlamaForCausalLM  hidden 512, 4 layers, 8 heads / 2 kv (GQA 4:1), head_dim 64, llama3 rope
    llama-hd128  LlamaForCausalLM  hidden 512, 4 layers, 8 heads / 2 kv (GQA 4:1), head_dim 128 (q width
                                   1024 != hidden), llama3 rope
    qwen2-hd64   Qwen2ForCausalLM  hidden 256, 4 layers, 4 heads / 2 kv (GQA 2:1), head_dim 64, qkv bias
    qwen3-hd128  Qwen3ForCausalLM  hidden 256, 4 layers, 8 heads / 2 kv (GQA 4:1), head_dim 128, q/k norm,
                                   tied embeddings
    smollm2-135m LlamaForCausalLM  the real SmolLM2-135M-Instruct config (hidden 576, 30 layers, 9 heads /
                                   3 kv, head_dim 64, tied embeddings) with random weights

Weights: matrices ~ N(0, init^2) with init chosen per model so that the final logits have a standard
deviation of about 1.5-2 (sqrt(hidden) * init): the next-token distribution is spread (high entropy, the
greedy text is not one token repeated) and the logit gaps are O(0.1-1), far above float32 noise. Norm
weights ~ 1 + N(0, 0.1^2) and biases ~ N(0, 0.3^2), so that a kernel ignoring a norm weight or a bias
shows up (transformers' own init leaves them at exactly 1 and 0).

Prints one summary line per model (entropy of the next-token distribution on a sample prompt, distinct
tokens in 32 greedy tokens, share of positions whose top-2 logit gap is a near-tie; for bf16 also the
top-1 agreement of bf16 with float32 transformers, a rough floor for what compare_transformers.py can
expect) and writes OUT_DIR/models.json: [{name, base, path, dtype, arch, architecture, head_dim, ...}].
"""
import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "reference", "smollm2_hf")
# Tokenizer-side files copied next to the weights when the fixture has them (never model.safetensors).
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
VOCAB = 49152
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Wavelengths below 256 stay, above 1024 are divided by 8, in between are smoothed: all three
    # branches of the llama3 formula are used for every head_dim here.
    "original_max_position_embeddings": 1024,
}

# name, architecture, config fields, init std.
SPECS = [
    dict(
        name="llama-hd32",
        arch="llama",
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
        init=0.1,
    ),
    dict(
        name="llama-hd64",
        arch="llama",
        cfg=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
        init=0.07,
    ),
    dict(
        name="llama-hd128",
        arch="llama",
        cfg=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
        init=0.07,
    ),
    dict(
        name="qwen2-hd64",
        arch="qwen2",
        # Qwen2 has no head_dim field: hidden / heads = 64.
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False),
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        init=0.1,
    ),
    dict(
        name="qwen3-hd128",
        arch="qwen3",
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 attention_bias=False, use_sliding_window=False),
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        init=0.1,
    ),
    dict(name="smollm2-135m", arch="smollm2", cfg=None, rope=None, init=0.07),
]

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "smollm2": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}

SAMPLE_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps out of habit. "
    "From the top he could see the harbour, the fishing boats returning with the tide, and the long grey "
    "line of the breakwater. He wrote the weather in a notebook: wind from the west, light rain, visibility"
)


def log(msg):
    print(msg, flush=True)


def make_config(spec, transformers):
    """Builds the transformers config of a spec. Returns (config, path taken)."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=4096, initializer_range=spec["init"],
                  hidden_act="silu", attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  use_cache=True)
    if spec["arch"] == "smollm2":
        with open(os.path.join(FIXTURE, "config.json")) as f:
            d = json.load(f)
        d.pop("_model_name_or_path", None)
        d["initializer_range"] = spec["init"]
        d["dtype"] = "float32"
        d.pop("torch_dtype", None)
        cls = getattr(transformers, "LlamaConfig")
        try:
            return cls.from_dict(d), "LlamaConfig.from_dict(fixture config.json)"
        except Exception as e:  # noqa: BLE001
            log(f"  LlamaConfig.from_dict failed ({e!r}); trying AutoConfig.from_pretrained(fixture)")
            c = transformers.AutoConfig.from_pretrained(FIXTURE)
            c.initializer_range = spec["init"]
            return c, "AutoConfig.from_pretrained(fixture)"
    cls = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[spec["arch"]])
    kwargs = dict(common, **spec["cfg"])
    rope = dict(spec["rope"])
    try:
        cfg = cls(**kwargs, rope_parameters=rope)
        path = "rope_parameters"
    except TypeError:
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg = cls(**kwargs, rope_theta=rope["rope_theta"],
                  rope_scaling=None if rope["rope_type"] == "default" else legacy)
        path = "rope_theta + rope_scaling (legacy)"
    return cfg, path


def rope_of(d):
    """The rope type and theta a config dict describes, reading both the v5 and the legacy fields."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type") or rp.get("rope_type") or "default"
    theta = d.get("rope_theta") or rp.get("rope_theta")
    return kind, theta


def init_weights(model, init, seed):
    """Deterministic random weights, independent of transformers' init scheme."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        # named_parameters() yields a tied weight once.
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32)
            elif name.endswith(".bias"):
                v = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32)
            else:
                v = init * torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(v.to(p.dtype))
            names.append(name)
    return names


def entropy_probe(model, ids, device):
    """Next-token statistics on one sample prompt, and 32 greedy tokens (full forwards, no cache)."""
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0].float()
        lsm = torch.log_softmax(logits, dim=-1)
        last = lsm[-1]
        ent = float(-(last.exp() * last).sum())
        top2 = logits.topk(2, dim=-1).values
        gaps = (top2[:, 0] - top2[:, 1])
        seq = list(ids)
        greedy = []
        for _ in range(32):
            nxt = int(model(input_ids=torch.tensor([seq], device=device)).logits[0, -1].float().argmax())
            greedy.append(nxt)
            seq.append(nxt)
    return {
        "entropy_last": ent,
        "max_entropy": math.log(logits.shape[-1]),
        "top1_prob_last": float(last.max().exp()),
        "logit_std_last": float(logits[-1].std()),
        "median_top2_gap": float(gaps.median()),
        "frac_gap_lt_1e-3": float((gaps < 1e-3).float().mean()),
        "frac_gap_lt_0.05": float((gaps < 0.05).float().mean()),
        "greedy_distinct_of_32": len(set(greedy)),
        "greedy": greedy,
        "logits": logits,  # dropped before JSON
    }


def save(model, out_dir, dtype_name):
    os.makedirs(out_dir, exist_ok=True)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        how = "save_pretrained(safe_serialization=True)"
    except TypeError:
        model.save_pretrained(out_dir)
        how = "save_pretrained()"
    # Make the dtype field explicit whatever transformers wrote.
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    d["dtype"] = dtype_name
    if "torch_dtype" in d:
        d["torch_dtype"] = dtype_name
    with open(cfg_path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    copied = []
    for fn in TOKENIZER_FILES:
        src = os.path.join(FIXTURE, fn)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, fn))
            copied.append(fn)
    files = sorted(os.listdir(out_dir))
    if not any(f.endswith(".safetensors") for f in files):
        raise RuntimeError(f"{out_dir}: no .safetensors written (files: {files})")
    return how, copied, d


def sample_ids():
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json"))
        return tok.encode(SAMPLE_TEXT, add_special_tokens=False).ids
    except Exception as e:  # noqa: BLE001
        log(f"tokenizers failed ({e!r}); using fixed ids for the probe")
        return [(i * 7919) % VOCAB for i in range(48)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--only", default=None, help="regex on model base names (default: all)")
    ap.add_argument("--device", default=None, help="device for the probes (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        for setter in (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False),
                       lambda: setattr(torch.backends.cudnn, "allow_tf32", False)):
            try:
                setter()
            except Exception:  # noqa: BLE001
                pass
    log(f"make_models: torch {torch.__version__}, transformers {transformers.__version__}, probe device {device}, "
        f"seed {args.seed}")
    out_root = os.path.abspath(args.out_dir)
    os.makedirs(out_root, exist_ok=True)
    ids = sample_ids()
    entries, summaries, failures = [], [], []
    for si, spec in enumerate(SPECS):
        if args.only and not re.search(args.only, spec["name"]):
            continue
        t0 = time.time()
        try:
            cfg, cfg_path = make_config(spec, transformers)
            cls = getattr(transformers, ARCH_CLASSES[spec["arch"]])
            torch.manual_seed(args.seed + si)
            try:
                model = cls(cfg)
            except Exception as e:  # noqa: BLE001
                log(f"  {cls.__name__}(config) failed ({e!r}); trying AutoModelForCausalLM.from_config")
                model = transformers.AutoModelForCausalLM.from_config(cfg)
            model = model.to(torch.float32)
            init_weights(model, spec["init"], args.seed + 1000 * si)
            model.eval()
            n_params = sum(p.numel() for p in model.parameters())
            model.to(device)
            fp32_probe = None
            for dtype_name, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                if tdtype != torch.float32:
                    model.to(tdtype)
                for attr in ("dtype", "torch_dtype"):
                    try:
                        setattr(model.config, attr, tdtype)
                    except Exception:  # noqa: BLE001
                        pass
                name = f"{spec['name']}-{dtype_name}"
                out_dir = os.path.join(out_root, name)
                if os.path.isdir(out_dir):
                    shutil.rmtree(out_dir)
                how, copied, d = save(model, out_dir, dtype_name)
                probe = entropy_probe(model, ids, device)
                extra = ""
                if fp32_probe is None:
                    fp32_probe = probe
                else:
                    ref = fp32_probe["logits"]
                    top2 = ref.topk(2, dim=-1)
                    gap = top2.values[:, 0] - top2.values[:, 1]
                    agree = probe["logits"].argmax(-1) == top2.indices[:, 0]
                    adj = agree | (gap < 0.05)
                    probe["bf16_vs_fp32_top1"] = float(agree.float().mean())
                    probe["bf16_vs_fp32_top1_neartie_adjusted"] = float(adj.float().mean())
                    extra = (f" bf16-vs-fp32 top1 {probe['bf16_vs_fp32_top1']:.3f} "
                             f"(near-tie adj {probe['bf16_vs_fp32_top1_neartie_adjusted']:.3f})")
                probe.pop("logits")
                head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
                rope_kind, rope_theta = rope_of(d)
                if spec["arch"] in ("llama",) and rope_kind != "llama3":
                    raise RuntimeError(f"{name}: config.json lost the llama3 rope scaling: {rope_kind}")
                if d.get("rope_scaling", "absent") is None and (d.get("rope_parameters") or {}).get("rope_type") not in (None, "default"):
                    log(f"  WARNING {name}: config.json has rope_scaling: null next to rope_parameters "
                        f"{d.get('rope_parameters')} (a reader preferring rope_scaling sees no scaling)")
                entry = {
                    "name": name,
                    "base": spec["name"],
                    "path": out_dir,
                    "dtype": dtype_name,
                    "arch": spec["arch"],
                    "architecture": (d.get("architectures") or [cls.__name__])[0],
                    "head_dim": head_dim,
                    "hidden_size": d["hidden_size"],
                    "num_hidden_layers": d["num_hidden_layers"],
                    "num_attention_heads": d["num_attention_heads"],
                    "num_key_value_heads": d["num_key_value_heads"],
                    "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
                    "rope": rope_kind,
                    "rope_theta": rope_theta,
                    "max_position_embeddings": d.get("max_position_embeddings"),
                    "vocab_size": d["vocab_size"],
                    "init": spec["init"],
                    "num_parameters": n_params,
                    "seed": args.seed,
                    "probe": {k: v for k, v in probe.items() if k != "greedy"},
                }
                entries.append(entry)
                degenerate = probe["greedy_distinct_of_32"] < 4
                line = (f"{name:<24} {entry['architecture']:<18} hd {head_dim:<3} L {entry['num_hidden_layers']:<2} "
                        f"H {entry['num_attention_heads']}/{entry['num_key_value_heads']} hidden {entry['hidden_size']:<4} "
                        f"tied {int(entry['tie_word_embeddings'])} rope {rope_kind} params {n_params/1e6:.1f}M | "
                        f"entropy {probe['entropy_last']:.2f}/{probe['max_entropy']:.2f} nats, top1 p "
                        f"{probe['top1_prob_last']:.3f}, logit std {probe['logit_std_last']:.2f}, median gap "
                        f"{probe['median_top2_gap']:.3f}, gap<1e-3 {probe['frac_gap_lt_1e-3']:.3f}, gap<0.05 "
                        f"{probe['frac_gap_lt_0.05']:.3f}, greedy distinct {probe['greedy_distinct_of_32']}/32"
                        f"{extra}{'  DEGENERATE' if degenerate else ''}")
                summaries.append(line)
                log(line)
                log(f"  {how}; config via {cfg_path}; copied {copied}; files {sorted(os.listdir(out_dir))}")
                if degenerate:
                    failures.append(f"{name}: greedy text is degenerate ({probe['greedy_distinct_of_32']} distinct of 32)")
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            log(f"  {spec['name']} done in {time.time() - t0:.1f}s")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            failures.append(f"{spec['name']}: {e!r}")
    with open(os.path.join(out_root, "models.json"), "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    log(f"wrote {os.path.join(out_root, 'models.json')} ({len(entries)} models)")
    for line in summaries:
        log(line)
    if failures:
        for msg in failures:
            log(f"FAIL {msg}")
        sys.exit(1)


if __name__ == "__main__":
    main()
