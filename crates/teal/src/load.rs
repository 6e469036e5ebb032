//! Opening a model: a `.gguf` file or a Hugging Face directory (`config.json`,
//! `model.safetensors` or a sharded index, `tokenizer.json`).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::loader::{GgufSource, SafetensorsSource, TensorSource};
use crate::models::llama::Llama;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use teal_kernels::packed::Dtype;

/// A model's files, opened and checked, weights not yet loaded.
pub struct ModelFiles {
    pub config: Config,
    pub source: Box<dyn TensorSource + Send + Sync>,
    pub tokenizer: Tokenizer,
    /// "gguf" or "safetensors".
    pub format: &'static str,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<ModelFiles> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if path.is_dir() {
            let config = Config::from_hf_json(&path.join("config.json"))?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            let source = SafetensorsSource::open(path)?;
            Ok(ModelFiles {
                config,
                source: Box::new(source),
                tokenizer,
                format: "safetensors",
            })
        } else {
            let file = GgufFile::open(path)?;
            let config = Config::from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let source = GgufSource::new(file, config.clone());
            Ok(ModelFiles {
                config,
                source: Box::new(source),
                tokenizer,
                format: "gguf",
            })
        }
    }

    /// Loads every weight (dequantized to f32, repacked input-major).
    pub fn load_model(&self) -> Result<Llama> {
        Llama::load(self.config.clone(), self.source.as_ref())
    }

    /// Loads every weight, the projections and LM head repacked to `dtype`.
    pub fn load_model_as(&self, dtype: Dtype) -> Result<Llama> {
        Llama::load_as(self.config.clone(), self.source.as_ref(), dtype)
    }
}
