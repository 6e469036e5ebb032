//! Writes a GGUF holding the first N blocks of another (tokenizer, metadata, embeddings, final
//! norm and head kept as they are, tensors copied without conversion): a real-weights model
//! small enough to carry to a machine that cannot hold the whole file.
//!
//! Usage: gguf_keep_layers IN.gguf OUT.gguf N

use teal::gguf::{GgufFile, GgufWriter, MetaValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output, n] = args.as_slice() else {
        return Err("usage: gguf_keep_layers IN.gguf OUT.gguf N".into());
    };
    let n: u64 = n.parse()?;
    let g = GgufFile::open(std::path::Path::new(input))?;
    let block_count = format!("{}.block_count", g.architecture()?);
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        match k.as_str() {
            "general.alignment" => {}
            k if k == block_count => w.add_meta(k, MetaValue::U32(n as u32)),
            k => w.add_meta(k, v.clone()),
        }
    }
    for t in &g.tensors {
        let block = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|b| b.parse::<u64>().ok());
        if block.is_none_or(|b| b < n) {
            w.add_tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
        }
    }
    w.write(std::path::Path::new(output))?;
    Ok(())
}
