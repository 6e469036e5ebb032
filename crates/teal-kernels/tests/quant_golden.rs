//! Dequantization against golden values from the independent Python reference
//! (PyPI `gguf==0.19.0`, `gguf.quants.dequantize`), made by
//! `tools/reference/make_quant_fixtures.py`. Comparison is bitwise: both sides do the same
//! f32 operations in the same order without fused multiply-add.

use teal_kernels::quant::{dequantize, GgmlType};

const FIXTURE: &[u8] = include_bytes!("fixtures/quant_golden.bin");

struct Case {
    ty: GgmlType,
    raw: Vec<u8>,
    expected: Vec<f32>,
}

fn u32_at(b: &[u8], pos: &mut usize) -> u32 {
    let v = u32::from_le_bytes(b[*pos..*pos + 4].try_into().unwrap());
    *pos += 4;
    v
}

fn load() -> Vec<Case> {
    let b = FIXTURE;
    assert_eq!(&b[..4], b"TQF1", "fixture magic");
    let mut pos = 4;
    let n = u32_at(b, &mut pos);
    let mut cases = Vec::new();
    for _ in 0..n {
        let id = u32_at(b, &mut pos);
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("fixture type id {id}"));
        let n_el = u32_at(b, &mut pos) as usize;
        let n_bytes = u32_at(b, &mut pos) as usize;
        let raw = b[pos..pos + n_bytes].to_vec();
        pos += n_bytes;
        let expected = b[pos..pos + 4 * n_el]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        pos += 4 * n_el;
        cases.push(Case { ty, raw, expected });
    }
    assert_eq!(pos, b.len(), "trailing bytes in fixture");
    cases
}

#[test]
fn golden_every_type_bitwise() {
    let cases = load();
    for ty in GgmlType::ALL {
        assert!(cases.iter().any(|c| c.ty == ty), "no golden case for {ty}");
    }
    let mut total = 0;
    for (i, c) in cases.iter().enumerate() {
        let mut out = vec![f32::NAN; c.expected.len()];
        dequantize(c.ty, &c.raw, &mut out).unwrap();
        for (j, (&got, &want)) in out.iter().zip(&c.expected).enumerate() {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "case {i} ({}), element {j} (block {}): got {got:e}, python gguf says {want:e}",
                c.ty,
                j / c.ty.block_size()
            );
        }
        total += out.len();
    }
    assert!(total > 5000, "fixture too small: {total} values");
}

#[test]
fn golden_blockwise_equals_whole() {
    // Dequantizing block by block gives the same as the whole row (no cross-block state).
    for c in load() {
        let bs = c.ty.block_size();
        let ts = c.ty.type_size();
        let mut out = vec![0f32; bs];
        for (k, blk) in c.raw.chunks_exact(ts).enumerate() {
            dequantize(c.ty, blk, &mut out).unwrap();
            let want = &c.expected[k * bs..(k + 1) * bs];
            assert!(
                out.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} block {k}",
                c.ty
            );
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let bs = ty.block_size();
        let ts = ty.type_size();
        let mut out = vec![0f32; 2 * bs];
        assert!(dequantize(ty, &vec![0u8; 2 * ts], &mut out).is_ok());
        let e = dequantize(ty, &vec![0u8; 2 * ts - 1], &mut out).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{}", 2 * ts)) && msg.contains(ty.name()),
            "{msg}"
        );
        assert!(dequantize(ty, &vec![0u8; 2 * ts + 1], &mut out).is_err());
        if bs > 1 {
            let mut odd = vec![0f32; bs + 1];
            assert!(dequantize(ty, &vec![0u8; 2 * ts], &mut odd).is_err());
        }
    }
}
