//! A byte-pair-encoding model for the `tokenizers` pipeline that stores a GGUF vocabulary in a
//! few flat arrays.
//!
//! `tokenizers::models::bpe::BPE` keeps the vocabulary twice (text -> id and id -> text hash
//! maps, one heap string per entry in each) plus a hash map of merges. Measured with a counting
//! allocator, the whole GGUF tokenizer built on it held 26.5 MB of live heap in 305,000 blocks for
//! Qwen2.5's 151,936 tokens (7.0 MB in 99,000 blocks for SmolLM2's 49,152), resident for the whole
//! run. Here the token texts are one string with an end offset per token, text -> id is an
//! open-addressing table of ids and the merges one open-addressing table of (pair, rank, merged
//! id): the tokenizer then holds 9.2 MB (2.9 MB) in about a thousand blocks.
//!
//! The encoding is `BPE::merge_word`'s algorithm (no dropout, no subword prefix or suffix,
//! unknown tokens not fused), so the ids are the same; unlike `BPE` it keeps no cache of words
//! already encoded.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::{Model, Token};

/// Errors from building a [`CompactBpe`].
#[derive(Debug, thiserror::Error)]
pub enum CompactBpeError {
    #[error("duplicate token {0:?}")]
    DuplicateToken(String),
    #[error("merge ({0:?}, {1:?}): a part or the merged token is not in the vocabulary")]
    MergeOutOfVocabulary(String, String),
    #[error("unknown token {0:?} is not in the vocabulary")]
    UnkOutOfVocabulary(String),
    #[error("vocabulary too large for 32-bit ids and offsets")]
    TooLarge,
}

const EMPTY: u32 = u32::MAX;

/// One merge: the pair, its rank and the merged token. `left == EMPTY`: a free slot.
#[derive(Clone, Copy)]
struct MergeSlot {
    left: u32,
    right: u32,
    rank: u32,
    new_id: u32,
}

const FREE: MergeSlot = MergeSlot {
    left: EMPTY,
    right: EMPTY,
    rank: 0,
    new_id: 0,
};

/// A BPE model over a fixed vocabulary and merge list (see the module documentation).
pub struct CompactBpe {
    /// Every token's text, one after another.
    text: String,
    /// `ends[id]`: where token `id`'s text ends in `text`.
    ends: Vec<u32>,
    /// Open-addressing (linear probing) table of ids by the hash of their text; `EMPTY` is free.
    index: Vec<u32>,
    /// Open-addressing (linear probing) table of the merges by the hash of their pair.
    merges: Vec<MergeSlot>,
    /// With byte fallback (SentencePiece): the `<0xXX>` id of every byte, `EMPTY` where the
    /// vocabulary has none.
    byte_ids: Option<Box<[u32; 256]>>,
    unk: Option<u32>,
    /// A whole pre-tokenized piece found in the vocabulary is one token (llama.cpp's
    /// `ignore_merges`).
    ignore_merges: bool,
}

fn hash(s: &str) -> u64 {
    // FNV-1a, then a multiplicative mix so the low bits depend on every byte.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

impl CompactBpe {
    /// `tokens` in id order; `merges` with their ranks (the lowest rank merges first, the leftmost
    /// pair among equal ranks; a pair given twice keeps its later rank, as in `BPE`);
    /// `byte_fallback`: characters not in the vocabulary become their `<0xXX>` tokens.
    pub fn new(
        tokens: &[String],
        merges: &[(String, String, u32)],
        unk: Option<&str>,
        byte_fallback: bool,
        ignore_merges: bool,
    ) -> Result<CompactBpe, CompactBpeError> {
        let n = tokens.len();
        let total: usize = tokens.iter().map(String::len).sum();
        if n >= EMPTY as usize || total > u32::MAX as usize {
            return Err(CompactBpeError::TooLarge);
        }
        let mut text = String::with_capacity(total);
        let mut ends = Vec::with_capacity(n);
        for t in tokens {
            text.push_str(t);
            ends.push(text.len() as u32);
        }
        let mut bpe = CompactBpe {
            text,
            ends,
            index: vec![EMPTY; (n * 4 / 3 + 1).next_power_of_two()],
            merges: vec![FREE; (merges.len() * 4 / 3 + 1).next_power_of_two()],
            byte_ids: None,
            unk: None,
            ignore_merges,
        };
        for (id, t) in tokens.iter().enumerate() {
            let slot = bpe.slot(t);
            if bpe.index[slot] != EMPTY {
                return Err(CompactBpeError::DuplicateToken(t.clone()));
            }
            bpe.index[slot] = id as u32;
        }

        // A pair given twice keeps its later rank (`BPE` collects the list into a map).
        for &(ref a, ref b, rank) in merges {
            let ids = (bpe.id(a), bpe.id(b), bpe.id(&format!("{a}{b}")));
            let (Some(left), Some(right), Some(new_id)) = ids else {
                return Err(CompactBpeError::MergeOutOfVocabulary(a.clone(), b.clone()));
            };
            let slot = bpe.merge_slot(left, right);
            bpe.merges[slot] = MergeSlot {
                left,
                right,
                rank,
                new_id,
            };
        }

        if byte_fallback {
            let mut ids = Box::new([EMPTY; 256]);
            for (b, slot) in ids.iter_mut().enumerate() {
                *slot = bpe.id(&format!("<{b:#04X}>")).unwrap_or(EMPTY);
            }
            bpe.byte_ids = Some(ids);
        }
        bpe.unk = match unk {
            None => None,
            Some(u) => Some(
                bpe.id(u)
                    .ok_or_else(|| CompactBpeError::UnkOutOfVocabulary(u.to_string()))?,
            ),
        };
        Ok(bpe)
    }

    fn text_of(&self, id: u32) -> Option<&str> {
        let end = *self.ends.get(id as usize)? as usize;
        let start = match id {
            0 => 0,
            _ => self.ends[id as usize - 1] as usize,
        };
        self.text.get(start..end)
    }

    /// The slot holding `s`, or the free slot where it would go.
    fn slot(&self, s: &str) -> usize {
        let mask = self.index.len() - 1;
        let mut i = hash(s) as usize & mask;
        loop {
            let id = self.index[i];
            if id == EMPTY || self.text_of(id) == Some(s) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    fn id(&self, s: &str) -> Option<u32> {
        Some(self.index[self.slot(s)]).filter(|&id| id != EMPTY)
    }

    /// The slot holding the merge of `left` and `right`, or the free slot where it would go.
    fn merge_slot(&self, left: u32, right: u32) -> usize {
        let mask = self.merges.len() - 1;
        let key = ((left as u64) << 32) | right as u64;
        let mut i = ((key ^ (key >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask;
        loop {
            let m = &self.merges[i];
            if m.left == EMPTY || (m.left == left && m.right == right) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// `(rank, new id)` of merging `left` and `right`.
    fn merge(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let m = &self.merges[self.merge_slot(left, right)];
        (m.left != EMPTY).then_some((m.rank, m.new_id))
    }

    /// `BPE::merge_word`: characters to ids (byte fallback, unknown token), then the merges,
    /// lowest rank first and leftmost among equal ranks. Returns `(id, byte length)` per token.
    fn merge_word(&self, w: &str) -> Vec<(u32, usize)> {
        // (id, byte length, previous, next); a merged-away symbol has length 0.
        let mut sym: Vec<(u32, usize, isize, isize)> = Vec::with_capacity(w.len());
        let push = |sym: &mut Vec<(u32, usize, isize, isize)>, id: u32, len: usize| {
            let i = sym.len() as isize;
            if let Some(last) = sym.last_mut() {
                last.3 = i;
            }
            sym.push((id, len, i - 1, -1));
        };
        let mut unk: Option<usize> = None;
        let mut buf = [0u8; 4];
        for c in w.chars() {
            let s: &str = c.encode_utf8(&mut buf);
            let len = s.len();
            if let Some(id) = self.id(s) {
                if let (Some(u), Some(unk_len)) = (self.unk, unk.take()) {
                    push(&mut sym, u, unk_len);
                }
                push(&mut sym, id, len);
                continue;
            }
            // Byte fallback only when every byte of the character has its token.
            if let Some(bytes) = &self.byte_ids {
                if s.bytes().all(|b| bytes[b as usize] != EMPTY) {
                    for b in s.bytes() {
                        push(&mut sym, bytes[b as usize], 1);
                    }
                    continue;
                }
            }
            if let Some(u) = self.unk {
                if let Some(unk_len) = unk.replace(len) {
                    push(&mut sym, u, unk_len);
                }
            }
        }
        if let (Some(u), Some(unk_len)) = (self.unk, unk) {
            push(&mut sym, u, unk_len);
        }

        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = sym
            .windows(2)
            .enumerate()
            .filter_map(|(i, p)| {
                self.merge(p[0].0, p[1].0)
                    .map(|(rank, new_id)| Reverse((rank, i, new_id)))
            })
            .collect();
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            if sym[pos].1 == 0 || sym[pos].3 == -1 {
                continue;
            }
            let next = sym[pos].3 as usize;
            let right = sym[next];
            // A stale entry: the pair at `pos` has changed since it was queued.
            if self.merge(sym[pos].0, right.0).map(|m| m.1) != Some(new_id) {
                continue;
            }
            sym[pos].0 = new_id;
            sym[pos].1 += right.1;
            sym[pos].3 = right.3;
            sym[next].1 = 0;
            if right.3 >= 0 && (right.3 as usize) < sym.len() {
                sym[right.3 as usize].2 = pos as isize;
            }
            let cur = sym[pos];
            if cur.2 >= 0 {
                let prev = cur.2 as usize;
                if let Some((rank, id)) = self.merge(sym[prev].0, cur.0) {
                    queue.push(Reverse((rank, prev, id)));
                }
            }
            if cur.3 >= 0 && (cur.3 as usize) < sym.len() {
                if let Some((rank, id)) = self.merge(cur.0, sym[cur.3 as usize].0) {
                    queue.push(Reverse((rank, pos, id)));
                }
            }
        }
        sym.into_iter()
            .filter(|s| s.1 != 0)
            .map(|s| (s.0, s.1))
            .collect()
    }
}

impl Model for CompactBpe {
    /// Required by the trait; this model is built from a GGUF vocabulary, never trained.
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        if sequence.is_empty() {
            return Ok(Vec::new());
        }
        if self.ignore_merges {
            if let Some(id) = self.id(sequence) {
                return Ok(vec![Token::new(
                    id,
                    sequence.to_string(),
                    (0, sequence.len()),
                )]);
            }
        }
        let mut start = 0;
        Ok(self
            .merge_word(sequence)
            .into_iter()
            .map(|(id, len)| {
                let value = self.text_of(id).unwrap_or("").to_string();
                let t = Token::new(id, value, (start, start + len));
                start += len;
                t
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.text_of(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.ends.len() as u32)
            .filter_map(|id| Some((self.text_of(id)?.to_string(), id)))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.ends.len()
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        let name = match prefix {
            Some(p) => format!("{p}-model.json"),
            None => "model.json".to_string(),
        };
        let path = folder.join(name);
        std::fs::write(&path, serde_json::to_string(self)?)?;
        Ok(vec![path])
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

/// Serialized as `tokenizers`' `BPE` model (vocabulary in id order, merges in rank order), so a
/// saved `tokenizer.json` loads back as an ordinary BPE. `BPE` has no equal ranks: merges that
/// share one here are written one after another and rank apart there.
impl Serialize for CompactBpe {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Vocab<'a>(&'a CompactBpe);
        impl Serialize for Vocab<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let n = self.0.ends.len() as u32;
                let mut map = serializer.serialize_map(Some(n as usize))?;
                for id in 0..n {
                    map.serialize_entry(self.0.text_of(id).unwrap_or(""), &id)?;
                }
                map.end()
            }
        }
        struct Merges<'a>(&'a CompactBpe);
        impl Serialize for Merges<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let b = self.0;
                let mut all: Vec<&MergeSlot> =
                    b.merges.iter().filter(|m| m.left != EMPTY).collect();
                all.sort_unstable_by_key(|m| (m.rank, m.left, m.right));
                let mut seq = serializer.serialize_seq(Some(all.len()))?;
                for m in all {
                    seq.serialize_element(&(
                        b.text_of(m.left).unwrap_or(""),
                        b.text_of(m.right).unwrap_or(""),
                    ))?;
                }
                seq.end()
            }
        }
        let mut m = serializer.serialize_struct("BPE", 10)?;
        m.serialize_field("type", "BPE")?;
        m.serialize_field("dropout", &None::<f32>)?;
        m.serialize_field("unk_token", &self.unk.and_then(|u| self.text_of(u)))?;
        m.serialize_field("continuing_subword_prefix", &None::<String>)?;
        m.serialize_field("end_of_word_suffix", &None::<String>)?;
        m.serialize_field("fuse_unk", &false)?;
        m.serialize_field("byte_fallback", &self.byte_ids.is_some())?;
        m.serialize_field("ignore_merges", &self.ignore_merges)?;
        m.serialize_field("vocab", &Vocab(self))?;
        m.serialize_field("merges", &Merges(self))?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokenizers::models::bpe::{Vocab, BPE};

    /// A vocabulary grown by merges over a small alphabet, with byte tokens for `é` (both of its
    /// bytes) and for only the first byte of `€`, and an unknown token.
    fn vocab(picks: &[(usize, usize)]) -> (Vec<String>, Vec<(String, String)>) {
        let mut tokens: Vec<String> = ["<unk>", "a", "b", "c", " ", "<0xC3>", "<0xA9>", "<0xE2>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut merges = Vec::new();
        for &(i, j) in picks {
            // Merge only ordinary tokens (ids 1..=4 and merged ones).
            let ordinary: Vec<usize> = (1..tokens.len()).filter(|&k| k <= 4 || k >= 8).collect();
            let (a, b) = (
                tokens[ordinary[i % ordinary.len()]].clone(),
                tokens[ordinary[j % ordinary.len()]].clone(),
            );
            let ab = format!("{a}{b}");
            if merges.contains(&(a.clone(), b.clone())) {
                continue;
            }
            if !tokens.contains(&ab) {
                tokens.push(ab);
            }
            merges.push((a, b));
        }
        (tokens, merges)
    }

    fn reference(
        tokens: &[String],
        merges: &[(String, String)],
        unk: bool,
        byte_fallback: bool,
        ignore_merges: bool,
    ) -> BPE {
        let v: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut b = BPE::builder()
            .vocab_and_merges(v, merges.to_vec())
            .byte_fallback(byte_fallback)
            .ignore_merges(ignore_merges);
        if unk {
            b = b.unk_token("<unk>".into());
        }
        b.build().unwrap()
    }

    proptest! {
        /// Same ids and offsets as `tokenizers`' BPE, for every combination of the options.
        #[test]
        fn matches_tokenizers_bpe(
            picks in prop::collection::vec((0usize..64, 0usize..64), 0..40),
            words in prop::collection::vec("[abc é€x]{1,24}", 1..8),
            unk: bool,
            byte_fallback: bool,
            ignore_merges: bool,
        ) {
            let (tokens, merges) = vocab(&picks);
            let want = reference(&tokens, &merges, unk, byte_fallback, ignore_merges);
            let ranked: Vec<(String, String, u32)> = merges
                .iter()
                .enumerate()
                .map(|(rank, (a, b))| (a.clone(), b.clone(), rank as u32))
                .collect();
            let got = CompactBpe::new(
                &tokens,
                &ranked,
                unk.then_some("<unk>"),
                byte_fallback,
                ignore_merges,
            )
            .unwrap();
            for w in &words {
                let a: Vec<_> = want.tokenize(w).unwrap().into_iter().map(|t| (t.id, t.value, t.offsets)).collect();
                let b: Vec<_> = got.tokenize(w).unwrap().into_iter().map(|t| (t.id, t.value, t.offsets)).collect();
                prop_assert_eq!(a, b, "{:?}", w);
            }
            for (i, t) in tokens.iter().enumerate() {
                prop_assert_eq!(got.token_to_id(t), Some(i as u32));
                prop_assert_eq!(got.id_to_token(i as u32), Some(t.clone()));
            }
            prop_assert_eq!(got.token_to_id("zz"), None);
        }
    }

    #[test]
    fn rejects_a_merge_outside_the_vocabulary() {
        let tokens: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let merges = vec![("a".to_string(), "b".to_string(), 0)];
        assert!(matches!(
            CompactBpe::new(&tokens, &merges, None, false, false),
            Err(CompactBpeError::MergeOutOfVocabulary(..))
        ));
        let dup: Vec<String> = ["a", "a"].iter().map(|s| s.to_string()).collect();
        assert!(matches!(
            CompactBpe::new(&dup, &[], None, false, false),
            Err(CompactBpeError::DuplicateToken(..))
        ));
    }
}
