#!/usr/bin/env python3
"""Writes vocabulary-only GGUF files with SentencePiece ("llama") tokenizers, so that llama.cpp
(tokenize_reference.mjs) can produce reference ids for teal's SentencePiece path.

  python3 make_spm_gguf.py tiny OUT.gguf
      the tiny vocabulary of crates/teal/tests/tokenizer_unit.rs (spm_vocab)
  python3 make_spm_gguf.py from-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf OUT.gguf
      a 49k-piece SentencePiece vocabulary derived from SmolLM2's byte-level BPE vocabulary:
      <unk>, <s>, </s>, <0x00>..<0xFF>, <|im_start|>, <|im_end|>, then every normal SmolLM2 token
      whose bytes are valid UTF-8 (first occurrence), spaces written as U+2581, score = -(SmolLM2
      id). crates/teal/tests/tokenizer_real.rs rebuilds the same vocabulary in Rust.

Needs the `gguf` Python package (pip install gguf).
"""

import sys

import gguf


def byte_decoder():
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def base():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    return tokens, types, scores


def tiny():
    tokens, types, scores = base()
    pieces = [
        ("▁", -1.0), ("h", -2.0), ("e", -2.1), ("l", -2.2), ("o", -2.3), ("w", -2.4), ("r", -2.5), ("d", -2.6),
        ("a", -2.7), ("b", -2.8), ("c", -2.9), ("é", -3.0), ("ll", -4.0), ("he", -4.5), ("llo", -5.0),
        ("hello", -6.0), ("▁hello", -6.5), ("▁w", -7.0), ("or", -7.5), ("▁wor", -8.0), ("ld", -8.5),
        ("▁world", -9.0), ("ab", -10.0), ("bc", -9.5), ("▁▁", -11.0),
    ]
    for p, s in pieces:
        tokens.append(p)
        types.append(1)
        scores.append(s)
    tokens.append("<|user|>")
    types.append(4)
    scores.append(0.0)
    return tokens, types, scores


def from_smollm2(path):
    r = gguf.GGUFReader(path)
    f_tok = r.fields["tokenizer.ggml.tokens"]
    f_typ = r.fields["tokenizer.ggml.token_type"]
    src = [f_tok.contents(i) for i in range(len(f_tok.data))]
    src_types = [f_typ.contents(i) for i in range(len(f_typ.data))]
    dec = byte_decoder()
    tokens, types, scores = base()
    for t in ["<|im_start|>", "<|im_end|>"]:
        tokens.append(t)
        types.append(3)
        scores.append(0.0)
    seen = set(tokens)
    for i, (t, ty) in enumerate(zip(src, src_types)):
        if ty != 1:
            continue
        try:
            text = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        text = text.replace(" ", "\u2581")
        if not text or text in seen:
            continue
        seen.add(text)
        tokens.append(text)
        types.append(1)
        scores.append(-float(i))
    return tokens, types, scores


def write(out, tokens, types, scores):
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{out}: {len(tokens)} tokens")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "tiny":
        write(sys.argv[2], *tiny())
    elif len(sys.argv) == 4 and sys.argv[1] == "from-smollm2":
        write(sys.argv[3], *from_smollm2(sys.argv[2]))
    else:
        sys.exit(__doc__)
