#!/usr/bin/env python3
"""Write an all-F32 copy of a GGUF file (reference tool for teal).

Every tensor of the input (Q4_1, Q8_0, F16, F32, ...) is dequantized with
`gguf.quants.dequantize` (gguf==0.19.0, numpy) and written as F32 with the same
name and shape. Every metadata key/value is copied with its exact GGUF type
(array element types included; strings are copied as raw bytes), in the same
order, except:

  * `GGUF.*` pseudo-fields (version, counts) - written by the writer itself;
  * `general.architecture` - written first by GGUFWriter from the reader's value;
  * `general.file_type` - set to 0 (LLAMA_FTYPE_ALL_F32), since the output is
    all F32 (pass --keep-file-type to copy the original value instead).

The result is exactly the values the quantized model multiplies by, so a
float-only engine and llama.cpp can be compared on identical weights.

Usage:
    python3 dequantize_gguf.py IN.gguf OUT.gguf [--verify]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType, GGMLQuantizationType
from gguf.quants import dequantize


def raw_value(field: gguf.ReaderField):
    """Return (value, type, sub_type) for GGUFWriter.add_key_value, preserving types exactly."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise NotImplementedError(f"nested arrays not supported: {field.name}")
        if sub == GGUFValueType.STRING:
            val = [bytes(field.parts[i].tobytes()) for i in field.data]
        else:
            val = [field.parts[i].tolist()[0] for i in field.data]
        return val, vtype, sub
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1].tobytes()), vtype, None
    return field.parts[-1].tolist()[0], vtype, None


def arch_of(reader: GGUFReader) -> str:
    f = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if f is None:
        raise ValueError("input has no general.architecture")
    return f.contents()


def dequantize_tensor(t) -> np.ndarray:
    # numpy shape is the reverse of the GGUF (ggml) dims: (ne1, ne0) for a matrix
    arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    want = tuple(int(x) for x in reversed(t.shape.tolist()))
    arr = arr.reshape(want)
    return np.ascontiguousarray(arr)


def convert(src: str, dst: str, keep_file_type: bool) -> None:
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch_of(reader))
    n_kv = 0
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        val, vtype, sub = raw_value(field)
        if field.name == gguf.Keys.General.FILE_TYPE and not keep_file_type:
            val = int(gguf.LlamaFileType.ALL_F32)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(val)
        writer.add_key_value(field.name, val, vtype, sub_type=sub)
        n_kv += 1

    for t in reader.tensors:
        arr = dequantize_tensor(t)
        writer.add_tensor(t.name, arr)  # dtype float32 -> GGML F32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {dst}: {n_kv + 1} metadata keys, {len(reader.tensors)} tensors (all F32)")


def verify(src: str, dst: str, keep_file_type: bool) -> None:
    a = GGUFReader(src)
    b = GGUFReader(dst)
    ka = [k for k in a.fields if not k.startswith("GGUF.")]
    kb = [k for k in b.fields if not k.startswith("GGUF.")]
    assert ka == kb, f"metadata keys differ:\n{ka}\n{kb}"
    for k in ka:
        fa, fb = a.fields[k], b.fields[k]
        assert fa.types == fb.types, f"{k}: types {fa.types} != {fb.types}"
        va, _, _ = raw_value(fa)
        vb, _, _ = raw_value(fb)
        if k == gguf.Keys.General.FILE_TYPE and not keep_file_type:
            assert vb == int(gguf.LlamaFileType.ALL_F32)
            continue
        assert va == vb, f"{k}: value differs"
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors], "tensor names/order differ"
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == GGMLQuantizationType.F32, f"{tb.name} not F32"
        assert ta.shape.tolist() == tb.shape.tolist(), f"{ta.name}: shape {ta.shape} != {tb.shape}"
        x = dequantize_tensor(ta)
        y = np.asarray(tb.data).reshape(x.shape)
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), f"{ta.name}: values differ"
    print(f"verified {dst}: {len(ka)} metadata keys (types and values), {len(a.tensors)} tensors bit-exact")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--verify", action="store_true", help="re-read both files and check metadata and tensors")
    ap.add_argument("--keep-file-type", action="store_true", help="copy general.file_type unchanged")
    args = ap.parse_args()
    convert(args.input, args.output, args.keep_file_type)
    if args.verify:
        verify(args.input, args.output, args.keep_file_type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
