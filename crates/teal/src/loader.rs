//! Where tensors come from: a GGUF file or a Hugging Face safetensors directory, both memory
//! mapped. The model asks by Hugging Face name and gets row-major f32 in Hugging Face layout;
//! this module maps names, dequantizes, converts and undoes GGUF's q/k row permutation. Each
//! tensor's file pages are dropped from the process once converted, and the whole mapping when
//! the source is dropped (after loading: see [`crate::ModelFiles`]).

use crate::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use memmap2::Mmap;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One tensor as listed: Hugging Face name, shape, storage type name.
pub type TensorDesc = (String, Vec<usize>, String);

/// A source of named tensors in Hugging Face naming and layout.
pub trait TensorSource {
    /// Row-major f32 values of `name`, checked against `shape` (Hugging Face order, e.g.
    /// `[out, in]` for a projection).
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// Rows `rows` of the 2-D tensor `name` of shape `[n_rows, cols]`, row-major f32: a large
    /// matrix converted a slice at a time, so that no f32 copy of all of it exists at once.
    /// The default loads the whole tensor.
    fn load_rows(&self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
        slice_rows(name, &self.load(name, &shape)?, shape, rows)
    }
    fn contains(&self, name: &str) -> bool;
    /// Every tensor: Hugging Face name, shape, storage type name.
    fn describe(&self) -> Vec<TensorDesc>;
    fn label(&self) -> String;
}

/// Rows `rows` of a whole `[n_rows, cols]` tensor `w`.
fn slice_rows(name: &str, w: &[f32], shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
    w.get(rows.start * shape[1]..rows.end * shape[1])
        .map(<[f32]>::to_vec)
        .ok_or_else(|| bad_rows(name, &rows, shape[0]))
}

/// The error for rows `rows` asked of tensor `name`, which has `n_rows`.
pub(crate) fn bad_rows(name: &str, rows: &Range<usize>, n_rows: usize) -> Error {
    Error::Tensor {
        name: name.into(),
        msg: format!("rows {rows:?} of {n_rows}"),
    }
}

/// The layer of a Hugging Face tensor name `model.layers.N.rest` and the rest after it.
pub fn layer_of(hf: &str) -> Option<(usize, &str)> {
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

/// Maps a Hugging Face tensor name to its GGUF name (llama.cpp's convention).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let (layer, tail) = layer_of(hf)?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The inverse of [`gguf_name`].
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let h = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{h}.{kind}"))
}

/// llama.cpp's converter reorders the rows of Llama q/k projections so that rotary pairs are
/// adjacent (`(head, i, half)` -> `(head, half, i)`). This restores the Hugging Face order, in
/// which dimension `i` pairs with `i + head_dim/2`. Works for weights (`cols` = in) and biases
/// (`cols` = 1).
pub fn unpermute_rows(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for k in 0..half {
            for i in 0..2 {
                let src = h * head_dim + k * 2 + i;
                let dst = h * head_dim + i * half + k;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rows`] (what llama.cpp's converter does), for writing GGUF files.
pub fn permute_rows(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for k in 0..half {
            for i in 0..2 {
                let dst = h * head_dim + k * 2 + i;
                let src = h * head_dim + i * half + k;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub struct GgufSource {
    pub file: GgufFile,
    config: Config,
}

impl GgufSource {
    pub fn new(file: GgufFile, config: Config) -> Self {
        GgufSource { file, config }
    }

    /// GGUF stores Llama-arch q/k permuted for llama.cpp's rotary layout; Qwen2 is not.
    fn permutation(&self, hf: &str) -> Option<usize> {
        if self.config.arch == Arch::Qwen2 {
            return None;
        }
        if hf.contains("self_attn.q_proj.") {
            Some(self.config.num_attention_heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(self.config.num_key_value_heads)
        } else {
            None
        }
    }
}

impl GgufSource {
    /// The GGUF tensor of Hugging Face name `name`, checked to have the row-major `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&crate::gguf::TensorInfo> {
        let gname = gguf_name(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            source_desc: self.label(),
        })?;
        // Named as the file names it.
        let t = self
            .file
            .tensor(&gname)
            .ok_or_else(|| Error::MissingTensor {
                name: gname.clone(),
                source_desc: self.label(),
            })?;
        // GGUF lists dims fastest first: the reverse of the row-major shape.
        let got: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if got != shape {
            return Err(Error::TensorShape {
                name: gname,
                got,
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

impl TensorSource for GgufSource {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name, shape)?;
        let data = self.file.dequantize(t)?;
        self.file.release(t);
        Ok(match self.permutation(name) {
            Some(n_head) => {
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                unpermute_rows(&data, n_head, self.config.head_dim, cols)
            }
            None => data,
        })
    }
    fn load_rows(&self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
        if self.permutation(name).is_some() {
            return slice_rows(name, &self.load(name, &shape)?, shape, rows);
        }
        let t = self.tensor(name, &shape)?;
        Ok(self.file.dequantize_rows(t, rows)?)
    }
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor(&g).is_some())
    }
    fn describe(&self) -> Vec<TensorDesc> {
        self.file
            .tensors
            .iter()
            .map(|t| {
                (
                    hf_name(&t.name).unwrap_or_else(|| t.name.clone()),
                    t.dims.iter().rev().map(|&d| d as usize).collect(),
                    t.ty.name().to_string(),
                )
            })
            .collect()
    }
    fn label(&self) -> String {
        self.file.path.display().to_string()
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// A Hugging Face model directory: `model.safetensors` or a sharded index, f32/f16/bf16.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// name -> shard index
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text = crate::error::read_text(&index_path)?;
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    msg: "no 'weight_map' object".into(),
                })?;
            let mut f: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            f.sort();
            f.dedup();
            f.iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::Safetensors {
                path: dir.into(),
                msg: "neither model.safetensors nor model.safetensors.index.json".into(),
            });
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is
            // not truncated by another process while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let st =
                safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            drop(st);
            shards.push(Shard { path, mmap });
        }
        Ok(SafetensorsSource {
            dir: dir.into(),
            shards,
            index,
        })
    }

    /// The tensor `name` and the index of its shard.
    fn view(&self, name: &str) -> Result<(safetensors::tensor::TensorView<'_>, usize)> {
        let i = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            source_desc: self.label(),
        })?;
        let s = &self.shards[i];
        let st =
            safetensors::SafeTensors::deserialize(&s.mmap).map_err(|e| Error::Safetensors {
                path: s.path.clone(),
                msg: e.to_string(),
            })?;
        let v = st.tensor(name).map_err(|e| Error::Safetensors {
            path: s.path.clone(),
            msg: e.to_string(),
        })?;
        Ok((v, i))
    }
}

/// Little-endian f32, f16 or bf16 values to f32.
fn to_f32(name: &str, dtype: safetensors::Dtype, b: &[u8]) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!("unsupported safetensors dtype {other:?}"),
            })
        }
    })
}

impl SafetensorsSource {
    /// [`SafetensorsSource::view`] of a tensor that must have `shape`.
    fn checked_view(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(safetensors::tensor::TensorView<'_>, usize)> {
        let (v, shard) = self.view(name)?;
        if v.shape() != shape {
            return Err(Error::TensorShape {
                name: name.into(),
                got: v.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok((v, shard))
    }

    /// Converts `bytes` (a range of tensor `name`'s data in `shard`) and drops the file's
    /// pages of it from this process: the converted copy is all the model needs.
    fn convert(
        &self,
        name: &str,
        v: &safetensors::tensor::TensorView<'_>,
        shard: usize,
        b: &[u8],
    ) -> Result<Vec<f32>> {
        let out = to_f32(name, v.dtype(), b)?;
        let mmap = &self.shards[shard].mmap;
        let offset = b.as_ptr() as usize - mmap.as_ptr() as usize;
        crate::gguf::release_range(mmap, offset, b.len());
        Ok(out)
    }
}

impl TensorSource for SafetensorsSource {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (v, shard) = self.checked_view(name, shape)?;
        self.convert(name, &v, shard, v.data())
    }
    fn load_rows(&self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
        let (v, shard) = self.checked_view(name, &shape)?;
        let row_bytes = v.data().len() / shape[0].max(1);
        let b = v
            .data()
            .get(rows.start * row_bytes..rows.end * row_bytes)
            .ok_or_else(|| bad_rows(name, &rows, shape[0]))?;
        self.convert(name, &v, shard, b)
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn describe(&self) -> Vec<TensorDesc> {
        let mut names: Vec<&String> = self.index.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| {
                self.view(n)
                    .ok()
                    .map(|(v, _)| (n.clone(), v.shape().to_vec(), format!("{:?}", v.dtype())))
            })
            .collect()
    }
    fn label(&self) -> String {
        self.dir.display().to_string()
    }
}
