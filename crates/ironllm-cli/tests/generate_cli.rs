//! `ironllm generate` as a user runs it: JSONL in, JSONL out, flags with vLLM's names, clear errors.

use std::process::Command;

fn ironllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ironllm"))
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn jsonl_in_jsonl_out_on_a_tiny_model() {
    let dir = std::env::temp_dir().join(format!("ironllm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt_token_ids\": [5, 6, 7], \"max_tokens\": 4}\n\n{\"prompt_token_ids\": [9, 10], \"max_tokens\": 6, \"n\": 2, \"temperature\": 1.0, \"seed\": 3}\n",
    )
    .unwrap();
    let output = dir.join("out.jsonl");
    let model = fixtures().join("reference/tiny_qwen2");
    let status = ironllm()
        .args(["generate", "--temperature", "0", "--kv-cache-memory-bytes", "64MiB", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg(&model)
        .status()
        .unwrap();
    assert!(status.success());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt_token_ids"], serde_json::json!([5, 6, 7]));
    assert_eq!(lines[0]["outputs"][0]["token_ids"].as_array().unwrap().len(), 4);
    assert_eq!(lines[0]["outputs"][0]["finish_reason"], "length");
    assert_eq!(lines[1]["outputs"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_flags_fail_clearly() {
    let out = ironllm().args(["generate", "--no-such-flag"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = ironllm().args(["generate", "/no/such/model", "--prompt", "x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let model = fixtures().join("reference/tiny_qwen2");
    let out = ironllm().arg("generate").arg(&model).args(["--prompt-x"]).output().unwrap();
    assert!(!out.status.success());
    let out = ironllm().arg("generate").arg(&model).args(["--dtype", "int3", "--prompt", "x"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid dtype"));
    // A text prompt on a model without a tokenizer is an error, not a panic.
    let out = ironllm().arg("generate").arg(&model).args(["--prompt", "hello"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer"));
}

#[test]
fn kv_cache_dtype_fp8_is_refused_and_bad_values_list_the_choices() {
    let model = fixtures().join("reference/tiny_qwen2");
    for name in ["fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"] {
        let out =
            ironllm().arg("generate").arg(&model).args(["--kv-cache-dtype", name, "--prompt", "x"]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("--kv-cache-dtype {name} is not supported yet")), "{err}");
        assert!(err.contains("float16, bfloat16"), "{err}");
    }
    for sub in [&["generate"][..], &["serve"], &["bench", "latency"]] {
        let out = ironllm().args(sub).args(["--kv-cache-dtype", "int8"]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid value 'int8' for '--kv-cache-dtype"), "{sub:?}: {err}");
        assert!(err.contains("float16") && err.contains("fp8_e4m3"), "{sub:?}: {err}");
    }
}

#[test]
fn a_16_bit_kv_cache_runs() {
    let model = fixtures().join("reference/tiny_qwen2");
    for kv in ["half", "bfloat16"] {
        let out = ironllm()
            .arg("generate")
            .arg(&model)
            .args(["--kv-cache-dtype", kv, "--kv-cache-memory-bytes", "64MiB", "--input", "/dev/stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(b"{\"prompt_token_ids\": [5, 6, 7], \"max_tokens\": 4}\n")?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(line["outputs"][0]["token_ids"].as_array().unwrap().len(), 4);
        // The start-up log names the cache's element type.
        let want = if kv == "half" { "KV cache (float16)" } else { "KV cache (bfloat16)" };
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn dummy_weights_run_any_config() {
    let model = fixtures().join("reference/tiny_llama3");
    let out = ironllm()
        .arg("generate")
        .arg(&model)
        .args(["--load-format", "dummy", "--kv-cache-memory-bytes", "64MiB", "--input", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"{\"prompt_token_ids\": [1, 2, 3], \"max_tokens\": 5, \"ignore_eos\": true}\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["token_ids"].as_array().unwrap().len(), 5);
}
