//! Round trips through [`GgufWriter`], corrupt and truncated files, and the real SmolLM2 file when
//! `IRONLLM_TEST_GGUF` points at it.

use super::*;

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("u8", GgufValue::U8(200))
        .metadata("i8", GgufValue::I8(-100))
        .metadata("u16", GgufValue::U16(60000))
        .metadata("i16", GgufValue::I16(-30000))
        .metadata("u32", GgufValue::U32(4_000_000_000))
        .metadata("i32", GgufValue::I32(-2_000_000_000))
        .metadata("u64", GgufValue::U64(u64::MAX))
        .metadata("i64", GgufValue::I64(i64::MIN))
        .metadata("f32", GgufValue::F32(1e-5))
        .metadata("f64", GgufValue::F64(std::f64::consts::PI))
        .metadata("bool", GgufValue::Bool(true))
        .metadata("string", GgufValue::String("héllo ▁ 🦀".into()))
        .metadata("strings", GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("".into())]))
        .metadata("ints", GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]))
        .metadata(
            "nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
                GgufValue::Array(vec![GgufValue::U8(3)]),
            ]),
        )
        .metadata("empty", GgufValue::Array(vec![]));
    w.tensor("a", vec![3, 2], 0, (0..24).collect()).tensor("b.weight", vec![5], 1, vec![7; 10]);
    w
}

#[test]
fn round_trip_every_value_type() {
    let w = sample_writer();
    let g = GgufFile::from_bytes(w.to_bytes()).expect("parse");
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    for (key, value) in &w.metadata {
        assert_eq!(g.get(key), Some(value), "key {key}");
    }
    assert_eq!(g.metadata.len(), w.metadata.len());
    assert_eq!(g.get("u8").and_then(GgufValue::as_u64), Some(200));
    assert_eq!(g.get("i8").and_then(GgufValue::as_u64), None);
    assert_eq!(g.get("i8").and_then(GgufValue::as_i64), Some(-100));
    assert_eq!(g.get("u64").and_then(GgufValue::as_i64), None);
    assert_eq!(g.get("u32").and_then(GgufValue::as_f64), Some(4e9));
    assert!((g.get("f32").and_then(GgufValue::as_f64).unwrap() - 1e-5).abs() < 1e-12);
    assert_eq!(g.get("bool").and_then(GgufValue::as_bool), Some(true));
    assert_eq!(g.get("string").and_then(GgufValue::as_str), Some("héllo ▁ 🦀"));
    assert_eq!(g.get("nested").and_then(GgufValue::as_array).map(<[_]>::len), Some(2));
    assert_eq!(g.get("empty").and_then(GgufValue::as_array), Some(&[][..]));

    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset() % 32, 0);
    let a = g.tensor("a").expect("tensor a");
    assert_eq!(a.dims, vec![3, 2]);
    assert_eq!(a.ggml_type, 0);
    assert_eq!(a.offset, 0);
    assert_eq!(a.num_elements(), Some(6));
    assert_eq!(g.tensor_bytes(a, 24).unwrap(), &(0..24).collect::<Vec<u8>>()[..]);
    let b = g.tensor("b.weight").expect("tensor b");
    assert_eq!(b.offset, 32);
    assert_eq!(g.tensor_bytes(b, 10).unwrap(), &[7; 10]);
    assert!(g.tensor("missing").is_none());
    // Asking for more bytes than the file holds is an error, not a panic.
    let err = g.tensor_bytes(b, 1 << 40).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
}

#[test]
fn custom_alignment_and_file_on_disk() {
    let mut w = sample_writer();
    w.metadata(GGUF_ALIGNMENT_KEY, GgufValue::U32(64));
    let path = std::env::temp_dir().join(format!("ironllm-gguf-test-{}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let g = GgufFile::open(&path);
    std::fs::remove_file(&path).ok();
    let g = g.expect("open");
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(g.tensor("b.weight").unwrap().offset, 64);
    assert_eq!(g.tensor_bytes(g.tensor("b.weight").unwrap(), 10).unwrap(), &[7; 10]);
    assert_eq!(g.path(), path.as_path());
}

#[test]
fn missing_file_is_an_io_error() {
    let err = GgufFile::open(Path::new("/nonexistent/ironllm/model.gguf")).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/ironllm/model.gguf"));
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_writer().to_bytes();
    let g = GgufFile::from_bytes(bytes.clone()).unwrap();
    let header_end = g.data_offset() as usize;
    // Cutting anywhere inside the header must fail cleanly. (Cutting inside the data section is
    // caught when the tensor's bytes are asked for.)
    for len in 0..header_end {
        let cut = bytes[..len].to_vec();
        match GgufFile::from_bytes(cut) {
            Ok(_) => panic!("file cut at {len} of {header_end} parsed"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

fn header(tensor_count: u64, kv_count: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&tensor_count.to_le_bytes());
    out.extend_from_slice(&kv_count.to_le_bytes());
    out
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn corrupt_headers_are_errors() {
    let err = GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec()).unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");

    let mut v1 = b"GGUF".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&[0; 16]);
    let err = GgufFile::from_bytes(v1).unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedVersion { version: 1, .. }), "{err}");

    let mut big_endian = b"GGUF".to_vec();
    big_endian.extend_from_slice(&3u32.to_be_bytes());
    big_endian.extend_from_slice(&[0; 16]);
    let err = GgufFile::from_bytes(big_endian).unwrap_err();
    assert!(err.to_string().contains("big-endian"), "{err}");

    // Absurd counts must be rejected before anything is allocated for them.
    let err = GgufFile::from_bytes(header(u64::MAX, 0)).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = GgufFile::from_bytes(header(0, 1 << 60)).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // A string whose length runs past the end of the file.
    let mut long_key = header(0, 1);
    long_key.extend_from_slice(&(u64::MAX - 3).to_le_bytes());
    long_key.extend_from_slice(b"abc");
    long_key.extend_from_slice(&[0; 16]);
    let err = GgufFile::from_bytes(long_key).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { offset: 24, .. }), "{err}");

    // An array claiming 2^62 u32s.
    let mut huge_array = header(0, 1);
    push_str(&mut huge_array, "k");
    huge_array.extend_from_slice(&9u32.to_le_bytes());
    huge_array.extend_from_slice(&4u32.to_le_bytes());
    huge_array.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = GgufFile::from_bytes(huge_array).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // Unknown value type, bad bool, invalid UTF-8.
    let mut bad_type = header(0, 1);
    push_str(&mut bad_type, "k");
    bad_type.extend_from_slice(&13u32.to_le_bytes());
    bad_type.extend_from_slice(&[0; 8]);
    let err = GgufFile::from_bytes(bad_type).unwrap_err();
    assert!(err.to_string().contains("unknown value type 13"), "{err}");

    let mut bad_bool = header(0, 1);
    push_str(&mut bad_bool, "k");
    bad_bool.extend_from_slice(&7u32.to_le_bytes());
    bad_bool.push(2);
    let err = GgufFile::from_bytes(bad_bool).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err}");

    let mut bad_utf8 = header(0, 1);
    bad_utf8.extend_from_slice(&2u64.to_le_bytes());
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(&7u32.to_le_bytes());
    bad_utf8.push(0);
    let err = GgufFile::from_bytes(bad_utf8).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");

    // Arrays nested deeper than any real file.
    let mut deep = header(0, 1);
    push_str(&mut deep, "k");
    deep.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    deep.extend_from_slice(&[0; 64]);
    let err = GgufFile::from_bytes(deep).unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");
}

#[test]
fn inconsistent_files_are_errors() {
    let mut dup = GgufWriter::new();
    dup.metadata("k", GgufValue::U8(1)).metadata("k", GgufValue::U8(2));
    let err = GgufFile::from_bytes(dup.to_bytes()).unwrap_err();
    assert!(err.to_string().contains("duplicate metadata key"), "{err}");

    let mut dup_tensor = GgufWriter::new();
    dup_tensor.tensor("t", vec![1], 0, vec![0; 4]).tensor("t", vec![1], 0, vec![0; 4]);
    let err = GgufFile::from_bytes(dup_tensor.to_bytes()).unwrap_err();
    assert!(err.to_string().contains("duplicate tensor name"), "{err}");

    let mut bad_alignment = GgufWriter::new();
    bad_alignment.metadata(GGUF_ALIGNMENT_KEY, GgufValue::U32(3));
    let err = GgufFile::from_bytes(bad_alignment.to_bytes()).unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");

    // A tensor whose offset points past the end of the data section.
    let mut bytes = GgufWriter::new().tensor("t", vec![4], 0, vec![0; 16]).to_bytes();
    // No metadata, so the tensor info starts right after the 24-byte header:
    // name (8 + 1), n_dims (4), one dim (8), type (4), then the offset.
    let offset_field = 24 + 8 + 1 + 4 + 8 + 4;
    bytes[offset_field..offset_field + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let err = GgufFile::from_bytes(bytes.clone()).unwrap_err();
    assert!(err.to_string().contains("past the"), "{err}");
    bytes[offset_field..offset_field + 8].copy_from_slice(&5u64.to_le_bytes());
    let err = GgufFile::from_bytes(bytes).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
}

/// Parses the real SmolLM2 file when `IRONLLM_TEST_GGUF` names it; otherwise says so and passes.
#[test]
fn real_smollm2_gguf() {
    let Some(path) = std::env::var_os("IRONLLM_TEST_GGUF") else {
        eprintln!("note: IRONLLM_TEST_GGUF is not set; skipping the real-GGUF parse test");
        return;
    };
    let path = std::path::PathBuf::from(path);
    if !path.exists() {
        eprintln!("note: IRONLLM_TEST_GGUF={} does not exist; skipping", path.display());
        return;
    }
    let g = GgufFile::open(&path).expect("open SmolLM2 GGUF");
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.tensors.len(), 272);
    assert_eq!(g.get("llama.block_count").and_then(GgufValue::as_u64), Some(30));
    assert_eq!(g.get("llama.embedding_length").and_then(GgufValue::as_u64), Some(576));
    assert_eq!(g.get("llama.attention.head_count_kv").and_then(GgufValue::as_u64), Some(3));
    assert_eq!(g.get("llama.rope.freq_base").and_then(GgufValue::as_f64), Some(100000.0));
    assert_eq!(g.get("tokenizer.ggml.pre").and_then(GgufValue::as_str), Some("smollm"));
    let tokens = g.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));
    let embd = g.tensor("token_embd.weight").expect("token_embd.weight");
    assert_eq!(embd.dims, vec![576, 49152]);
    // Every tensor starts inside the file.
    for t in &g.tensors {
        assert!(g.data_offset() + t.offset < g.file_len(), "{}", t.name);
    }
    // Q4_1 (type 3): blocks of 32 weights in 20 bytes.
    if embd.ggml_type == 3 {
        let nbytes = (embd.num_elements().unwrap() / 32 * 20) as usize;
        assert_eq!(g.tensor_bytes(embd, nbytes).unwrap().len(), nbytes);
    }
}
