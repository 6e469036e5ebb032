//! GGUF writer/reader round trip and robustness: truncated, corrupt and lying files must give
//! a clean error naming the file, never a panic or an unbounded allocation.

use proptest::prelude::*;
use teal::gguf::{GgufError, GgufFile, GgufWriter, MetaValue, TensorInfo};
use teal_kernels::quant::GgmlType;

fn all_kinds() -> Vec<(&'static str, MetaValue)> {
    use MetaValue::*;
    vec![
        ("general.architecture", String("llama".into())),
        ("k.u8", U8(250)),
        ("k.i8", I8(-128)),
        ("k.u16", U16(65535)),
        ("k.i16", I16(-32768)),
        ("k.u32", U32(u32::MAX)),
        ("k.i32", I32(i32::MIN)),
        ("k.u64", U64(u64::MAX)),
        ("k.i64", I64(i64::MIN)),
        ("k.f32", F32(-0.1)),
        ("k.f64", F64(std::f64::consts::PI)),
        ("k.f32.inf", F32(f32::INFINITY)),
        ("k.bool.t", Bool(true)),
        ("k.bool.f", Bool(false)),
        ("k.str", String("ünïcødé ✓ \n\0 end".into())),
        ("k.str.empty", String(std::string::String::new())),
        ("k.arr.empty", Array(vec![])),
        ("k.arr.u8", Array(vec![U8(0), U8(255)])),
        ("k.arr.i32", Array(vec![I32(-1), I32(7), I32(i32::MAX)])),
        ("k.arr.f32", Array(vec![F32(1.5), F32(-2.25)])),
        ("k.arr.bool", Array(vec![Bool(false), Bool(true)])),
        (
            "k.arr.str",
            Array(vec![
                String("a".into()),
                String("".into()),
                String("Ġuser".into()),
            ]),
        ),
        ("k.arr.u64", Array(vec![U64(1 << 40)])),
        (
            "k.arr.nested",
            Array(vec![
                Array(vec![I16(1), I16(-2)]),
                Array(vec![]),
                Array(vec![I16(3)]),
            ]),
        ),
    ]
}

/// A small file with every metadata kind and a tensor of every supported type.
type Tensors = Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>;

fn sample_writer() -> (GgufWriter, Tensors) {
    let mut w = GgufWriter::new();
    for (k, v) in all_kinds() {
        w.add_meta(k, v);
    }
    let mut tensors = Vec::new();
    let mut seed = 0x1234_5678u32;
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let dims = vec![ty.block_size() as u64 * 2, 3];
        let n = ty.row_bytes(ty.block_size() * 6).unwrap();
        let data: Vec<u8> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                // Keep every f16/bf16 byte pattern finite-ish: clear the top exponent bit.
                ((seed >> 24) as u8) & 0xBF
            })
            .collect();
        let name = format!("t{i}.{}", ty.name().to_lowercase());
        w.add_tensor(&name, &dims, ty, data.clone());
        tensors.push((name, dims, ty, data));
    }
    (w, tensors)
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().0.to_bytes()
}

fn end_of_data(f: &GgufFile) -> usize {
    f.tensors
        .iter()
        .map(|t| t.offset as usize + t.n_bytes)
        .max()
        .unwrap_or(0)
}

#[test]
fn round_trip_all_metadata_kinds_and_types() {
    let (w, tensors) = sample_writer();
    let bytes = w.to_bytes();
    let f = GgufFile::from_bytes(bytes.clone(), "mem").unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    let want = all_kinds();
    assert_eq!(f.metadata.len(), want.len());
    for ((k, v), (wk, wv)) in f.metadata.iter().zip(&want) {
        assert_eq!(k, wk);
        assert_eq!(v, wv, "value of '{k}'");
    }
    assert_eq!(f.tensors.len(), tensors.len());
    for (t, (name, dims, ty, data)) in f.tensors.iter().zip(&tensors) {
        assert_eq!(&t.name, name);
        assert_eq!(&t.dims, dims);
        assert_eq!(t.ty, *ty);
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_data(t), &data[..]);
        assert_eq!(f.dequantize(t).unwrap().len() as u64, t.n_elements());
    }
    // Accessors.
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("k.u64").unwrap(), u64::MAX);
    assert_eq!(f.get_u64("k.u8").unwrap(), 250);
    assert_eq!(f.get_f32("k.f64").unwrap(), std::f32::consts::PI);
    assert_eq!(f.get_str("k.str").unwrap(), "ünïcødé ✓ \n\0 end");
    assert_eq!(f.get_array("k.arr.str").unwrap().len(), 3);
    assert!(f.get_bool("k.bool.t").unwrap());
    let e = f.get_u64("k.i8").unwrap_err().to_string(); // negative
    assert!(e.contains("'k.i8'") && e.contains("mem"), "{e}");
    let e = f.get_str("k.u32").unwrap_err().to_string();
    assert!(
        e.contains("'k.u32'") && e.contains("UINT32") && e.contains("STRING"),
        "{e}"
    );
    let e = f.get_f32("nope").unwrap_err().to_string();
    assert!(e.contains("'nope'") && e.contains("missing"), "{e}");

    // Through the file system and mmap: the same.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    w.write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.metadata, f.metadata);
    assert_eq!(g.bytes(), &bytes[..]);
    for (a, b) in f.tensors.iter().zip(&g.tensors) {
        assert_eq!(f.tensor_data(a), g.tensor_data(b));
    }
    // Writing what we read reproduces the file byte for byte.
    let mut w2 = GgufWriter::new();
    for (k, v) in &g.metadata {
        w2.add_meta(k, v.clone());
    }
    for t in &g.tensors {
        w2.add_tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
    }
    assert_eq!(w2.to_bytes(), bytes);
}

#[test]
fn float_values_round_trip() {
    let vals: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) * 0.37).collect();
    let mut w = GgufWriter::new();
    w.add_f32_tensor("x", &[8, 5], &vals);
    let f16s: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    w.add_tensor("h", &[40], GgmlType::F16, f16s);
    let bf16s: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    w.add_tensor("b", &[4, 10], GgmlType::BF16, bf16s);
    let f = GgufFile::from_bytes(w.to_bytes(), "floats").unwrap();
    assert_eq!(f.dequantize(f.tensor("x").unwrap()).unwrap(), vals);
    let h = f.dequantize(f.tensor("h").unwrap()).unwrap();
    let b = f.dequantize(f.tensor("b").unwrap()).unwrap();
    for i in 0..40 {
        assert_eq!(h[i], half::f16::from_f32(vals[i]).to_f32());
        assert_eq!(b[i], half::bf16::from_f32(vals[i]).to_f32());
    }
    assert_eq!(f.tensor("x").unwrap().n_elements(), 40);
}

#[test]
fn custom_alignment_and_empty_file() {
    let mut w = GgufWriter::new();
    w.add_meta("general.alignment", MetaValue::U32(256));
    w.add_f32_tensor("a", &[3], &[1.0, 2.0, 3.0]);
    w.add_f32_tensor("b", &[5], &[4.0; 5]);
    let f = GgufFile::from_bytes(w.to_bytes(), "aligned").unwrap();
    assert_eq!(f.alignment, 256);
    assert_eq!(f.data_offset % 256, 0);
    for t in &f.tensors {
        assert_eq!(t.offset % 256, 0, "{}", t.name);
    }
    assert_eq!(f.dequantize(&f.tensors[1]).unwrap(), vec![4.0; 5]);

    let empty = GgufFile::from_bytes(GgufWriter::new().to_bytes(), "empty").unwrap();
    assert!(empty.metadata.is_empty() && empty.tensors.is_empty());
    assert!(empty.architecture().is_err());

    let mut bad = GgufWriter::new();
    bad.add_meta("general.alignment", MetaValue::U32(3));
    assert!(bad.try_to_bytes().is_err());
    let mut bad = GgufWriter::new();
    bad.add_tensor("q", &[32, 2], GgmlType::Q8_0, vec![0; 67]);
    assert!(bad.try_to_bytes().unwrap_err().to_string().contains("'q'"));
    let mut bad = GgufWriter::new();
    bad.add_meta(
        "m",
        MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
    );
    assert!(bad.try_to_bytes().is_err());
}

#[test]
fn version_2_is_read() {
    let mut b = sample_bytes();
    b[4] = 2;
    let f = GgufFile::from_bytes(b, "v2").unwrap();
    assert_eq!(f.version, 2);
}

#[test]
fn every_truncation_errors_cleanly() {
    let full = sample_bytes();
    let f = GgufFile::from_bytes(full.clone(), "full").unwrap();
    let end = end_of_data(&f);
    assert!(end <= full.len() && full.len() - end < 32);
    for len in 0..full.len() {
        let r = GgufFile::from_bytes(full[..len].to_vec(), "cut.gguf");
        if len < end {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("truncation to {len} of {end} bytes was accepted"));
            let msg = e.to_string();
            assert!(msg.starts_with("cut.gguf: "), "{msg}");
            assert!(
                matches!(e, GgufError::Truncated { .. } | GgufError::BadTensor { .. }),
                "len {len}: {msg}"
            );
        } else {
            // Only the trailing padding is missing: still a complete file.
            assert_eq!(r.unwrap().tensors.len(), f.tensors.len());
        }
    }
}

// ---- hand-made lying headers -------------------------------------------------------------

struct Raw(Vec<u8>);
impl Raw {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, off: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(off)
    }
    fn pad(&mut self, n: usize) -> &mut Self {
        self.0.resize(n, 0);
        self
    }
    fn err(&self) -> String {
        match GgufFile::from_bytes(self.0.clone(), "bad.gguf") {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.starts_with("bad.gguf: "), "{m}");
                m
            }
        }
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected {p:?} in: {msg}");
    }
}

#[test]
fn lying_headers() {
    // Magic and version.
    assert_has(&Raw(b"GGML\x03\0\0\0".to_vec()).err(), &["bad magic"]);
    assert_has(&Raw(vec![]).err(), &["truncated", "magic"]);
    assert_has(&Raw(b"GG".to_vec()).err(), &["truncated"]);
    assert_has(&Raw(b"\x7fELF".to_vec()).err(), &["bad magic"]);
    assert_has(&Raw::new(1, 0, 0).err(), &["unsupported GGUF version 1"]);
    assert_has(&Raw::new(4, 0, 0).err(), &["unsupported GGUF version 4"]);
    assert_has(
        &Raw(b"GGUF\x03\0\0\0\0\0".to_vec()).err(),
        &["truncated", "tensor count", "byte 8"],
    );

    // Huge counts (would be terabytes if pre-allocated).
    assert_has(&Raw::new(3, u64::MAX, 0).err(), &["tensor infos"]);
    assert_has(&Raw::new(3, 0, u64::MAX).err(), &["metadata entries"]);
    assert_has(&Raw::new(3, 1 << 40, 1).err(), &["truncated"]);

    // Huge string lengths.
    let mut r = Raw::new(3, 0, 1);
    r.u64(u64::MAX).pad(64);
    assert_has(
        &r.err(),
        &[
            "truncated",
            "metadata key #0",
            "byte 32",
            "18446744073709551615",
        ],
    );
    let mut r = Raw::new(3, 0, 1);
    r.str("k").u32(8).u64(1 << 60);
    assert_has(&r.err(), &["truncated", "'k'"]);
    // Huge array count, nested arrays too.
    let mut r = Raw::new(3, 0, 1);
    r.str("arr").u32(9).u32(0).u64(u64::MAX);
    assert_has(&r.err(), &["truncated", "'arr'"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("arr").u32(9).u32(9).u64(2).u32(6).u64(1 << 50);
    assert_has(&r.err(), &["truncated", "'arr'"]);
    // Arrays nested without end.
    let mut r = Raw::new(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..100 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert_has(&r.err(), &["nested"]);
    // Unknown value types, bad bools, bad UTF-8 keys, duplicate keys.
    let mut r = Raw::new(3, 0, 1);
    r.str("k").u32(13).u64(0);
    assert_has(&r.err(), &["unknown value type 13"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("k").u32(9).u32(99).u64(0);
    assert_has(&r.err(), &["unknown array element type 99"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("b").u32(7);
    r.0.push(2);
    assert_has(&r.err(), &["bool"]);
    let mut r = Raw::new(3, 0, 1);
    r.u64(2);
    r.0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(0);
    r.0.push(0);
    assert_has(&r.err(), &["UTF-8"]);
    let mut r = Raw::new(3, 0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    assert_has(&r.err(), &["duplicate metadata key 'k'"]);

    // Alignment.
    for bad in [0u32, 3, 48] {
        let mut r = Raw::new(3, 0, 1);
        r.str("general.alignment").u32(4).u32(bad);
        assert_has(&r.err(), &["general.alignment"]);
    }
    let mut r = Raw::new(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    assert_has(&r.err(), &["general.alignment"]);

    // Tensor infos: one F32 tensor of 8 elements, data section at 64.
    let ok = |dims: &[u64], ty: u32, off: u64, file_len: usize| {
        let mut r = Raw::new(3, 1, 0);
        r.tensor("w", dims, ty, off).pad(file_len);
        r
    };
    assert!(GgufFile::from_bytes(ok(&[8], 0, 0, 96).0, "good").is_ok());
    assert_has(&ok(&[8], 0, 0, 95).err(), &["tensor 'w'", "out of bounds"]);
    assert_has(&ok(&[8], 0, 32, 96).err(), &["tensor 'w'", "out of bounds"]);
    assert_has(
        &ok(&[8], 0, u64::MAX - 31, 96).err(),
        &["tensor 'w'", "out of bounds"],
    );
    assert_has(&ok(&[8], 0, 4, 200).err(), &["tensor 'w'", "alignment"]);
    assert_has(
        &ok(&[8], 16, 0, 200).err(),
        &["unsupported tensor type id 16 for tensor 'w'"],
    );
    assert_has(&ok(&[8], 99, 0, 200).err(), &["type id 99", "'w'"]);
    assert_has(
        &ok(&[1 << 32, 1 << 32], 0, 0, 200).err(),
        &["'w'", "overflow"],
    );
    assert_has(&ok(&[u64::MAX / 4 + 1], 0, 0, 200).err(), &["'w'"]);
    assert_has(&ok(&[1 << 61], 2, 0, 200).err(), &["'w'", "out of bounds"]);
    assert_has(&ok(&[48, 2], 8, 0, 500).err(), &["'w'", "block size 32"]);
    assert_has(
        &ok(&[8, 1, 1, 1, 1], 0, 0, 200).err(),
        &["'w'", "5 dimensions"],
    );
    let mut r = Raw::new(3, 2, 0);
    r.tensor("w", &[8], 0, 0).tensor("w", &[8], 0, 32).pad(300);
    assert_has(&r.err(), &["duplicate tensor name 'w'"]);
    // Each tensor's data where the previous one's ends (padded), as llama.cpp requires: a
    // second tensor pointed at the first's bytes, or one whose type was changed to a shorter
    // one, is refused instead of read from the wrong bytes.
    let two = |ty_a: u32, off_b: u64| {
        let mut r = Raw::new(3, 2, 0);
        r.tensor("a", &[8], ty_a, 0)
            .tensor("b", &[8], 0, off_b)
            .pad(300);
        r
    };
    assert!(GgufFile::from_bytes(two(0, 32).0, "good").is_ok());
    assert_has(&two(0, 0).err(), &["tensor 'b'", "offset 0, expected 32"]);
    assert_has(&two(0, 64).err(), &["tensor 'b'", "offset 64, expected 32"]);
    let mut r = Raw::new(3, 2, 0);
    r.tensor("a", &[16], 1, 0).tensor("b", &[8], 0, 64).pad(300);
    assert_has(&r.err(), &["tensor 'b'", "offset 64, expected 32"]);
}

#[test]
fn open_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.gguf"), "{e}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = GgufFile::open(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.gguf") && e.contains("bad magic"), "{e}");
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err().to_string();
    assert!(e.contains("empty.gguf") && e.contains("truncated"), "{e}");
}

/// Parse, and when it parses, touch everything: no panic allowed anywhere.
fn exercise(bytes: Vec<u8>) {
    if let Ok(f) = GgufFile::from_bytes(bytes, "fuzz") {
        let len = f.bytes().len();
        for t in &f.tensors {
            let t: &TensorInfo = t;
            assert!(t.offset as usize + t.n_bytes <= len);
            assert_eq!(f.tensor_data(t).len(), t.n_bytes);
            let x = f.dequantize(t).unwrap();
            assert_eq!(x.len() as u64, t.n_elements());
        }
        for (k, v) in &f.metadata {
            let _ = (
                f.get_u64(k),
                f.get_f32(k),
                f.get_str(k),
                f.get_array(k),
                v.to_string(),
            );
        }
        let _ = f.architecture();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        exercise(bytes);
    }

    #[test]
    fn arbitrary_bytes_after_header_never_panic(
        version in 2u32..4,
        n_tensors in prop_oneof![0u64..4, any::<u64>()],
        n_kv in prop_oneof![0u64..4, any::<u64>()],
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(&tail);
        exercise(b);
    }

    #[test]
    fn mutated_valid_file_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut b = sample_bytes();
        for (at, byte, kind) in edits {
            let i = at.index(b.len());
            match kind {
                0 => b[i] = byte,
                1 => b[i] ^= 1 << (byte % 8),
                // Plausible-but-wrong small or huge integers where counts and lengths live.
                2 => { let v = (byte as u64) << (8 * (byte % 8)); let e = (i + 8).min(b.len()); b[i..e].copy_from_slice(&v.to_le_bytes()[..e - i]); }
                _ => b[i] = 0xff,
            }
        }
        if do_cut {
            let n = cut.index(b.len() + 1);
            b.truncate(n);
        }
        exercise(b);
    }
}
