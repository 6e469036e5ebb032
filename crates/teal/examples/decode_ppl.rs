//! Perplexity scored through decode steps (one token at a time, the GEMV kernels) next to the
//! same windows scored by prefill (the GEMM path), in one weight format: what decode-only
//! numerics, such as the q4 GEMV's 8-bit activations, change. Protocol P512 otherwise
//! (windows of `ctx` tokens from the start of the text, no BOS, tokens 1.. of each scored).
//!
//!   cargo run --release -p teal --example decode_ppl -- MODEL DTYPE TEXT [WINDOWS] [CTX] [THRESHOLDS SPARSITY]
//!
//! Prints both perplexities, the mean KL divergence of the decode step's next-token
//! distribution from prefill's, and how often their top tokens agree. With a thresholds file
//! and a sparsity, both run the TEAL-sparse model (greedy allocation, |x| quantiles, every
//! position sparsified).
use std::path::Path;
use teal::eval::{perplexity::nll, sparse::kl_top1};
use teal::models::llama::{DecodeScratch, Logits};
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec, Thresholds};
use teal::{Dtype, ModelFiles};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || args.len() == 7 {
        return Err(
            "usage: decode_ppl MODEL DTYPE TEXT [WINDOWS] [CTX] [THRESHOLDS SPARSITY]".into(),
        );
    }
    let dtype = Dtype::parse(&args[2]).ok_or("unknown dtype")?;
    let windows: usize = args.get(4).map_or(Ok(2), |v| v.parse())?;
    let ctx: usize = args.get(5).map_or(Ok(512), |v| v.parse())?;
    let files = ModelFiles::open(Path::new(&args[1]))?;
    let text = std::fs::read_to_string(&args[3])?;
    let ids = files.tokenizer.encode(&text, false)?;
    let mut model = files.load_model_as(dtype)?;
    let mut what = String::from("dense");
    if let [path, target] = &args[6.min(args.len())..] {
        let th = Thresholds::load(Path::new(path))?;
        let spec = SparsitySpec {
            target: target.parse()?,
            allocation: Allocation::Greedy,
            quantile: Quantile::Abs,
            mode: Mode::All,
        };
        model = model.with_masks(&th.resolve(&spec)?)?;
        what = format!("greedy sparsity {target}");
    }
    let vocab = model.config.vocab_size;
    let (mut nll_d, mut nll_p, mut kl, mut agree, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    let mut scratch = DecodeScratch::new(&model.config, ctx);
    for w in 0..windows {
        let toks = &ids[w * ctx..(w + 1) * ctx];
        let mut cache = model.new_cache(ctx);
        let all = model.prefill(toks, &mut cache, Logits::All)?;
        let mut cache = model.new_cache(ctx);
        for (i, &t) in toks[..ctx - 1].iter().enumerate() {
            let zd = model.decode(t, &mut cache, &mut scratch)?;
            let zp = &all[i * vocab..(i + 1) * vocab];
            nll_d += nll(zd, toks[i + 1]);
            nll_p += nll(zp, toks[i + 1]);
            let (k, same) = kl_top1(zp, zd);
            kl += k;
            agree += same as usize;
            n += 1;
        }
    }
    let n_f = n as f64;
    println!(
        "{} {} {what}: {windows} x {ctx} tokens, {n} scored: decode PPL {:.4}, prefill PPL {:.4} (x{:.5}), KL(prefill || decode) {:.2e}, top-1 agreement {:.4}",
        args[1],
        dtype.name(),
        (nll_d / n_f).exp(),
        (nll_p / n_f).exp(),
        ((nll_d - nll_p) / n_f).exp(),
        kl / n_f,
        agree as f64 / n_f
    );
    Ok(())
}
