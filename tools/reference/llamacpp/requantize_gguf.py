#!/usr/bin/env python3
"""Write a copy of a GGUF file with every matrix in one GGML type (reference tool for teal's
bench against llama.cpp).

Every 2-D tensor (the projections, embeddings, LM head) is dequantized with gguf-py and
quantized again as --type (Q8_0, Q4_0, Q4_1, F16, BF16, F32) with `gguf.quants.quantize`;
1-D tensors (norms, biases) stay F32. Metadata is copied as dequantize_gguf.py does, with
general.file_type set to match.

Usage:
    python3 requantize_gguf.py IN.gguf OUT.gguf --type Q8_0
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType
from gguf.quants import quantize

from dequantize_gguf import arch_of, dequantize_tensor, raw_value

FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}


def convert(src: str, dst: str, qtype_name: str) -> None:
    qtype = GGMLQuantizationType[qtype_name]
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch_of(reader))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        val, vtype, sub = raw_value(field)
        if field.name == gguf.Keys.General.FILE_TYPE:
            val = int(FILE_TYPES[qtype_name])
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(val)
        writer.add_key_value(field.name, val, vtype, sub_type=sub)
    for t in reader.tensors:
        arr = dequantize_tensor(t)
        if arr.ndim == 2 and qtype != GGMLQuantizationType.F32:
            q = quantize(arr, qtype)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, arr.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {dst}: {len(reader.tensors)} tensors, matrices as {qtype_name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--type", required=True, choices=sorted(FILE_TYPES))
    args = ap.parse_args()
    convert(args.input, args.output, args.type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
