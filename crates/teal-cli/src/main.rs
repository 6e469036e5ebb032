//! `teal`: run, ppl, inspect. A thin layer over the `teal` library; flags mean the same in every
//! subcommand, as in llama.cpp's tools.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use teal::chat::{ChatTemplate, Message};
use teal::eval::perplexity::{perplexity, PplOptions};
use teal::generate::{generate, GenerateParams};
use teal::sampler::SamplerConfig;
use teal::ModelFiles;

#[derive(Parser)]
#[command(name = "teal", version, about = "Llama-family inference with TEAL activation sparsity")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Model: a .gguf file or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json). Default: SmolLM2-135M-Instruct from scripts/fetch-assets.sh's cache.
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Perplexity of a text file, protocol P512 (DESIGN §4).
    Ppl(PplArgs),
    /// Architecture, dimensions, tensor types and tokenizer of a model.
    Inspect(InspectArgs),
    /// Token ids and pieces of a text, as the model's tokenizer splits it.
    Tokenize(TokenizeArgs),
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    common: Common,
    /// The text.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Prepend BOS (default: the model's own setting).
    #[arg(long)]
    bos: Option<bool>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The prompt.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Context length (default: the model's, at most 4096).
    #[arg(short = 'c', long)]
    ctx: Option<usize>,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    /// Top-k cut (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus cut (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    common: Common,
    /// UTF-8 text file, tokenized whole as stored (no BOS).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first K windows (default: all).
    #[arg(long)]
    chunks: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    common: Common,
    /// List every tensor.
    #[arg(long)]
    tensors: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Ppl(a) => cmd_ppl(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
    }
}

impl Common {
    fn model_path(&self) -> Result<PathBuf> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        let p = teal::assets::default_model_path();
        if !p.exists() {
            bail!(
                "no model given and the default model is not in the cache ({}).\n\
                 Fetch it with: scripts/fetch-assets.sh   (or pass -m MODEL.gguf)",
                p.display()
            );
        }
        Ok(p)
    }

    fn setup_threads(&self) -> Result<()> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n = self.threads.unwrap_or(cores);
        if n == 0 {
            bail!("-t/--threads must be at least 1");
        }
        if n > cores {
            eprintln!("warning: {n} threads on {cores} cores: threads will share cores and decode slows down");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the thread pool")?;
        Ok(())
    }

    fn open(&self) -> Result<ModelFiles> {
        self.setup_threads()?;
        let path = self.model_path()?;
        ModelFiles::open(&path).with_context(|| format!("opening model {}", path.display()))
    }
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let files = a.common.open()?;
    let tok = &files.tokenizer;
    let t0 = std::time::Instant::now();
    let model = files.load_model()?;
    eprintln!("loaded {} ({}) in {:.2}s", files.config.arch.name(), files.format, t0.elapsed().as_secs_f64());

    let text = if a.chat {
        let template = match tok.chat_template() {
            Some(src) => ChatTemplate::new(src)?,
            None => ChatTemplate::chatml(),
        };
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message { role: "system".into(), content: s.clone() });
        }
        msgs.push(Message { role: "user".into(), content: a.prompt.clone() });
        let bos = tok.bos_id().and_then(|i| tok.token_str(i)).unwrap_or_default();
        let eos = tok.eos_ids().first().and_then(|&i| tok.token_str(i)).unwrap_or_default();
        template.render(&msgs, true, &bos, &eos)?
    } else {
        a.prompt.clone()
    };
    // A rendered chat template already starts with its own BOS where the model wants one.
    let add_bos = tok.add_bos_default() && !(a.chat && tok.bos_id().and_then(|i| tok.token_str(i)).is_some_and(|b| text.starts_with(&b)));
    let prompt = tok.encode(&text, add_bos)?;
    let ctx = a.ctx.unwrap_or(files.config.max_position_embeddings.min(4096));
    let params = GenerateParams {
        max_tokens: a.n_predict,
        sampler: SamplerConfig { temperature: a.temp, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        ctx,
        stop_at_eos: !a.ignore_eos,
    };
    let mut out = std::io::stdout().lock();
    if !a.chat {
        write!(out, "{}", a.prompt)?;
    }
    let g = generate(&model, tok, &prompt, &params, |piece| {
        let ok = write!(out, "{piece}").and_then(|_| out.flush()).is_ok();
        ok
    })?;
    writeln!(out)?;
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | stop: {:?}",
        g.prompt_tokens,
        g.prompt_tok_s(),
        g.decode_tokens,
        g.decode_tok_s(),
        g.stop
    );
    Ok(())
}

fn cmd_ppl(a: PplArgs) -> Result<()> {
    let files = a.common.open()?;
    let text = teal::error::read_text(&a.file)?;
    let tokens = files.tokenizer.encode(&text, false)?;
    let model = files.load_model()?;
    let opts = PplOptions { ctx: a.ctx, chunks: a.chunks };
    let n_windows = teal::eval::perplexity::windows(tokens.len(), &opts)?.len();
    let bar = ProgressBar::new(n_windows as u64);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, {elapsed} (eta {eta})")?);
    bar.set_message("perplexity");
    let r = perplexity(&model, &tokens, &opts, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    if a.json {
        let j = serde_json::json!({
            "model": a.common.model_path()?.display().to_string(),
            "file": a.file.display().to_string(),
            "ppl": r.ppl,
            "nll": r.nll,
            "tokens_scored": r.tokens_scored,
            "chunks": r.chunks,
            "ctx": r.ctx,
            "text_tokens": tokens.len(),
            "chunk_nll": r.chunk_nll,
        });
        println!("{j}");
    } else {
        println!(
            "PPL = {:.4} (mean NLL {:.5}) over {} tokens in {} windows of {}; text has {} tokens",
            r.ppl, r.nll, r.tokens_scored, r.chunks, r.ctx, tokens.len()
        );
    }
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let files = a.common.open()?;
    let c = &files.config;
    println!("model:         {}", a.common.model_path()?.display());
    println!("format:        {}", files.format);
    println!("architecture:  {}", c.arch.name());
    println!("layers:        {}", c.num_hidden_layers);
    println!("hidden:        {}", c.hidden_size);
    println!("ffn:           {}", c.intermediate_size);
    println!("heads:         {} (KV {}), head_dim {}", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    println!("vocab:         {}", c.vocab_size);
    println!("context:       {}", c.max_position_embeddings);
    println!("rope:          theta {} scaling {:?}", c.rope_theta, rope_kind(&c.rope_scaling));
    println!("rms_norm_eps:  {}", c.rms_norm_eps);
    println!("tied embed:    {}", c.tie_word_embeddings);
    println!("qkv bias:      {}", c.attention_bias);
    println!("tokenizer:     {} ({} tokens)", files.tokenizer.kind(), files.tokenizer.vocab_size());
    println!("chat template: {}", if files.tokenizer.chat_template().is_some() { "yes" } else { "no" });
    let tensors = files.source.describe();
    let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for (_, shape, ty) in &tensors {
        let e = by_type.entry(ty.clone()).or_default();
        e.0 += 1;
        e.1 += shape.iter().map(|&d| d as u64).product::<u64>();
    }
    println!("tensors:       {}", tensors.len());
    for (ty, (n, el)) in &by_type {
        println!("  {ty:>6}: {n:4} tensors, {:.2} M values", *el as f64 / 1e6);
    }
    if a.tensors {
        for (name, shape, ty) in &tensors {
            println!("  {name:50} {ty:>6} {shape:?}");
        }
    }
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let files = a.common.open()?;
    let tok = &files.tokenizer;
    let ids = tok.encode(&a.prompt, a.bos.unwrap_or(tok.add_bos_default()))?;
    for id in &ids {
        println!("{id:6} -> {:?}", tok.token_str(*id).unwrap_or_default());
    }
    Ok(())
}

fn rope_kind(r: &teal::config::RopeScaling) -> &'static str {
    match r {
        teal::config::RopeScaling::None => "none",
        teal::config::RopeScaling::Llama3(_) => "llama3",
        teal::config::RopeScaling::Factors(_) => "per-frequency factors (rope_freqs)",
    }
}
