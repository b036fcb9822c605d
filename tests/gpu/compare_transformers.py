#!/usr/bin/env python3
"""End-to-end check of ironllm against Hugging Face transformers on the models of make_models.py.

    python3 tests/gpu/compare_transformers.py --models OUT_DIR/models.json --ironllm .gpu/ironllm \\
        --out RESULTS.json [--only REGEX] [--device cuda] [--no-serve] [--ironllm-args "..."]

Prompts: 20 token-id prompts cut from an English text with the SmolLM2 tokenizer (lengths 5..300, plus
1000, 1100 and 1500 built by repeating the text), fed as token ids to both sides (no template, no BOS).

float32 models, greedy (gate: no prompt fails):
  ours: one `ironllm generate MODEL --device cuda --dtype float32 --input prompts.jsonl --output out.jsonl
        --max-tokens 64 --ignore-eos --logprobs 5 --seed 0 --temperature 0` (each JSONL line:
        prompt_token_ids, temperature 0, max_tokens, ignore_eos, logprobs).
  reference: transformers float32, attn_implementation="eager", TF32 off. Per prompt one forward over
        prompt + our 64 tokens gives the reference's next-token logits for every position; up to our first
        differing token our tokens are the reference's own greedy continuation (same prefix), so this is
        the reference's greedy decode with EOS ignored, without a KV cache. At the first position where
        our token differs from the reference argmax the divergence is allowed (near-tie) only if the
        reference's top-2 logit gap there is < 1e-3; the prompt is not compared past it.
  reported: prompts identical / diverging after a near-tie / failing; max and mean |d logprob| of the
        chosen tokens over the compared prefix (ours from --logprobs against log_softmax of the reference
        logits); also, informational, the top-1 agreement over all 64 positions given our prefix.

bfloat16 models (gate: top-1 agreement >= 99% in both parts, a disagreement where the reference's top-2
gap is < 0.05 counting as a near-tie, not as a disagreement; the raw rate is reported too):
  reference: transformers bf16 (sdpa, eager as the fallback); logits are the bf16 model's final hidden
        states times the LM head in float32 (ironllm's logits are float32 from the LM-head GEMM); the
        script checks once per model that this matches model(...).logits and otherwise uses those.
  A. teacher-forced through ironllm's prefill (`ironllm serve` + /v1/completions with `prompt_logprobs`,
     because `ironllm generate` accepts a per-line `prompt_logprobs` field but does not write prompt
     logprobs to its output): the reference's own greedy continuation (64 tokens, KV cache) is appended to
     each prompt, both sides score prompt + continuation, and at the 64 continuation positions our top-1
     (rank 1 of prompt_logprobs=5) is compared with the reference argmax, and our logprob of the actual
     next token with the reference's (mean / max |d|). One request at a time (--serve-concurrency): with
     concurrent requests a prompt's prefill is split into chunks, and ironllm then returns only the first
     chunk's prompt_logprobs (seen on the CPU build: a 2100-token prompt alone gets 2049 entries).
  B. ironllm's decode: `ironllm generate --dtype bfloat16 --logprobs 5` greedy, 64 tokens; the reference
     scores prompt + our tokens in one forward; at every position our token (our top-1) is compared with
     the reference argmax given the same prefix, plus |d logprob| of our token. The first position where
     we leave the reference's own greedy continuation is reported (informational).
  --no-serve skips A (then the gate is B alone).
  Informational (--no-exact skips it): both parts are also scored against transformers float32 running
  the same bf16 weights ("exact"), for ours and for transformers bf16 alike: if ours is no farther from
  exact than transformers' own bf16 is, a bf16 shortfall is rounding noise, not a bug. WARN (not FAIL)
  when ours is more than --warn-ratio (2) times farther in mean |d logprob|. Note that bf16 noise
  (|d logit| ~ 0.01-0.02 here) hides small errors that the float32 test sees (a 2% scale error on one
  o_proj fails float32 badly and passes bf16).

Output: RESULTS.json (all numbers, per prompt details; rewritten after every model), and next to it
RESULTS_logs/<model>/ with our binary's command lines, stdout/stderr (generate.*, serve.log), and the
JSONL we fed and got back. A compact table (one line per model x dtype) is printed last; float32 rows
WARN (not FAIL) when max |d logprob| > 1e-3. Exit status 1 if any float32 prompt fails, any bf16
agreement is below 99%, or anything errors (ironllm or the reference); 0 otherwise.
"""
import argparse
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

FP32_TIE = 1e-3
BF16_TIE = 0.05
BF16_TARGET = 0.99
LENGTHS = [5, 8, 13, 16, 17, 31, 33, 48, 63, 64, 65, 100, 127, 128, 129, 200, 300, 1000, 1100, 1500]

CORPUS = """\
The village sat at the bottom of a narrow valley, where the river bent twice before it reached the sea.
In spring the water ran brown and loud with melted snow, and the miller kept his gate half closed so
that the wheel would not spin itself apart. Children were told never to cross the stepping stones after
a storm, and most of them listened, at least until they were old enough to pretend they had not heard.

Every Thursday a cart came down the mountain road carrying salt, lamp oil, needles, letters and news.
The driver, a patient woman named Irena, knew the price of everything and the business of everyone, but
she repeated only what she had seen with her own eyes. People trusted her for that reason. When she
said the pass would close early, the farmers brought their sheep down a week before the first frost.

The school had one room, one stove and thirty-one pupils of every age. The teacher wrote the lesson on
a slate board in the morning and erased it at noon, so anyone who arrived late had to ask a neighbour
what had been said. Arithmetic came first, then reading aloud, then geography from a map so old that
several of its countries no longer existed. Nobody minded; the rivers and mountains were still there.

In the evenings the old men played cards outside the inn and argued about the weather, the harvest and
whether the new bridge upstream would ever be finished. Engineers had come twice with instruments and
drawings, measured the banks, drunk the local wine and left again. The stone pillars they had planted in
the river stood alone in the current, and herons used them as lookouts while they waited for fish.

One winter the snow came so early and so heavily that the cart could not come down at all. For six
weeks the village lived on what it had stored: potatoes, onions, smoked meat, apples wrapped in paper,
and bread baked from flour that grew a little greyer each week. The miller shared his grain, the baker
worked through the night, and the teacher held lessons by candlelight so that the children kept busy.
When the road finally opened, Irena arrived with a cart full of oranges, and nobody ever forgot it.
"""


def log(msg=""):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# Prompts


def load_tokenizer(model_dir):
    """Returns encode(text) -> ids, and a description of the path taken."""
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return (lambda text: tok.encode(text, add_special_tokens=False).ids), f"tokenizers.Tokenizer({path})"
    except Exception as e:  # noqa: BLE001
        log(f"tokenizers.Tokenizer failed ({e!r}); trying transformers.AutoTokenizer")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return (lambda text: tok.encode(text, add_special_tokens=False)), f"AutoTokenizer({model_dir})"


def build_prompts(encode, n):
    ids = encode(CORPUS)
    if len(ids) < 100:
        raise RuntimeError(f"the corpus tokenized to only {len(ids)} tokens")
    if n == len(LENGTHS):
        lengths = list(LENGTHS)
    else:
        lengths = [LENGTHS[round(i * (len(LENGTHS) - 1) / max(1, n - 1))] for i in range(n)]
    prompts = []
    for i, length in enumerate(lengths):
        start = (i * 53) % len(ids)
        prompts.append([ids[(start + j) % len(ids)] for j in range(length)])
    return prompts, len(ids)


# ----------------------------------------------------------------------------------------------------
# Reference (transformers)


def set_precision(device):
    """TF32 off (fp32 matmuls in IEEE fp32), no reduced-precision reductions in bf16 GEMMs."""
    info = {}
    for name, fn in (
        ("cuda.matmul.allow_tf32=False", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False)),
        ("cudnn.allow_tf32=False", lambda: setattr(torch.backends.cudnn, "allow_tf32", False)),
        ("cuda.matmul.allow_bf16_reduced_precision_reduction=False",
         lambda: setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)),
        ("cuda.matmul.allow_fp16_reduced_precision_reduction=False",
         lambda: setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)),
    ):
        try:
            fn()
            info[name] = "set"
        except Exception as e:  # noqa: BLE001
            info[name] = f"failed: {e!r}"
    try:
        info["read_back.cuda.matmul.allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        info["read_back.cudnn.allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    except Exception as e:  # noqa: BLE001
        info["read_back"] = f"failed: {e!r}"
    return info


class Reference:
    """A transformers model with float32 next-token logits for chosen rows and a greedy decoder."""

    def __init__(self, path, tdtype, attn, device):
        import transformers

        self.device = device
        self.notes = []
        self.model = None
        last_err = None
        for attempt in ((attn, "dtype"), (attn, "torch_dtype"), (None, "dtype"), (None, "torch_dtype")):
            impl, dtype_kw = attempt
            kwargs = {dtype_kw: tdtype}
            if impl:
                kwargs["attn_implementation"] = impl
            try:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
                self.notes.append(f"from_pretrained({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
                break
            except Exception as e:  # noqa: BLE001
                last_err = e
                self.notes.append(f"from_pretrained({kwargs}) failed: {e!r}"[:300])
        if self.model is None:
            raise RuntimeError(f"cannot load {path}: {last_err!r}")
        self.model = self.model.to(device).eval()
        dtypes = {p.dtype for p in self.model.parameters()}
        if dtypes != {tdtype}:
            self.notes.append(f"parameters were {dtypes}; cast to {tdtype}")
            self.model = self.model.to(tdtype)
        # Rotary inverse frequencies must stay float32 (a bf16 inv_freq puts angle errors of ~pos * 2^-9
        # radians into transformers' own reference).
        for name, buf in self.model.named_buffers():
            if "inv_freq" in name and buf.dtype != torch.float32:
                self.notes.append(f"WARNING buffer {name} is {buf.dtype}")
        self.attn = getattr(self.model.config, "_attn_implementation", None)
        try:
            self.base = self.model.get_decoder()
        except Exception:  # noqa: BLE001
            self.base = getattr(self.model, "model")
        self.head_w = self.model.get_output_embeddings().weight.detach().float()
        self.mode = "fp32-head"

    def check_head(self, ids):
        """Makes sure last_hidden_state is the normed final hidden state (else falls back to .logits)."""
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            mine = self._hidden(x)[0].float() @ self.head_w.T
            theirs = self.model(input_ids=x).logits[0].float()
        diff = float((mine - theirs).abs().max())
        scale = float(theirs.abs().max())
        tol = 1e-3 * max(1.0, scale) if self.head_w.dtype == torch.float32 and \
            next(self.model.parameters()).dtype == torch.float32 else 0.02 * max(1.0, scale) + 0.05
        if not diff <= tol:
            self.mode = "model-logits"
        self.notes.append(f"head check: max |fp32 head - model logits| = {diff:.3g} (tol {tol:.3g}) -> {self.mode}")
        return diff

    def _hidden(self, x):
        out = self.base(input_ids=x, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def rows(self, seq, start, end):
        """float32 logits [end - start, vocab] at positions start..end-1 of seq (one forward of seq[:end])."""
        x = torch.tensor([seq[:end]], device=self.device)
        with torch.inference_mode():
            if self.mode == "fp32-head":
                h = self._hidden(x)
                return h[0, start:end].float() @ self.head_w.T
            return self.model(input_ids=x).logits[0, start:end].float()

    def greedy(self, prompt, n):
        """n greedy tokens after prompt (KV cache; no EOS handling at all)."""
        x = torch.tensor([prompt], device=self.device)
        toks = []
        with torch.inference_mode():
            if self.mode == "fp32-head":
                out = self.base(input_ids=x, use_cache=True)
                for i in range(n):
                    nxt = (out.last_hidden_state[0, -1].float() @ self.head_w.T).argmax()
                    toks.append(nxt)
                    if i + 1 < n:
                        out = self.base(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            else:
                out = self.model(input_ids=x, use_cache=True)
                for i in range(n):
                    nxt = out.logits[0, -1].float().argmax()
                    toks.append(nxt)
                    if i + 1 < n:
                        out = self.model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        return [int(t) for t in torch.stack(toks).tolist()]

    def close(self):
        del self.model, self.base, self.head_w
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# ironllm


class OursError(RuntimeError):
    pass


def engine_flags(args, dtype):
    flags = ["--device", args.device, "--dtype", dtype, "--seed", "0"]
    if args.kv_cache:
        flags += ["--kv-cache-memory-bytes", args.kv_cache]
    return flags + shlex.split(args.ironllm_args)


def tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def run_generate(args, model_path, dtype, prompts, logprobs, workdir):
    """One `ironllm generate` over all prompts; returns the parsed output lines in input order."""
    os.makedirs(workdir, exist_ok=True)
    inp, outp = os.path.join(workdir, "input.jsonl"), os.path.join(workdir, "output.jsonl")
    with open(inp, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt_token_ids": p, "temperature": 0.0, "max_tokens": args.max_tokens,
                                "ignore_eos": True, "logprobs": logprobs}) + "\n")
    if os.path.exists(outp):
        os.remove(outp)
    cmd = [args.ironllm, "generate", model_path, "--input", inp, "--output", outp, "--max-tokens",
           str(args.max_tokens), "--ignore-eos", "--logprobs", str(logprobs), "--temperature", "0"] + \
        engine_flags(args, dtype)
    so, se = os.path.join(workdir, "generate.stdout"), os.path.join(workdir, "generate.stderr")
    with open(os.path.join(workdir, "generate.cmd"), "w") as f:
        f.write(shlex.join(cmd) + "\n")
    t0 = time.time()
    with open(so, "w") as fo, open(se, "w") as fe:
        try:
            rc = subprocess.run(cmd, stdout=fo, stderr=fe, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            raise OursError(f"ironllm generate timed out after {args.timeout}s; stderr tail:\n{tail(se)}")
    secs = time.time() - t0
    if rc != 0:
        raise OursError(f"ironllm generate exited {rc}; stderr tail:\n{tail(se)}")
    with open(outp) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if len(lines) != len(prompts):
        raise OursError(f"ironllm generate wrote {len(lines)} lines for {len(prompts)} prompts")
    return lines, secs


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw.strip() else None)


def run_serve_prompt_logprobs(args, model_path, dtype, seqs, k, workdir):
    """Starts `ironllm serve`, asks /v1/completions for prompt_logprobs=k of every seq (one request per
    seq, --serve-concurrency at a time), stops the server. Returns per seq the prompt_logprobs list (or an exception), and the seconds."""
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    cmd = [args.ironllm, "serve", model_path, "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats",
           "--disable-uvicorn-access-log"] + engine_flags(args, dtype)
    logp = os.path.join(workdir, "serve.log")
    with open(os.path.join(workdir, "serve.cmd"), "w") as f:
        f.write(shlex.join(cmd) + "\n")
    t0 = time.time()
    logf = open(logp, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + args.server_start_timeout
        while True:
            if proc.poll() is not None:
                raise OursError(f"ironllm serve exited {proc.returncode} before it was healthy; log tail:\n{tail(logp)}")
            try:
                status, _ = http_json(base + "/health", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.time() > deadline:
                raise OursError(f"ironllm serve not healthy after {args.server_start_timeout}s; log tail:\n{tail(logp)}")
            time.sleep(0.5)
        started = time.time() - t0

        def one(seq):
            body = {"prompt": seq, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "ignore_eos": True,
                    "return_token_ids": True}
            try:
                status, resp = http_json(base + "/v1/completions", body, timeout=args.timeout)
            except urllib.error.HTTPError as e:
                return OursError(f"HTTP {e.code}: {e.read()[:500]!r}")
            except Exception as e:  # noqa: BLE001
                return OursError(f"request failed: {e!r}")
            try:
                choice = resp["choices"][0]
                plp = choice["prompt_logprobs"]
                if plp is None or len(plp) != len(seq):
                    return OursError(f"prompt_logprobs has {None if plp is None else len(plp)} entries for "
                                     f"{len(seq)} prompt tokens")
                echoed = choice.get("prompt_token_ids")
                if echoed is not None and list(echoed) != list(seq):
                    return OursError("the server's prompt_token_ids differ from the ids sent")
                return plp
            except Exception as e:  # noqa: BLE001
                return OursError(f"unexpected response shape: {e!r}: {json.dumps(resp)[:300]}")

        with ThreadPoolExecutor(max_workers=max(1, args.serve_concurrency)) as pool:
            results = list(pool.map(one, seqs))
        return results, {"server_start_s": started, "total_s": time.time() - t0}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        logf.close()


# ----------------------------------------------------------------------------------------------------
# Comparisons


def top_stats(rows):
    lsm = torch.log_softmax(rows, dim=-1)
    top2 = rows.topk(2, dim=-1)
    return lsm, top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]


def our_logprob_entries(line, n):
    out = line["outputs"][0]
    toks = list(out["token_ids"])
    lps = out.get("logprobs")
    if len(toks) != n:
        raise OursError(f"{len(toks)} tokens (wanted {n}), finish_reason {out.get('finish_reason')}")
    if lps is None or len(lps) != n:
        raise OursError(f"logprobs missing or of length {None if lps is None else len(lps)}")
    chosen = []
    for j, (t, lp) in enumerate(zip(toks, lps)):
        if lp.get("token_id") != t:
            raise OursError(f"logprobs[{j}].token_id {lp.get('token_id')} != token {t}")
        v = lp.get("logprob")
        chosen.append(float("nan") if v is None else float(v))
    return toks, lps, chosen


def compare_fp32(ref, prompt, line, n):
    """Greedy comparison of one prompt up to the first divergence."""
    toks, lps, chosen = our_logprob_entries(line, n)
    p = len(prompt)
    rows = ref.rows(prompt + toks, p - 1, p - 1 + n)
    lsm, arg, gap = top_stats(rows)
    ref_lp = lsm.gather(1, torch.tensor(toks, device=rows.device).view(-1, 1))[:, 0]
    arg, gap, ref_lp = arg.tolist(), gap.tolist(), ref_lp.tolist()
    res = {"prompt_len": p, "status": "identical", "compared": n, "first_diff": None}
    dlp = []
    for j in range(n):
        if toks[j] != arg[j]:
            ours_of_ref = next((lp2 for tid, lp2 in lps[j].get("top", []) if tid == arg[j]), None)
            res.update(
                status="near_tie" if gap[j] < FP32_TIE else "fail", compared=j, first_diff=j, ref_gap=gap[j],
                ours_token=toks[j], ref_token=arg[j], ref_logprob_of_ours=ref_lp[j],
                ref_logprob_of_ref=float(lsm[j, arg[j]]), ours_logprob_of_ours=chosen[j],
                ours_logprob_of_ref=ours_of_ref, ours_rank_chosen=lps[j].get("rank"))
            break
        d = abs(chosen[j] - ref_lp[j])
        if not math.isfinite(d):
            res.update(status="fail", compared=j, first_diff=j, error=f"non-finite logprob at {j}: {chosen[j]}")
            break
        dlp.append(d)
    res["max_abs_dlogprob"] = max(dlp) if dlp else None
    res["mean_abs_dlogprob"] = sum(dlp) / len(dlp) if dlp else None
    res["forced_top1_agree"] = sum(int(a == b) for a, b in zip(toks, arg))
    res["forced_hard_disagree"] = sum(int(a != b and g >= FP32_TIE) for a, b, g in zip(toks, arg, gap))
    return res


def tally(agree_flags, gaps, tie):
    n = len(agree_flags)
    agree = sum(agree_flags)
    near = sum(1 for a, g in zip(agree_flags, gaps) if not a and g < tie)
    hard = n - agree - near
    return {"positions": n, "agree": agree, "near_tie_disagree": near, "hard_disagree": hard,
            "agreement_raw": agree / n if n else None, "agreement": (agree + near) / n if n else None}


def summarize_dlp(values):
    vals = [v for v in values if v is not None]
    finite = [v for v in vals if math.isfinite(v)]
    return {"mean_abs_dlogprob": sum(finite) / len(finite) if finite else None,
            "max_abs_dlogprob": max(finite) if finite else None,
            "non_finite": len(vals) - len(finite)}


class Acc:
    """Accumulates one comparison: candidate top-1 / logprob of the scored token against reference rows."""

    def __init__(self, tie):
        self.tie, self.flags, self.gaps, self.dlp = tie, [], [], []

    def add(self, cand_top1, cand_lp, ref_rows, tokens):
        lsm, arg, gap = top_stats(ref_rows)
        ref_lp = lsm.gather(1, torch.tensor(tokens, device=ref_rows.device).view(-1, 1))[:, 0].tolist()
        arg, gap = arg.tolist(), gap.tolist()
        flags = [int(c == a) for c, a in zip(cand_top1, arg)]
        self.flags += flags
        self.gaps += gap
        self.dlp += [abs(c - r) for c, r in zip(cand_lp, ref_lp)]
        return flags, arg, gap

    def result(self):
        return dict(tally(self.flags, self.gaps, self.tie), **summarize_dlp(self.dlp))


def hf_candidate(rows, tokens):
    """transformers bf16 as a candidate: its argmax and its logprob of each scored token."""
    lsm = torch.log_softmax(rows, dim=-1)
    lp = lsm.gather(1, torch.tensor(tokens, device=rows.device).view(-1, 1))[:, 0].tolist()
    return rows.argmax(-1).tolist(), lp


def compare_bf16_decode(ref, exact, prompt, line, ref_cont, n, accs):
    """Our greedy tokens scored by the reference given the same prefix, at every position."""
    toks, lps, chosen = our_logprob_entries(line, n)
    p = len(prompt)
    seq = prompt + toks
    rows = ref.rows(seq, p - 1, p - 1 + n)
    flags, arg, gap = accs["ours_vs_hf"].add(toks, chosen, rows, toks)
    if exact is not None:
        xrows = exact.rows(seq, p - 1, p - 1 + n)
        accs["ours_vs_exact"].add(toks, chosen, xrows, toks)
        accs["hf_vs_exact"].add(*hf_candidate(rows, toks), xrows, toks)
    hard = [{"pos": j, "ours": toks[j], "ref": arg[j], "ref_gap": gap[j], "ours_rank": lps[j].get("rank")}
            for j in range(n) if not flags[j] and gap[j] >= BF16_TIE]
    first_div = next((j for j in range(n) if toks[j] != ref_cont[j]), None)
    not_top1 = sum(1 for lp in lps if lp.get("rank") not in (None, 1))
    return {"prompt_len": p, "first_divergence_from_ref_greedy": first_div, "hard": hard[:5],
            "ours_chosen_not_rank1": not_top1}


def compare_bf16_tf(ref, exact, prompt, cont, plp, n, accs):
    """Teacher-forced: our prompt_logprobs over prompt + cont against the reference, at the cont positions."""
    p = len(prompt)
    seq = prompt + cont
    tops, actual_lps, entries = [], [], []
    for j in range(n):
        entry = plp[p + j]
        if not entry:
            raise OursError(f"prompt_logprobs[{p + j}] is empty")
        actual = entry.get(str(cont[j]))
        if actual is None or actual.get("logprob") is None:
            raise OursError(f"prompt_logprobs[{p + j}] lacks the actual token {cont[j]}")
        # Our top-1: rank 1 (ties: the highest logprob).
        best = min(entry.items(), key=lambda kv: (kv[1].get("rank") or 10 ** 9, -float(kv[1].get("logprob") or -1e9)))
        tops.append(int(best[0]))
        actual_lps.append(float(actual["logprob"]))
        entries.append((entry, best))
    rows = ref.rows(seq, p - 1, p - 1 + n)
    flags, arg, gap = accs["ours_vs_hf"].add(tops, actual_lps, rows, cont)
    if exact is not None:
        xrows = exact.rows(seq, p - 1, p - 1 + n)
        accs["ours_vs_exact"].add(tops, actual_lps, xrows, cont)
        accs["hf_vs_exact"].add(*hf_candidate(rows, cont), xrows, cont)
    hard = []
    for j in range(n):
        if not flags[j] and gap[j] >= BF16_TIE:
            entry, best = entries[j]
            hard.append({"pos": j, "ours": tops[j], "ref": arg[j], "ref_gap": gap[j],
                         "ours_top_logprob": best[1].get("logprob"),
                         "ours_logprob_of_ref": (entry.get(str(arg[j])) or {}).get("logprob")})
    return {"prompt_len": p, "hard": hard[:5]}


# ----------------------------------------------------------------------------------------------------
# Per model


def head_probe(prompts):
    return prompts[min(3, len(prompts) - 1)][:16]


def test_fp32(args, m, prompts, workdir):
    r = {"model": m["name"], "dtype": "float32", "test": "greedy", "errors": []}
    lines, r["ours_seconds"] = run_generate(args, m["path"], "float32", prompts, 5, workdir)
    t0 = time.time()
    ref = Reference(m["path"], torch.float32, "eager", args.ref_device)
    try:
        ref.check_head(head_probe(prompts))
        r["reference"] = {"attn_implementation": ref.attn, "mode": ref.mode, "notes": ref.notes}
        per = []
        for i, (p, line) in enumerate(zip(prompts, lines)):
            try:
                if list(line.get("prompt_token_ids", p)) != list(p):
                    raise OursError("ironllm's prompt_token_ids differ from the ids sent")
                per.append(compare_fp32(ref, p, line, args.max_tokens))
            except (OursError, KeyError, TypeError, ValueError, IndexError) as e:
                per.append({"prompt_len": len(p), "status": "fail", "error": str(e)})
                r["errors"].append(f"prompt of {len(p)} tokens: {e}")
        r["per_prompt"] = per
    finally:
        ref.close()
    r["ref_seconds"] = time.time() - t0
    st = [x["status"] for x in per]
    r.update(prompts=len(per), identical=st.count("identical"), near_tie=st.count("near_tie"), failed=st.count("fail"))
    r.update(summarize_dlp([x.get("max_abs_dlogprob") for x in per]))
    means = [x["mean_abs_dlogprob"] for x in per if x.get("mean_abs_dlogprob") is not None]
    r["mean_abs_dlogprob"] = sum(means) / len(means) if means else None
    r["forced_top1_agree"] = sum(x.get("forced_top1_agree", 0) for x in per)
    r["forced_hard_disagree"] = sum(x.get("forced_hard_disagree", 0) for x in per)
    r["forced_positions"] = len(per) * args.max_tokens
    if r["max_abs_dlogprob"] is not None and r["max_abs_dlogprob"] > args.fp32_warn_dlogprob:
        r.setdefault("warnings", []).append(f"max |dlp| {r['max_abs_dlogprob']:.2e} > {args.fp32_warn_dlogprob:g}")
    r["pass"] = r["failed"] == 0 and not r["errors"]
    return r


def new_accs():
    return {"ours_vs_hf": Acc(BF16_TIE), "ours_vs_exact": Acc(BF16_TIE), "hf_vs_exact": Acc(BF16_TIE)}


def part_result(accs, per, with_exact):
    res = accs["ours_vs_hf"].result()
    if with_exact:
        res["vs_fp32_exact"] = {"ours": accs["ours_vs_exact"].result(), "transformers_bf16": accs["hf_vs_exact"].result()}
    res["per_prompt"] = per
    return res


def test_bf16(args, m, prompts, workdir):
    r = {"model": m["name"], "dtype": "bfloat16", "test": "teacher_forced+decode", "errors": []}
    n = args.max_tokens
    try:
        lines, r["ours_decode_seconds"] = run_generate(args, m["path"], "bfloat16", prompts, args.decode_logprobs,
                                                       workdir)
    except OursError as e:
        # Keep going: the teacher-forced part may still work.
        r["errors"].append(f"decode (generate): {e}")
        r["decode"] = {"error": str(e)}
        lines = None
    t0 = time.time()
    ref = Reference(m["path"], torch.bfloat16, "sdpa", args.ref_device)
    exact = None
    try:
        ref.check_head(head_probe(prompts))
        r["reference"] = {"attn_implementation": ref.attn, "mode": ref.mode, "notes": ref.notes}
        if not args.no_exact:
            # The same bf16 weights computed in float32: how far each bf16 implementation is from exact.
            exact = Reference(m["path"], torch.float32, "eager", args.ref_device)
            exact.check_head(head_probe(prompts))
            r["exact_reference"] = {"attn_implementation": exact.attn, "mode": exact.mode, "notes": exact.notes}
        conts = [ref.greedy(p, n) for p in prompts]
        r["ref_greedy_seconds"] = time.time() - t0

        # B: our decode, scored by the reference.
        accs, per = new_accs(), []
        for p, line, c in zip(prompts, lines or [], conts):
            try:
                if list(line.get("prompt_token_ids", p)) != list(p):
                    raise OursError("ironllm's prompt_token_ids differ from the ids sent")
                per.append(compare_bf16_decode(ref, exact, p, line, c, n, accs))
            except (OursError, KeyError, TypeError, ValueError, IndexError) as e:
                r["errors"].append(f"decode, prompt of {len(p)} tokens: {e}")
                per.append({"prompt_len": len(p), "error": str(e)})
        if lines is not None:
            r["decode"] = part_result(accs, per, exact is not None)

        # A: teacher-forced through our prefill.
        if args.no_serve:
            r["teacher_forced"] = {"skipped": "--no-serve"}
        else:
            seqs = [p + c for p, c in zip(prompts, conts)]
            try:
                plps, timing = run_serve_prompt_logprobs(args, m["path"], "bfloat16", seqs, args.tf_k, workdir)
                r["ours_serve_seconds"] = timing
                accs, per = new_accs(), []
                for p, c, plp in zip(prompts, conts, plps):
                    try:
                        if isinstance(plp, Exception):
                            raise plp
                        per.append(compare_bf16_tf(ref, exact, p, c, plp, n, accs))
                    except (OursError, KeyError, TypeError, ValueError, IndexError) as e:
                        r["errors"].append(f"teacher-forced, prompt of {len(p)} tokens: {e}")
                        per.append({"prompt_len": len(p), "error": str(e)})
                r["teacher_forced"] = part_result(accs, per, exact is not None)
            except OursError as e:
                r["errors"].append(f"teacher-forced (serve): {e}")
                r["teacher_forced"] = {"error": str(e)}
    finally:
        ref.close()
        if exact is not None:
            exact.close()
    r["ref_seconds"] = time.time() - t0
    ok = not r["errors"]
    for part in ("decode", "teacher_forced"):
        x = r.get(part, {})
        if "skipped" in x:
            continue
        ok = ok and x.get("agreement") is not None and x["agreement"] >= BF16_TARGET and \
            x["positions"] == len(prompts) * n
        # Informational: ours much farther from exact than transformers' own bf16 is.
        ve = x.get("vs_fp32_exact")
        if ve and ve["ours"]["mean_abs_dlogprob"] is not None and ve["transformers_bf16"]["mean_abs_dlogprob"]:
            ratio = ve["ours"]["mean_abs_dlogprob"] / ve["transformers_bf16"]["mean_abs_dlogprob"]
            ve["ratio_mean_abs_dlogprob"] = ratio
            if ratio > args.warn_ratio:
                r.setdefault("warnings", []).append(
                    f"{part}: ours is {ratio:.1f}x farther from fp32-exact than transformers bf16 (mean |dlp|)")
    r["pass"] = bool(ok)
    return r


# ----------------------------------------------------------------------------------------------------
# Report


def fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def table_line(r):
    head = f"{'PASS' if r.get('pass') else 'FAIL'} {r['model']:<22}"
    if r.get("fatal"):
        return f"{head} ERROR {r['fatal'].splitlines()[0][:150]}"
    if r["dtype"] == "float32":
        s = (f"{head} greedy {r['prompts']} prompts: {r['identical']} identical, {r['near_tie']} near-tie, "
             f"{r['failed']} FAILED | max|dlp| {fmt(r['max_abs_dlogprob'])} mean {fmt(r['mean_abs_dlogprob'])} | "
             f"forced top1 {r['forced_top1_agree']}/{r['forced_positions']}")
    else:
        parts = []
        for key, label in (("teacher_forced", "TF"), ("decode", "decode")):
            x = r.get(key) or {}
            if "skipped" in x:
                parts.append(f"{label} skipped")
            elif x.get("agreement") is not None:
                s = (f"{label} {x['agreement'] * 100:.2f}% ({x['agree']}+{x['near_tie_disagree']} near-tie"
                     f"/{x['positions']}, {x['hard_disagree']} hard, raw {x['agreement_raw'] * 100:.1f}%) "
                     f"dlp mean {fmt(x['mean_abs_dlogprob'], '.3f')} max {fmt(x['max_abs_dlogprob'], '.3f')}")
                ve = x.get("vs_fp32_exact")
                if ve:
                    s += (f" [vs fp32: ours dlp {fmt(ve['ours']['mean_abs_dlogprob'], '.3f')} "
                          f"{ve['ours']['hard_disagree']} hard, HF-bf16 dlp "
                          f"{fmt(ve['transformers_bf16']['mean_abs_dlogprob'], '.3f')} "
                          f"{ve['transformers_bf16']['hard_disagree']} hard]")
                parts.append(s)
            else:
                parts.append(f"{label} n/a")
        s = f"{head} " + " | ".join(parts)
    if r.get("warnings"):
        s += " | WARN " + "; ".join(r["warnings"])
    if r.get("errors"):
        s += f" | {len(r['errors'])} error(s): {r['errors'][0].splitlines()[0][:120]}"
    return s


def details(r, limit=3):
    """A few lines about what went wrong, for the log."""
    out = []
    if r.get("dtype") == "float32":
        for x in [x for x in r.get("per_prompt", []) if x.get("status") == "fail"][:limit]:
            if "error" in x:
                out.append(f"    prompt of {x['prompt_len']} tokens: {x['error'][:300]}")
            else:
                out.append(f"    prompt of {x['prompt_len']} tokens: first diff at token {x['first_diff']}: ours "
                           f"{x['ours_token']} (ref logprob {x['ref_logprob_of_ours']:.5f}, ours "
                           f"{x['ours_logprob_of_ours']:.5f}) vs ref {x['ref_token']} (ref logprob "
                           f"{x['ref_logprob_of_ref']:.5f}, ours {x['ours_logprob_of_ref']}); ref top-2 gap "
                           f"{x['ref_gap']:.2e}")
    else:
        for part in ("teacher_forced", "decode"):
            shown = 0
            for x in (r.get(part) or {}).get("per_prompt", []):
                for h in x.get("hard", []):
                    if shown < limit:
                        out.append(f"    {part} hard disagreement, prompt of {x['prompt_len']} tokens, position "
                                   f"{h['pos']}: ours {h['ours']} vs ref {h['ref']} (ref top-2 gap {h['ref_gap']:.3f})")
                        shown += 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="models.json of make_models.py")
    ap.add_argument("--ironllm", required=True, help="the ironllm binary")
    ap.add_argument("--out", required=True, help="RESULTS.json to write")
    ap.add_argument("--only", default=None, help="regex on model names (e.g. 'llama-hd64|qwen3')")
    ap.add_argument("--device", default="cuda", help="--device for ironllm (default cuda)")
    ap.add_argument("--ref-device", default=None, help="torch device of the reference (default cuda if available)")
    ap.add_argument("--num-prompts", type=int, default=len(LENGTHS))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tf-k", type=int, default=5, help="prompt_logprobs asked of the server (<= 20)")
    ap.add_argument("--kv-cache", default="4GiB", help="--kv-cache-memory-bytes for ironllm ('' to omit)")
    ap.add_argument("--ironllm-args", default="", help="extra engine flags for every ironllm run")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per ironllm run / request")
    ap.add_argument("--server-start-timeout", type=int, default=240)
    ap.add_argument("--serve-concurrency", type=int, default=1,
                    help="teacher-forced requests in flight at once (default 1: a prompt whose prefill is split "
                         "into chunks by concurrent requests gets only its first chunk's prompt_logprobs back)")
    ap.add_argument("--no-serve", action="store_true", help="skip the teacher-forced bf16 part (ironllm serve)")
    ap.add_argument("--no-exact", action="store_true",
                    help="skip the informational bf16 comparison with fp32 transformers on the same weights")
    ap.add_argument("--decode-logprobs", type=int, default=5, help="--logprobs of the bf16 decode run")
    ap.add_argument("--warn-ratio", type=float, default=2.0,
                    help="WARN when ours is this many times farther from fp32-exact than transformers bf16")
    ap.add_argument("--fp32-warn-dlogprob", type=float, default=1e-3,
                    help="WARN when the fp32 max |d logprob| exceeds this (not a failure)")
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()

    import transformers

    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    started = time.time()
    args.ironllm = os.path.abspath(args.ironllm)
    args.ref_device = args.ref_device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_path = os.path.abspath(args.out)
    logs_dir = os.path.splitext(out_path)[0] + "_logs"
    os.makedirs(logs_dir, exist_ok=True)
    with open(args.models) as f:
        models = json.load(f)
    models_dir = os.path.dirname(os.path.abspath(args.models))
    for m in models:
        if not os.path.isabs(m["path"]):
            m["path"] = os.path.join(models_dir, m["path"])
    if args.only:
        models = [m for m in models if re.search(args.only, m["name"])]
    if args.skip_fp32:
        models = [m for m in models if m["dtype"] != "float32"]
    if args.skip_bf16:
        models = [m for m in models if m["dtype"] != "bfloat16"]
    if not models:
        log("no models selected")
        sys.exit(2)

    precision = set_precision(args.ref_device)
    try:
        version = subprocess.run([args.ironllm, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        version = f"unavailable: {e!r}"
    encode, tok_path = load_tokenizer(models[0]["path"])
    prompts, corpus_tokens = build_prompts(encode, args.num_prompts)
    meta = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "ref_device": args.ref_device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ironllm": args.ironllm, "ironllm_version": version, "ironllm_device": args.device,
        "ironllm_extra": engine_flags(args, "DTYPE"), "precision": precision, "tokenizer": tok_path,
        "corpus_tokens": corpus_tokens, "prompt_lengths": [len(p) for p in prompts],
        "max_tokens": args.max_tokens, "fp32_near_tie": FP32_TIE, "bf16_near_tie": BF16_TIE,
        "bf16_target": BF16_TARGET, "tf_k": args.tf_k,
    }
    log(f"compare_transformers: {len(models)} models, {len(prompts)} prompts (lengths {meta['prompt_lengths']}), "
        f"{args.max_tokens} tokens; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"reference on {args.ref_device} ({meta['gpu']}); ironllm {version!r} on {args.device}")
    log(f"precision: {precision}")

    results = []

    def write():
        doc = {"meta": meta, "results": results, "pass": all(r.get("pass") for r in results) and bool(results),
               "seconds": time.time() - started}
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, out_path)

    for m in models:
        t0 = time.time()
        workdir = os.path.join(logs_dir, m["name"])
        log(f"--- {m['name']} ({m.get('architecture')}, hd {m.get('head_dim')}, {m['dtype']})")
        try:
            if m["dtype"] == "float32":
                r = test_fp32(args, m, prompts, workdir)
            else:
                r = test_bf16(args, m, prompts, workdir)
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            log(tb)
            r = {"model": m["name"], "dtype": m["dtype"], "pass": False, "fatal": f"{type(e).__name__}: {e}",
                 "traceback": tb, "errors": [str(e)]}
            if args.ref_device.startswith("cuda"):
                torch.cuda.empty_cache()
        r["seconds"] = time.time() - t0
        r["head_dim"] = m.get("head_dim")
        r["arch"] = m.get("arch")
        results.append(r)
        log(table_line(r) + f"  [{r['seconds']:.1f}s]")
        for e in r.get("errors", [])[:5]:
            log(f"    error: {e[:2000]}")
        for line in details(r):
            log(line)
        if r.get("reference"):
            log(f"    reference: {r['reference']['attn_implementation']}, {r['reference']['mode']}; "
                f"{'; '.join(r['reference']['notes'])[:400]}")
        write()

    write()
    ok = all(r.get("pass") for r in results)
    log("")
    log(f"=== ironllm vs transformers ({time.time() - started:.0f}s; fp32: greedy, divergence allowed only at a "
        f"top-2 gap < {FP32_TIE:g}; bf16: top-1 agreement >= {BF16_TARGET:.0%}, gap < {BF16_TIE:g} = near-tie)")
    for r in results:
        log(table_line(r))
    log(f"{'PASS' if ok else 'FAIL'}: {sum(1 for r in results if r.get('pass'))}/{len(results)} passed; "
        f"details in {out_path}, logs in {logs_dir}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
