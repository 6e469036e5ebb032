//! ggml block formats: type table and scalar reference dequantization.
//!
//! Bit layouts follow ggml (`ggml-common.h` block structs, `ggml-quants.c`
//! `dequantize_row_*`). All multi-byte fields are little-endian. The arithmetic is done in
//! `f32` in the same order as ggml's reference (and the `gguf` Python package), without
//! fused multiply-add, so results are bit-identical to both.
//!
//! This is the correctness reference: plain scalar loops, no threads, no SIMD.

use half::{bf16, f16};
use std::fmt;

/// Elements per super-block of the k-quants.
pub const QK_K: usize = 256;
/// Elements per block of the legacy quants (Q4_0 .. Q8_0).
pub const QK32: usize = 32;

/// The ggml tensor types this engine can dequantize.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Every supported type, in ggml id order.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// Map a ggml type id (`enum ggml_type`) to a supported type.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name as llama.cpp prints it (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                QK32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK32 / 2,          // d, qs
            GgmlType::Q4_1 => 2 + 2 + QK32 / 2,      // d, m, qs
            GgmlType::Q5_0 => 2 + 4 + QK32 / 2,      // d, qh, qs
            GgmlType::Q5_1 => 2 + 2 + 4 + QK32 / 2,  // d, m, qh, qs
            GgmlType::Q8_0 => 2 + QK32,              // d, qs
            GgmlType::Q4_K => 2 + 2 + 12 + QK_K / 2, // d, dmin, scales, qs
            GgmlType::Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2, // d, dmin, scales, qh, qs
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, // ql, qh, scales, d
        }
    }

    /// Bytes taken by `n` elements; `None` if `n` is not a multiple of the block size (or the
    /// byte count overflows `usize`).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }

    /// True for the float types (F32, F16, BF16).
    pub fn is_float(self) -> bool {
        self.block_size() == 1
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the block-format routines.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QuantError {
    #[error("{ty}: {n} elements is not a multiple of the block size {block_size}")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block_size: usize,
    },
    #[error("{ty}: {n} elements take {expected} bytes, but {got} bytes were given")]
    LengthMismatch {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `out.len()` elements from `src`, which must be exactly
/// `ty.row_bytes(out.len())` bytes.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let n = out.len();
    let expected = ty.row_bytes(n).ok_or(QuantError::NotBlockMultiple {
        ty,
        n,
        block_size: ty.block_size(),
    })?;
    if src.len() != expected {
        return Err(QuantError::LengthMismatch {
            ty,
            n,
            expected,
            got: src.len(),
        });
    }
    let ts = ty.type_size();
    let bs = ty.block_size();
    let blocks = src.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| block_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| block_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| block_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| block_q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| block_q8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| block_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| block_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| block_q6_k(b, y)),
    }
    Ok(())
}

/// Q4_0: `d: f16`, `qs: [u8; 16]`. Element `j` is the low nibble of `qs[j]`, element `j + 16`
/// the high nibble; value `d * (q - 8)`.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as i32 - 8;
        let hi = (qs[j] >> 4) as i32 - 8;
        y[j] = lo as f32 * d;
        y[j + 16] = hi as f32 * d;
    }
}

/// Q4_1: `d: f16`, `m: f16`, `qs: [u8; 16]`; value `d * q + m`.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as f32;
        let hi = (qs[j] >> 4) as f32;
        y[j] = lo * d + m;
        y[j + 16] = hi * d + m;
    }
}

/// Q5_0: `d: f16`, `qh: u32` (bit `j` = 5th bit of element `j`), `qs: [u8; 16]`;
/// value `d * (q - 16)`.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        let q0 = ((qs[j] & 0x0F) | (h0 << 4)) as i32 - 16;
        let q1 = ((qs[j] >> 4) | (h1 << 4)) as i32 - 16;
        y[j] = q0 as f32 * d;
        y[j + 16] = q1 as f32 * d;
    }
}

/// Q5_1: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`; value `d * q + m`.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        let q0 = ((qs[j] & 0x0F) | (h0 << 4)) as f32;
        let q1 = ((qs[j] >> 4) | (h1 << 4)) as f32;
        y[j] = q0 * d + m;
        y[j + 16] = q1 * d + m;
    }
}

/// Q8_0: `d: f16`, `qs: [i8; 32]`; value `d * q`.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K super-block, packed in
/// 12 bytes: sub-blocks 0..4 use the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4..8
/// take their low 4 bits from byte `j + 4` (scale: low nibble, min: high nibble) and their
/// top 2 bits from the top bits of bytes `j - 4` (scale) and `j` (min).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qs: [u8; 128]`. Eight sub-blocks of 32;
/// each 32 bytes of `qs` hold two sub-blocks (low nibbles, then high nibbles).
/// Value `(d * sc) * q - (dmin * m)`.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc0, m0) = scale_min_k4(2 * chunk, scales);
        let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let (d0, mm0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d0 * (q[l] & 0x0F) as f32 - mm0;
            y[l + 32] = d1 * (q[l] >> 4) as f32 - mm1;
        }
    }
}

/// Q5_K: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]`.
/// As Q4_K, plus a 5th bit: for sub-block `s`, bit `s` of `qh[l]`.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let (sc0, m0) = scale_min_k4(2 * chunk, scales);
        let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let (d0, mm0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            let h0 = (qh[l] >> (2 * chunk)) & 1;
            let h1 = (qh[l] >> (2 * chunk + 1)) & 1;
            y[l] = d0 * ((q[l] & 0x0F) | (h0 << 4)) as f32 - mm0;
            y[l + 32] = d1 * ((q[l] >> 4) | (h1 << 4)) as f32 - mm1;
        }
    }
}

/// Q6_K: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`. Two halves of 128;
/// in each, element `l + 32 * k` (k = 0..4) takes a nibble of `ql` (low nibbles of bytes
/// 0..32, 32..64, then high nibbles) and 2 bits `2k..2k+2` of `qh[l]`; value
/// `(d * scale[16 elements]) * (q - 32)`.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + 2 * k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(1) * q2 as f32;
            y[l + 64] = s(2) * q3 as f32;
            y[l + 96] = s(3) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        for id in [4, 5, 9, 10, 11, 15, 16, 20, 29, 31, 1000] {
            assert_eq!(GgmlType::from_id(id), None);
        }
    }

    #[test]
    fn sizes_match_ggml() {
        let expect = [
            (GgmlType::F32, 1, 4),
            (GgmlType::F16, 1, 2),
            (GgmlType::BF16, 1, 2),
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
        ];
        for (ty, bs, ts) in expect {
            assert_eq!((ty.block_size(), ty.type_size()), (bs, ts), "{ty}");
        }
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4_K.row_bytes(100), None);
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    }

    #[test]
    fn length_errors() {
        let mut out = vec![0f32; 32];
        let e = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
        assert!(
            e.to_string().contains("34") && e.to_string().contains("33"),
            "{e}"
        );
        let mut out = vec![0f32; 31];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
    }
}
