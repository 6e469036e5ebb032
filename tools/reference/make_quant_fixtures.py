#!/usr/bin/env python3
"""Golden fixtures for teal's block dequantization and GGUF reader.

Independent reference: PyPI `gguf==0.19.0` (numpy). Install with

    pip install gguf==0.19.0 numpy

Usage (from the repository root):

    python3 tools/reference/make_quant_fixtures.py                 # small fixtures
    python3 tools/reference/make_quant_fixtures.py --real PATH.gguf # + real-model expectations

Writes
  crates/teal-kernels/tests/fixtures/quant_golden.bin
      "TQF1", u32 n_cases, then per case (all little-endian):
      u32 ggml type id, u32 n_elements, u32 n_bytes, n_bytes raw block bytes,
      n_elements f32 expected values (gguf.quants.dequantize).
  crates/teal/tests/fixtures/gguf/py_small.gguf + py_small.json
      a small GGUF written by gguf.GGUFWriter (every metadata kind, several tensor types)
      and what gguf.GGUFReader / gguf.quants.dequantize read back from it.
  crates/teal/tests/fixtures/gguf/smollm2_q4_1.json   (with --real)
      tensor table, selected metadata and per-tensor checksums of the dequantized values.

Checksum of a dequantized tensor (exact, order dependent): with `b[i]` the f32 bit pattern
of element i as uint64, `sum_i b[i] * (2*i + 1) mod 2**64`.
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FIX = ROOT / "crates/teal-kernels/tests/fixtures"
GGUF_FIX = ROOT / "crates/teal/tests/fixtures/gguf"

SUPPORTED = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of the f16 fields (d, m / dmin) inside one block of each block type.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
# gguf 0.19.0 implements quantize() only for these (not for the k-quants).
HAS_QUANTIZE = {T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def sane_f16(rng, n):
    """Finite f16 scales: mostly normal magnitudes, with zeros, -0 and subnormals mixed in."""
    v = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
    kind = rng.integers(0, 12, n)
    v[kind == 0] = np.float16(0.0)
    v[kind == 1] = np.float16(-0.0)
    sub = (rng.integers(1, 0x3FF, n) | (rng.integers(0, 2, n) << 15)).astype(np.uint16).view(np.float16)
    v[kind == 2] = sub[kind == 2]
    return v


def checksum(x):
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    w = np.arange(b.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        return int(np.sum(b * w, dtype=np.uint64))


def f32_bits(x):
    return [int(v) for v in np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)]


def golden_cases(rng):
    cases = []  # (type, raw bytes as uint8 array, expected f32 array)
    for ty in SUPPORTED:
        bs, ts = gguf.GGML_QUANT_SIZES[ty]
        if ty == T.F32:
            vals = rng.standard_normal(64).astype(np.float32)
            vals[:4] = [0.0, -0.0, np.inf, -np.inf]
            vals[4] = np.float32(1e-40)  # subnormal
            raw = vals.view(np.uint8)
            cases.append((ty, raw, dequantize(raw, ty)))
            continue
        if ty == T.F16:
            vals = (rng.standard_normal(64) * 100).astype(np.float16)
            vals[:5] = [0.0, -0.0, np.inf, -np.inf, 65504.0]
            vals[5:8] = np.array([1, 0x3FF, 0x8001], dtype=np.uint16).view(np.float16)
            raw = vals.view(np.uint8)
            cases.append((ty, raw, dequantize(raw, ty)))
            continue
        if ty == T.BF16:
            f = (rng.standard_normal(64) * 10.0 ** rng.uniform(-30, 30, 64)).astype(np.float32)
            bits = (f.view(np.uint32) >> 16).astype(np.uint16)
            bits[:4] = [0x0000, 0x8000, 0x7F80, 0xFF80]  # 0, -0, inf, -inf
            bits[4] = 0x0001  # subnormal
            raw = bits.view(np.uint8)
            cases.append((ty, raw, dequantize(raw, ty)))
            # and through the reference quantizer (round to nearest even)
            x = rng.standard_normal(64).astype(np.float32)
            raw = quantize(x, ty).reshape(-1).view(np.uint8)
            cases.append((ty, raw, dequantize(raw, ty)))
            continue
        # Block types: random payload bytes with sane f16 scales.
        n_blocks = 3 if bs == 256 else 6
        raw = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
        for off in F16_FIELDS[ty]:
            raw[:, off:off + 2] = sane_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        # one block with all-0xFF payload, one with all-zero payload (scales kept)
        raw_ff = raw.copy()
        mask = np.ones(ts, dtype=bool)
        for off in F16_FIELDS[ty]:
            mask[off:off + 2] = False
        raw_ff[0, mask] = 0xFF
        raw_ff[1, mask] = 0x00
        raw = np.concatenate([raw, raw_ff[:2]], axis=0).reshape(-1)
        exp = dequantize(raw, ty).reshape(-1)
        cases.append((ty, raw, exp))
        if ty in HAS_QUANTIZE:
            x = (rng.standard_normal(4 * bs) * rng.uniform(0.01, 3)).astype(np.float32)
            x[:bs] = x[:bs] + 1.5  # an all-positive-ish block for the min/offset types
            q = quantize(x.reshape(4, bs), ty).reshape(-1).view(np.uint8)
            cases.append((ty, q, dequantize(q, ty).reshape(-1)))
    return cases


def write_golden(cases, path):
    out = bytearray(b"TQF1")
    out += struct.pack("<I", len(cases))
    for ty, raw, exp in cases:
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        exp = np.ascontiguousarray(exp, dtype=np.float32).reshape(-1)
        bs, ts = gguf.GGML_QUANT_SIZES[ty]
        assert raw.size == exp.size // bs * ts, (ty, raw.size, exp.size)
        out += struct.pack("<III", int(ty), exp.size, raw.size)
        out += raw.tobytes()
        out += exp.astype("<f4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    print(f"wrote {path} ({len(out)} bytes, {len(cases)} cases)")


def field_value(field):
    """Python value of a GGUFReader field, with its GGUF value type name."""
    vt = field.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
            if sub == gguf.GGUFValueType.BOOL:
                vals = [bool(v) for v in vals]
        return {"type": "ARRAY", "elem": sub.name, "len": len(vals), "values": vals}
    v = field.contents()
    if vt == gguf.GGUFValueType.BOOL:
        v = bool(v)
    elif vt in (gguf.GGUFValueType.FLOAT32,):
        return {"type": vt.name, "bits": int(np.float32(v).view(np.uint32)), "value": float(v)}
    elif vt == gguf.GGUFValueType.FLOAT64:
        return {"type": vt.name, "bits": int(np.float64(v).view(np.uint64)), "value": float(v)}
    return {"type": vt.name, "value": v}


def tensor_entry(t, with_values):
    dims = [int(d) for d in t.shape]  # GGUFReader's `shape` is in ggml order (dims[0] contiguous)
    e = {
        "name": t.name,
        "dims": dims,
        "type": t.tensor_type.name,
        "type_id": int(t.tensor_type),
        "offset": int(t.data_offset),
        "n_bytes": int(t.n_bytes),
    }
    x = dequantize(np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type) \
        if t.tensor_type not in (T.F32, T.F16) else np.asarray(t.data).astype(np.float32)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    assert x.size == int(np.prod(dims)), (t.name, x.size, dims)
    e["checksum"] = str(checksum(x))
    e["sum"] = float(np.sum(x, dtype=np.float64))
    e["first8_bits"] = f32_bits(x[:8])
    if with_values:
        e["values_bits"] = f32_bits(x)
    return e


def make_small_gguf(rng, path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_uint64("t.u64", 2**63 + 12345)
    w.add_int64("t.i64", -(2**62) - 7)
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", -1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, GGUF ✓")
    w.add_string("t.empty_str", "")
    w.add_array("t.arr_str", ["a", "", "ünï", "<0x0A>"])
    w.add_key_value("t.arr_i32", [1, -2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_key_value("t.arr_f32", [0.5, -1.25], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_key_value("t.arr_bool", [True, False, True], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    w.add_key_value("t.arr_u8", [0, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    # float tensors (numpy shape is reversed into ggml dims by the writer)
    w.add_tensor("f32.2d", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16.1d", rng.standard_normal(7).astype(np.float16))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("bf16.2d", quantize(x, T.BF16), raw_dtype=T.BF16)
    for ty in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        x = rng.standard_normal((2, 64)).astype(np.float32)
        w.add_tensor(f"{ty.name.lower()}.2d", quantize(x, ty), raw_dtype=ty)
    for ty in (T.Q4_K, T.Q5_K, T.Q6_K):
        bs, ts = gguf.GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, (2, ts), dtype=np.uint8)
        for off in F16_FIELDS[ty]:
            raw[:, off:off + 2] = sane_f16(rng, 2).view(np.uint8).reshape(2, 2)
        w.add_tensor(f"{ty.name.lower()}.2d", raw, raw_dtype=ty)  # byte shape (2, ts) -> dims [256, 2]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({path.stat().st_size} bytes)")

    r = gguf.GGUFReader(str(path))
    meta = {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [tensor_entry(t, with_values=True) for t in r.tensors]
    doc = {
        "generator": f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else '0.19.0'}",
        "version": int(r.fields["GGUF.version"].contents()),
        "file_size": path.stat().st_size,
        "metadata_keys": list(meta.keys()),
        "metadata": meta,
        "tensors": tensors,
    }
    jpath = path.with_suffix(".json")
    jpath.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {jpath}")


def dumps_lines(doc):
    """Compact JSON with one top-level key (and one tensor) per line: small and diffable."""
    c = dict(separators=(",", ":"), ensure_ascii=False)
    parts = []
    for k, v in doc.items():
        if k == "tensors":
            body = ",\n".join(json.dumps(t, **c) for t in v)
            parts.append(f"{json.dumps(k)}:[\n{body}]")
        elif k == "metadata":
            body = ",\n".join(f"{json.dumps(mk, **c)}:{json.dumps(mv, **c)}" for mk, mv in v.items())
            parts.append(f"{json.dumps(k)}:{{\n{body}}}")
        else:
            parts.append(f"{json.dumps(k)}:{json.dumps(v, **c)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def make_real(model, path):
    r = gguf.GGUFReader(str(model))
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    meta = {}
    for k in keys:
        v = field_value(r.fields[k])
        if v["type"] == "ARRAY":
            vals = v["values"]
            v = {"type": "ARRAY", "elem": v["elem"], "len": v["len"],
                 "first": vals[:5], "last": vals[-3:]}
        meta[k] = v
    tensors = [tensor_entry(t, with_values=False) for t in r.tensors]
    counts = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    doc = {
        "file": Path(model).name,
        "file_size": Path(model).stat().st_size,
        "version": int(r.fields["GGUF.version"].contents()),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "type_counts": counts,
        "metadata_keys": keys,
        "metadata": meta,
        "tensors": tensors,
    }
    path.write_text(dumps_lines(doc))
    print(f"wrote {path} ({path.stat().st_size} bytes); types {counts}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--seed", type=int, default=20240817)
    a = ap.parse_args()
    if gguf.GGML_QUANT_SIZES[T.Q4_K] != (256, 144):
        sys.exit("unexpected gguf package")
    rng = np.random.default_rng(a.seed)
    write_golden(golden_cases(rng), KERNEL_FIX / "quant_golden.bin")
    GGUF_FIX.mkdir(parents=True, exist_ok=True)
    make_small_gguf(rng, GGUF_FIX / "py_small.gguf")
    if a.real:
        make_real(a.real, GGUF_FIX / "smollm2_q4_1.json")


if __name__ == "__main__":
    main()
