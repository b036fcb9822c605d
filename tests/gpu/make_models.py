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

Weights (see init_weights): embeddings and LM head ~ N(0, (1.2 / sqrt(hidden))^2), so the logits have a
standard deviation of about 1.2 (a spread next-token distribution: entropy near the maximum, greedy
text is not one token repeated, top-2 gaps O(0.1), far above float32 noise); every other matrix
~ N(0, 1 / fan_in), which keeps bfloat16 rounding noise from being amplified through the layers; norm
weights ~ 1 + N(0, 0.1^2) and biases ~ N(0, 0.3^2), so that a kernel ignoring a norm weight or a bias
shows up (transformers' own init leaves them at exactly 1 and 0).

Every saved model is loaded back with from_pretrained and probed on a 512-token sample: entropy of the
next-token distribution, share of positions whose top-2 logit gap is below 1e-3 / 0.05, distinct tokens
among 64 greedy tokens; for bf16 also the noise floor, transformers bf16 (sdpa) against transformers
float32 on the same bf16 weights: top-1 agreement, near-tie adjusted (gap < 0.05) and the count of
"hard" disagreements, which is what compare_transformers.py's 99% target has to clear. Prints one
summary line per model (again all together at the end) and writes OUT_DIR/models.json:
[{name, base, path (absolute), dtype, arch, architecture, head_dim, ...}]. About 2.3 GB on disk in all.
Exit status 1 if a model could not be built, saved or loaded back, or its greedy text is degenerate.
"""
import argparse
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

# name, architecture, config fields (vocab, max positions and special ids are common), rope.
SPECS = [
    dict(
        name="llama-hd32",
        arch="llama",
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
    ),
    dict(
        name="llama-hd64",
        arch="llama",
        cfg=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
    ),
    dict(
        name="llama-hd128",
        arch="llama",
        cfg=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope=LLAMA3_ROPE,
    ),
    dict(
        name="qwen2-hd64",
        arch="qwen2",
        # Qwen2 has no head_dim field: hidden / heads = 64.
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False),
        rope={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    dict(
        name="qwen3-hd128",
        arch="qwen3",
        cfg=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 attention_bias=False, use_sliding_window=False),
        rope={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    dict(name="smollm2-135m", arch="smollm2", cfg=None, rope=None),
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


def make_config(spec, transformers, logit_std):
    """Builds the transformers config of a spec. Returns (config, path taken)."""
    hidden = spec["cfg"]["hidden_size"] if spec["cfg"] else None
    init = round(logit_std / math.sqrt(hidden), 4) if hidden else None
    common = dict(vocab_size=VOCAB, max_position_embeddings=4096, initializer_range=init,
                  hidden_act="silu", attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  use_cache=True)
    if spec["arch"] == "smollm2":
        with open(os.path.join(FIXTURE, "config.json")) as f:
            d = json.load(f)
        d.pop("_model_name_or_path", None)
        d["initializer_range"] = round(logit_std / math.sqrt(d["hidden_size"]), 4)
        d["dtype"] = "float32"
        d.pop("torch_dtype", None)
        cls = getattr(transformers, "LlamaConfig")
        try:
            return cls.from_dict(d), "LlamaConfig.from_dict(fixture config.json)"
        except Exception as e:  # noqa: BLE001
            log(f"  LlamaConfig.from_dict failed ({e!r}); trying AutoConfig.from_pretrained(fixture)")
            c = transformers.AutoConfig.from_pretrained(FIXTURE)
            c.initializer_range = round(logit_std / math.sqrt(c.hidden_size), 4)
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


def init_weights(model, logit_std, seed):
    """Deterministic random weights, independent of transformers' init scheme.

    Embeddings and the LM head ~ N(0, (logit_std / sqrt(hidden))^2): the final norm's output has unit
    RMS, so the logits have a standard deviation of about logit_std. Every other matrix ~ N(0, 1 / fan_in)
    (gain 1): the network stays out of the chaotic regime, so bfloat16 rounding noise is not amplified
    layer after layer (with a uniform N(0, 0.07^2) init, the 30-layer SmolLM2 shape amplifies it until
    bf16 and fp32 transformers disagree on 25% of the top-1 tokens). Norm weights ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.3^2), so a kernel that drops a norm weight or a bias shows up.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    lm_std = logit_std / math.sqrt(hidden)
    names = []
    with torch.no_grad():
        # named_parameters() yields a tied weight once.
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32)
            elif name.endswith(".bias"):
                v = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32)
            elif "embed_tokens" in name or "lm_head" in name:
                v = lm_std * torch.randn(p.shape, generator=g, dtype=torch.float32)
            elif p.dim() == 2:
                v = torch.randn(p.shape, generator=g, dtype=torch.float32) / math.sqrt(p.shape[1])
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
            names.append(name)
    return names


def load(path, tdtype, attn, device):
    """from_pretrained with transformers 5's `dtype=` (4.x's `torch_dtype=` as the fallback)."""
    import transformers

    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype, attn_implementation=attn)
    except TypeError:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=tdtype, attn_implementation=attn)
    m = m.to(device).eval()
    got = {p.dtype for p in m.parameters()}
    if got != {tdtype}:
        raise RuntimeError(f"{path}: loaded parameters are {got}, wanted {tdtype}")
    return m


def logits_fp32_head(model, x):
    """[T, vocab] float32 logits: the decoder's final (normed) hidden states times the LM head in fp32."""
    h = model.get_decoder()(input_ids=x).last_hidden_state[0]
    return h.float() @ model.get_output_embeddings().weight.float().T


def probe(model, ids, device):
    """Next-token statistics on the sample, and 64 greedy tokens (KV cache) from its first 24 tokens."""
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        logits = logits_fp32_head(model, x)
        lsm = torch.log_softmax(logits, dim=-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        top2 = logits.topk(2, dim=-1).values
        gaps = top2[:, 0] - top2[:, 1]
        out = model(input_ids=x[:, :24], use_cache=True)
        greedy = []
        for _ in range(64):
            nxt = int(out.logits[0, -1].float().argmax())
            greedy.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
    return {
        "positions": len(ids),
        "entropy_last": float(ent[-1]),
        "entropy_mean": float(ent.mean()),
        "max_entropy": math.log(logits.shape[-1]),
        "top1_prob_max": float(lsm.max(-1).values.exp().max()),
        "logit_std": float(logits.std(-1).mean()),
        "median_top2_gap": float(gaps.median()),
        "frac_gap_lt_1e-3": float((gaps < 1e-3).float().mean()),
        "frac_gap_lt_0.05": float((gaps < 0.05).float().mean()),
        "greedy_distinct_of_64": len(set(greedy)),
    }, logits


def noise_floor(bf16_logits, fp32_logits):
    """transformers bf16 against transformers fp32 on the same weights, per position."""
    top2 = fp32_logits.topk(2, dim=-1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    agree = bf16_logits.argmax(-1) == top2.indices[:, 0]
    hard = (~agree) & (gap >= 0.05)
    return {
        "top1_agree": float(agree.float().mean()),
        "top1_agree_neartie_adjusted": float((~hard).float().mean()),
        "hard_disagreements": int(hard.sum()),
        "max_abs_dlogit": float((bf16_logits - fp32_logits).abs().max()),
        "std_dlogit": float((bf16_logits - fp32_logits).std()),
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


def sample_ids(n=512):
    """n token ids of SAMPLE_TEXT repeated, through the SmolLM2 tokenizer."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json"))
        base = tok.encode(SAMPLE_TEXT + " ", add_special_tokens=False).ids
    except Exception as e:  # noqa: BLE001
        log(f"tokenizers failed ({e!r}); using fixed ids for the probe")
        base = [(i * 7919) % VOCAB for i in range(97)]
    return [base[i % len(base)] for i in range(n)]


def build_one(spec, si, args, transformers, out_root, device, ids):
    """Builds, saves and probes both dtypes of one spec; returns (entries, summary lines, failures)."""
    cfg, cfg_path = make_config(spec, transformers, args.logit_std)
    cls = getattr(transformers, ARCH_CLASSES[spec["arch"]])
    torch.manual_seed(args.seed + si)
    try:
        model = cls(cfg)
        how_built = f"{cls.__name__}(config)"
    except Exception as e:  # noqa: BLE001
        log(f"  {cls.__name__}(config) failed ({e!r}); using AutoModelForCausalLM.from_config")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        how_built = "AutoModelForCausalLM.from_config"
    model = model.to(torch.float32)
    init_weights(model, args.logit_std, args.seed + 1000 * si)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    dirs = {}
    for dtype_name, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if tdtype != torch.float32:
            model = model.to(tdtype)  # the same weights, rounded
        for attr in ("dtype", "torch_dtype"):
            try:
                setattr(model.config, attr, tdtype)
            except Exception:  # noqa: BLE001
                pass
        out_dir = os.path.join(out_root, f"{spec['name']}-{dtype_name}")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        dirs[dtype_name] = (out_dir,) + save(model, out_dir, dtype_name)
    del model

    entries, lines, failures = [], [], []
    for dtype_name, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out_dir, how_saved, copied, d = dirs[dtype_name]
        name = f"{spec['name']}-{dtype_name}"
        attn = "eager" if tdtype == torch.float32 else "sdpa"
        m = load(out_dir, tdtype, attn, device)
        stats, logits = probe(m, ids, device)
        del m
        extra = ""
        if tdtype == torch.bfloat16:
            # The noise floor: the bf16 weights computed in fp32 against the same weights in bf16.
            mx = load(out_dir, torch.float32, "eager", device)
            with torch.inference_mode():
                exact = logits_fp32_head(mx, torch.tensor([ids], device=device))
            del mx
            stats["noise_floor"] = nf = noise_floor(logits, exact)
            extra = (f" | bf16 noise floor: top1 {nf['top1_agree']:.3f}, near-tie adj "
                     f"{nf['top1_agree_neartie_adjusted']:.4f} ({nf['hard_disagreements']} hard of {len(ids)}), "
                     f"dlogit std {nf['std_dlogit']:.4f}")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        rope_kind, rope_theta = rope_of(d)
        if spec["arch"] == "llama" and rope_kind != "llama3":
            raise RuntimeError(f"{name}: config.json lost the llama3 rope scaling: {rope_kind}")
        if "rope_scaling" in d and d["rope_scaling"] is None and rope_kind != "default":
            log(f"  WARNING {name}: config.json has rope_scaling: null next to rope_parameters "
                f"{d.get('rope_parameters')} (a reader that prefers rope_scaling sees no scaling)")
        entry = {
            "name": name,
            "base": spec["name"],
            "path": out_dir,
            "dtype": dtype_name,
            "arch": spec["arch"],
            "architecture": (d.get("architectures") or [cls.__name__])[0],
            "head_dim": head_dim,
            "hidden_size": d["hidden_size"],
            "intermediate_size": d["intermediate_size"],
            "num_hidden_layers": d["num_hidden_layers"],
            "num_attention_heads": d["num_attention_heads"],
            "num_key_value_heads": d["num_key_value_heads"],
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
            "rope": rope_kind,
            "rope_theta": rope_theta,
            "max_position_embeddings": d.get("max_position_embeddings"),
            "vocab_size": d["vocab_size"],
            "logit_std_target": args.logit_std,
            "num_parameters": n_params,
            "seed": args.seed,
            "probe": stats,
        }
        entries.append(entry)
        degenerate = stats["greedy_distinct_of_64"] < 4
        lines.append(
            f"{name:<22} {entry['architecture']:<17} hd {head_dim:<3} L {entry['num_hidden_layers']:<2} "
            f"H {entry['num_attention_heads']}/{entry['num_key_value_heads']} hidden {entry['hidden_size']:<3} "
            f"tied {int(entry['tie_word_embeddings'])} rope {rope_kind:<7} {n_params / 1e6:5.1f}M | entropy "
            f"{stats['entropy_mean']:.2f}/{stats['max_entropy']:.2f}, logit std {stats['logit_std']:.2f}, median gap "
            f"{stats['median_top2_gap']:.3f}, gap<1e-3 {stats['frac_gap_lt_1e-3']:.3f}, gap<0.05 "
            f"{stats['frac_gap_lt_0.05']:.3f}, greedy distinct {stats['greedy_distinct_of_64']}/64"
            f"{extra}{'  DEGENERATE' if degenerate else ''}")
        log(lines[-1])
        log(f"  built with {how_built}, config via {cfg_path}; {how_saved}; copied {copied}; "
            f"files {sorted(os.listdir(out_dir))}")
        if degenerate:
            failures.append(f"{name}: greedy text is degenerate ({stats['greedy_distinct_of_64']} distinct of 64)")
    return entries, lines, failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--only", default=None, help="regex on model base names (default: all)")
    ap.add_argument("--device", default=None, help="device for the probes (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--logit-std", type=float, default=1.2, help="target standard deviation of the logits")
    args = ap.parse_args()

    import transformers

    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        for setter in (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False),
                       lambda: setattr(torch.backends.cudnn, "allow_tf32", False)):
            try:
                setter()
            except Exception:  # noqa: BLE001
                pass
    log(f"make_models: torch {torch.__version__}, transformers {transformers.__version__}, probe device {device}, "
        f"seed {args.seed}, logit std {args.logit_std}")
    out_root = os.path.abspath(args.out_dir)
    os.makedirs(out_root, exist_ok=True)
    ids = sample_ids()
    entries, summaries, failures = [], [], []
    started = time.time()
    for si, spec in enumerate(SPECS):
        if args.only and not re.search(args.only, spec["name"]):
            continue
        t0 = time.time()
        try:
            e, lines, f = build_one(spec, si, args, transformers, out_root, device, ids)
            entries += e
            summaries += lines
            failures += f
            log(f"  {spec['name']}: {time.time() - t0:.1f}s")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            failures.append(f"{spec['name']}: {e!r}")
    with open(os.path.join(out_root, "models.json"), "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    log(f"wrote {os.path.join(out_root, 'models.json')}: {len(entries)} models in {time.time() - started:.1f}s")
    for line in summaries:
        log(line)
    for msg in failures:
        log(f"FAIL {msg}")
    sys.exit(1 if failures or not entries else 0)


if __name__ == "__main__":
    main()
