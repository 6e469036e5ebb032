//! GGUF v2/v3 reader (over a memory map) and a small writer.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims in
//! ggml order, `u32` type, `u64` offset relative to the data section), padding to the
//! alignment (`general.alignment`, default 32), then the tensor data.
//!
//! The reader trusts nothing in the header: every count, length and offset is checked
//! against the bytes actually present before anything is allocated or sliced, so a corrupt
//! or hostile file yields a [`GgufError`] naming the file and the problem, never a panic or an
//! unbounded allocation.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use teal_kernels::quant::{self, GgmlType, QuantError};

/// `GGUF` read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays (the format allows them; real files use none).
const MAX_ARRAY_DEPTH: usize = 8;

/// Everything that can go wrong reading a GGUF file. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a GGUF file: bad magic {found:02x?} (expected \"GGUF\")")]
    BadMagic { file: String, found: Vec<u8> },
    #[error("{file}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { file: String, version: u32 },
    #[error(
        "{file}: truncated header: {what} at byte {offset} needs {need} bytes, only {left} left"
    )]
    Truncated {
        file: String,
        what: String,
        offset: u64,
        need: u64,
        left: u64,
    },
    #[error("{file}: corrupt header at byte {offset}: {msg}")]
    Corrupt {
        file: String,
        offset: u64,
        msg: String,
    },
    #[error("{file}: unsupported tensor type id {type_id} for tensor '{tensor}'")]
    UnsupportedType {
        file: String,
        tensor: String,
        type_id: u32,
    },
    #[error("{file}: tensor '{tensor}': {msg}")]
    BadTensor {
        file: String,
        tensor: String,
        msg: String,
    },
    #[error("{file}: metadata key '{key}' missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        file: String,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{file}: tensor '{tensor}': {source}")]
    Quant {
        file: String,
        tensor: String,
        #[source]
        source: QuantError,
    },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

/// GGUF value type ids (`enum gguf_type`).
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl MetaValue {
    /// Any integer type that is non-negative, as u64 (bools are not integers).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    /// F32, or F64 rounded to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type name ("UINT32", "STRING", ...), as gguf-py spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "UINT8",
            MetaValue::I8(_) => "INT8",
            MetaValue::U16(_) => "UINT16",
            MetaValue::I16(_) => "INT16",
            MetaValue::U32(_) => "UINT32",
            MetaValue::I32(_) => "INT32",
            MetaValue::U64(_) => "UINT64",
            MetaValue::I64(_) => "INT64",
            MetaValue::F32(_) => "FLOAT32",
            MetaValue::F64(_) => "FLOAT64",
            MetaValue::Bool(_) => "BOOL",
            MetaValue::String(_) => "STRING",
            MetaValue::Array(_) => "ARRAY",
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => vt::U8,
            MetaValue::I8(_) => vt::I8,
            MetaValue::U16(_) => vt::U16,
            MetaValue::I16(_) => vt::I16,
            MetaValue::U32(_) => vt::U32,
            MetaValue::I32(_) => vt::I32,
            MetaValue::U64(_) => vt::U64,
            MetaValue::I64(_) => vt::I64,
            MetaValue::F32(_) => vt::F32,
            MetaValue::F64(_) => vt::F64,
            MetaValue::Bool(_) => vt::BOOL,
            MetaValue::String(_) => vt::STRING,
            MetaValue::Array(_) => vt::ARRAY,
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().take(8).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.len() > 8 {
                    write!(f, ", ... ({} items)", a.len())?;
                }
                write!(f, "]")
            }
        }
    }
}

/// One tensor of the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Checked when the file was parsed; saturates for a hand-made TensorInfo.
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data stays in the memory map.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section (`general.alignment` or 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    storage: Storage,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &str, need: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_string(),
            what: what.to_string(),
            offset: self.pos as u64,
            need,
            left: self.left() as u64,
        }
    }

    fn corrupt(&self, offset: usize, msg: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            file: self.file.to_string(),
            offset: offset as u64,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.left() as u64 {
            return Err(self.truncated(what, n));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed string's raw bytes.
    fn str_bytes(&mut self, what: &str) -> Result<&'a [u8], GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.left() as u64 {
            self.pos = at;
            return Err(GgufError::Truncated {
                file: self.file.to_string(),
                what: format!("{what} (string of {len} bytes)"),
                offset: at as u64 + 8,
                need: len,
                left: self.left() as u64 - 8,
            });
        }
        self.take(len, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn name(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos;
        let b = self.str_bytes(what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| self.corrupt(at, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            vt::U8 => MetaValue::U8(self.u8(what)?),
            vt::I8 => MetaValue::I8(self.u8(what)? as i8),
            vt::U16 => MetaValue::U16(self.u16(what)?),
            vt::I16 => MetaValue::I16(self.u16(what)? as i16),
            vt::U32 => MetaValue::U32(self.u32(what)?),
            vt::I32 => MetaValue::I32(self.u32(what)? as i32),
            vt::U64 => MetaValue::U64(self.u64(what)?),
            vt::I64 => MetaValue::I64(self.u64(what)? as i64),
            vt::F32 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            vt::F64 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            vt::BOOL => {
                let at = self.pos;
                match self.u8(what)? {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(self.corrupt(at, format!("{what}: bool byte {b} is not 0 or 1")))
                    }
                }
            }
            // Values may hold arbitrary bytes (e.g. exotic vocabularies): decoded lossily.
            vt::STRING => {
                MetaValue::String(String::from_utf8_lossy(self.str_bytes(what)?).into_owned())
            }
            vt::ARRAY => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(
                        at,
                        format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem = self.u32(what)?;
                let min = min_encoded_size(elem).ok_or_else(|| {
                    self.corrupt(at, format!("{what}: unknown array element type {elem}"))
                })?;
                let n = self.u64(what)?;
                // Each element takes at least `min` bytes: reject lying counts before allocating.
                if n.checked_mul(min).is_none_or(|b| b > self.left() as u64) {
                    return Err(GgufError::Truncated {
                        file: self.file.to_string(),
                        what: format!("{what} (array of {n} elements of type {elem})"),
                        offset: self.pos as u64,
                        need: n.saturating_mul(min),
                        left: self.left() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            _ => return Err(self.corrupt(self.pos - 4, format!("{what}: unknown value type {ty}"))),
        })
    }
}

/// Smallest number of bytes a value of type `ty` occupies, or None for an unknown type.
fn min_encoded_size(ty: u32) -> Option<u64> {
    Some(match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufFile {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file_label = path.display().to_string();
        let io = |source| GgufError::Io {
            file: file_label.clone(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; the file must not be truncated or modified by another
        // process while it is open (the usual caveat of every mmap-based model loader).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
        Self::parse(Storage::Mmap(map), path.to_path_buf(), &file_label)
    }

    /// Parse from bytes already in memory; `label` names the source in errors (and `path`).
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<GgufFile, GgufError> {
        Self::parse(Storage::Owned(bytes), PathBuf::from(label), label)
    }

    fn parse(storage: Storage, path: PathBuf, label: &str) -> Result<GgufFile, GgufError> {
        let buf = storage.bytes();
        let file_len = buf.len() as u64;
        let mut c = Cursor {
            buf,
            pos: 0,
            file: label,
        };

        if buf.len() < 4 && GGUF_MAGIC.starts_with(buf) {
            return Err(c.truncated("magic", 4));
        }
        let magic = c.take(4.min(buf.len() as u64), "magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                file: label.to_string(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                file: label.to_string(),
                version,
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;

        // Minimal encodings: kv = key len (8) + type (4) + 1 byte; tensor = name len (8) +
        // n_dims (4) + type (4) + offset (8). Reject counts the remaining bytes cannot hold.
        let bound = |n: u64, min: u64, what: &str, c: &Cursor| -> Result<usize, GgufError> {
            if n.checked_mul(min).is_none_or(|b| b > c.left() as u64) {
                return Err(GgufError::Truncated {
                    file: label.to_string(),
                    what: format!("{n} {what}"),
                    offset: c.pos as u64,
                    need: n.saturating_mul(min),
                    left: c.left() as u64,
                });
            }
            Ok(n as usize)
        };
        let n_kv = bound(n_kv, 13, "metadata entries", &c)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let at = c.pos;
            let key = c.name(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata '{key}'"))?;
            let v = c.value(ty, &format!("metadata '{key}'"), 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.corrupt(at, format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, v));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    return Err(GgufError::Corrupt {
                        file: label.to_string(),
                        offset: 0,
                        msg: format!(
                            "general.alignment = {} is not a power of two integer",
                            metadata[i].1
                        ),
                    })
                }
            },
        };

        let n_tensors = bound(n_tensors, 24, "tensor infos", &c)?;
        // Raw infos first: offsets are relative to the data section, known only at the end.
        let mut raw = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let at = c.pos;
            let name = c.name(&format!("name of tensor #{i}"))?;
            let what = format!("info of tensor '{name}'");
            let n_dims = c.u32(&what)? as usize;
            if n_dims > MAX_DIMS {
                return Err(bad_tensor(
                    label,
                    &name,
                    format!("{n_dims} dimensions (at most {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let type_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            if tensor_index.insert(name.clone(), i).is_some() {
                return Err(c.corrupt(at, format!("duplicate tensor name '{name}'")));
            }
            raw.push((name, dims, type_id, offset));
        }
        let data_offset = align_up(c.pos as u64, alignment).expect("header position is small");

        let mut tensors = Vec::with_capacity(n_tensors);
        // Where the next tensor's data must start: as llama.cpp reads a file, each tensor's
        // data follows the previous one's, padded to the alignment, so a wrong type, dims or
        // offset cannot make two tensors share bytes or leave any unread.
        let mut expected = 0u64;
        for (name, dims, type_id, rel) in raw {
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                file: label.to_string(),
                tensor: name.clone(),
                type_id,
            })?;
            let bad = |msg: String| bad_tensor(label, &name, msg);
            let n_el = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("dims {dims:?} overflow the element count")))?;
            let row = dims.first().copied().unwrap_or(1);
            if row % ty.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "first dimension {row} (dims {dims:?}) is not a multiple of the {} block size {}",
                    ty.name(),
                    ty.block_size()
                )));
            }
            let n_bytes = (n_el / ty.block_size() as u64)
                .checked_mul(ty.type_size() as u64)
                .ok_or_else(|| bad(format!("dims {dims:?} overflow the byte count")))?;
            if rel % alignment != 0 {
                return Err(bad(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let offset = data_offset
                .checked_add(rel)
                .filter(|o| o.checked_add(n_bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    bad(format!(
                        "data out of bounds: {n_bytes} bytes at offset {} + {rel}, file is {file_len} bytes",
                        data_offset
                    ))
                })?;
            if rel != expected {
                return Err(bad(format!(
                    "data offset {rel}, expected {expected} (where the previous tensor's data \
                     ends, padded to {alignment} bytes): a tensor's type, dims or offset is wrong"
                )));
            }
            expected = rel
                .checked_add(n_bytes)
                .and_then(|end| align_up(end, alignment))
                .unwrap_or(u64::MAX);
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes: n_bytes as usize, // <= file_len, which fits in memory
            });
        }

        Ok(GgufFile {
            path,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            storage,
            meta_index,
            tensor_index,
        })
    }

    pub(crate) fn label(&self) -> String {
        self.path.display().to_string()
    }

    /// The raw bytes of the whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.label(),
            key: key.to_string(),
        })
    }

    fn wrong(&self, key: &str, v: &MetaValue, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            file: self.label(),
            key: key.to_string(),
            found: v.type_name(),
            expected,
        }
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, v, "a non-negative integer"))
    }

    /// An F32 or F64 value.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f32()
            .ok_or_else(|| self.wrong(key, v, "FLOAT32 or FLOAT64"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong(key, v, "BOOL"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, v, "STRING"))
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| self.wrong(key, v, "ARRAY"))
    }

    /// An optional non-negative integer: `None` when absent, an error naming the key when it has
    /// another type.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .is_some()
            .then(|| self.get_u64(key))
            .transpose()
    }

    /// An optional F32 or F64 value (as [`GgufFile::opt_u64`]).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.get(key)
            .is_some()
            .then(|| self.get_f32(key))
            .transpose()
    }

    /// An optional string value (as [`GgufFile::opt_u64`]).
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .is_some()
            .then(|| self.get_str(key))
            .transpose()
    }

    /// `general.architecture` ("llama", "qwen2", ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor. `t` must come from this file (bounds were checked at parse
    /// time); a foreign `TensorInfo` that does not fit panics.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = t.offset as usize;
        &self.bytes()[start..start + t.n_bytes]
    }

    /// Drops the pages of `t`'s data from this process's resident memory (a file-backed,
    /// read-only mapping: they stay in the page cache and come back if read again), so
    /// converting a file tensor by tensor does not leave the whole file resident. Nothing for an
    /// in-memory file.
    pub fn release(&self, t: &TensorInfo) {
        if let Storage::Mmap(m) = &self.storage {
            release_range(m, t.offset as usize, t.n_bytes);
        }
    }

    /// Rows `rows` of a 2-D tensor (`dims = [cols, n_rows]`, each row whole quantization
    /// blocks) dequantized to f32, row-major, and their file pages given back.
    pub fn dequantize_rows(
        &self,
        t: &TensorInfo,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, GgufError> {
        let bad = |msg: String| bad_tensor(&self.label(), &t.name, msg);
        let [cols, n_rows] = t.dims[..] else {
            return Err(bad(format!("{} dims where rows need 2", t.dims.len())));
        };
        let (cols, n_rows) = (cols as usize, n_rows as usize);
        let row_bytes =
            t.ty.row_bytes(cols)
                .filter(|&rb| rb * n_rows == t.n_bytes)
                .ok_or_else(|| bad(format!("rows of {cols} values are not whole blocks")))?;
        if rows.start > rows.end || rows.end > n_rows {
            return Err(bad(format!("rows {rows:?} of {n_rows}")));
        }
        let start = t.offset as usize + rows.start * row_bytes;
        let len = rows.len() * row_bytes;
        let data = self
            .bytes()
            .get(start..)
            .and_then(|d| d.get(..len))
            .ok_or_else(|| bad("data out of bounds".to_string()))?;
        let mut out = vec![0f32; rows.len() * cols];
        quant::dequantize(t.ty, data, &mut out).map_err(|source| GgufError::Quant {
            file: self.label(),
            tensor: t.name.clone(),
            source,
        })?;
        if let Storage::Mmap(m) = &self.storage {
            release_range(m, start, len);
        }
        Ok(out)
    }

    /// Whole tensor dequantized to f32 in ggml order (contiguous dim first).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let data = self
            .bytes()
            .get(t.offset as usize..)
            .and_then(|d| d.get(..t.n_bytes))
            .ok_or_else(|| bad_tensor(&self.label(), &t.name, "data out of bounds".to_string()))?;
        let n = usize::try_from(t.n_elements())
            .map_err(|_| bad_tensor(&self.label(), &t.name, "too many elements".into()))?;
        // Cannot be absurd: n_bytes lies inside the file and each element takes >= 4.5 bits.
        let mut out = vec![0f32; n.min(data.len().saturating_mul(2))];
        if out.len() != n {
            return Err(bad_tensor(
                &self.label(),
                &t.name,
                format!("{n} elements do not fit in {} bytes", data.len()),
            ));
        }
        quant::dequantize(t.ty, data, &mut out).map_err(|source| GgufError::Quant {
            file: self.label(),
            tensor: t.name.clone(),
            source,
        })?;
        Ok(out)
    }
}

/// `madvise(DONTNEED)` on `len` bytes of a read-only file mapping from `offset` (clamped to the
/// mapping). Advice only: a failure changes nothing but the memory used.
pub(crate) fn release_range(m: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    if offset < m.len() {
        let len = len.min(m.len() - offset);
        // SAFETY: the mapping is read-only and file-backed; DONTNEED only drops its pages from
        // this process, and a later read faults them in again with the same contents. No
        // reference into the range is invalidated.
        let _ =
            unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (m, offset, len);
}

fn bad_tensor(file: &str, tensor: &str, msg: String) -> GgufError {
    GgufError::BadTensor {
        file: file.to_string(),
        tensor: tensor.to_string(),
        msg,
    }
}

/// Writes GGUF v3 files: metadata in insertion order, then tensors in insertion order, each
/// aligned to `general.alignment` (default 32).
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) a metadata value.
    pub fn add_meta(&mut self, key: &str, v: MetaValue) {
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = v;
        } else {
            self.metadata.push((key.to_string(), v));
        }
    }

    /// Add a tensor with its raw data (`ty.row_bytes(n_elements)` bytes; F32/F16/BF16
    /// little-endian, block types in ggml's block layout). Checked when writing.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
    }

    /// Add an F32 tensor from values.
    pub fn add_f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data);
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = self.try_to_bytes()?;
        std::fs::write(path, bytes)
    }

    /// The file as bytes. Panics on invalid input (see [`GgufWriter::try_to_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.try_to_bytes()
            .unwrap_or_else(|e| panic!("GgufWriter: {e}"))
    }

    /// The file as bytes, or an `InvalidInput` error for: an array with mixed element types,
    /// a tensor whose data length does not match its dims and type, more than 4 dims,
    /// duplicate tensor names, or a bad `general.alignment`.
    pub fn try_to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let alignment = match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| invalid(format!("general.alignment = {v} is not a power of two")))?,
        };
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v).map_err(|e| invalid(format!("metadata '{k}': {e}")))?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, ty, data) in &self.tensors {
            if !names.insert(name.as_str()) {
                return Err(invalid(format!("duplicate tensor name '{name}'")));
            }
            if dims.len() > MAX_DIMS {
                return Err(invalid(format!("tensor '{name}': {} dims", dims.len())));
            }
            let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let want = n
                .and_then(|n| usize::try_from(n).ok())
                .filter(|_| {
                    dims.first()
                        .is_none_or(|&d| d % ty.block_size() as u64 == 0)
                })
                .and_then(|n| ty.row_bytes(n));
            if want != Some(data.len()) {
                return Err(invalid(format!(
                    "tensor '{name}': {ty} dims {dims:?} need {want:?} bytes, got {}",
                    data.len()
                )));
            }
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + data.len() as u64, alignment).unwrap();
        }
        pad_to(&mut out, alignment);
        let data_start = out.len() as u64;
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(data);
        }
        if !self.tensors.is_empty() {
            pad_to(&mut out, alignment);
        }
        Ok(out)
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let n = align_up(out.len() as u64, alignment).unwrap() as usize;
    out.resize(n, 0);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> Result<(), String> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => {
            // An empty array is written with element type UINT8 (any type reads back the same).
            let elem = a.first().map_or(vt::U8, MetaValue::type_id);
            if let Some(x) = a.iter().find(|x| x.type_id() != elem) {
                return Err(format!(
                    "array mixes element types {} and {}",
                    a[0].type_name(),
                    x.type_name()
                ));
            }
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x)?;
            }
        }
    }
    Ok(())
}
