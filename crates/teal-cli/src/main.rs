//! `teal`: run, ppl, calibrate, report, inspect, tokenize, bench, serve. A thin layer over the
//! `teal` library; flags mean the same in every subcommand, as in llama.cpp's tools.

mod report;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use teal::chat::{encode_prompt, Infill, Message, Prompt};
use teal::device::Decoder;
use teal::device::{Device, Masks};
use teal::eval::perplexity::perplexity_on;
use teal::eval::perplexity::{PplOptions, Scoring};
use teal::eval::sparse::{compare, compare_on, SparseReport};
use teal::generate::{generate_on, GenerateParams, Generation, Models, Session};
use teal::kv_cache::KvDtype;
use teal::linear::InputMask;
use teal::models::llama::Llama;
use teal::sampler::{Penalties, SamplerConfig};
use teal::sparsity::calibrate::{calibrate, calibrate_on, CalibOptions};
use teal::sparsity::fisher::{FisherLabels, FisherOptions};
use teal::sparsity::greedy::GreedyOptions;
use teal::sparsity::thresholds::check_target;
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec, Thresholds};
use teal::tokenizer::Tokenizer;
use teal::ModelFiles;

#[derive(Parser)]
#[command(
    name = "teal",
    version,
    about = "Llama-family inference with TEAL activation sparsity"
)]
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
    /// Weight format of the projections and LM head, repacked at load (q8: 8-bit, q4: 4-bit
    /// with minimum, both in groups of 32 outputs of one input row).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Where the model runs: cpu, cuda:N, or auto (cuda:0 where a driver, a GPU and NVRTC are
    /// present, else the CPU with a note). run, ppl, bench, calibrate, report, serve; the
    /// others use the CPU.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight type on a GPU: bf16 or f16.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16"])]
    gpu_dtype: String,
    /// Element type of the KV cache: f16 (default on the CPU: half the bytes a long context
    /// reads, as llama.cpp) or f32 (the GPU's, and the CPU's with this flag). run, ppl, report,
    /// bench, serve; calibration keeps f32.
    #[arg(long)]
    kv_dtype: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
    Q8,
    Q4,
}
impl From<DtypeArg> for teal::Dtype {
    fn from(d: DtypeArg) -> teal::Dtype {
        match d {
            DtypeArg::F32 => teal::Dtype::F32,
            DtypeArg::F16 => teal::Dtype::F16,
            DtypeArg::Bf16 => teal::Dtype::Bf16,
            DtypeArg::Q8 => teal::Dtype::Q8,
            DtypeArg::Q4 => teal::Dtype::Q4,
        }
    }
}

/// TEAL sparsity, the same flags in every subcommand.
#[derive(Args, Clone)]
struct SparseArgs {
    /// Model-wide activation sparsity in [0, 1) (0: dense).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    sparsity: f64,
    /// Thresholds file from `teal calibrate` (default: the cached one for this model).
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// How the target is spread over the seven projections of each block (auto: greedy when the
    /// thresholds file has greedy tables, else fisher when it has fisher tables (and
    /// --quantile is unset or fisher), else uniform; fisher: one loss-aware threshold for the
    /// whole model, from `calibrate --fisher`, whose gradients run on the CPU only; it picks
    /// the inputs itself, so --quantile teal, abs and wina do not apply to it).
    #[arg(long, value_enum, default_value_t = AllocationArg::Auto)]
    allocation: AllocationArg,
    /// Which inputs a projection zeroes for the sparsity the allocation gives it: those below
    /// TEAL's signed-histogram threshold (teal), the exact |x| quantile (abs), the weight-aware
    /// score |x_j| ||W[:, j]|| (wina), or the loss-aware score |x_j| w_j of `calibrate --fisher`
    /// (fisher). Default: fisher for the greedy allocation where the file has fisher tables
    /// (less PPL increase than abs on SmolLM2 and Qwen2.5, docs/QUALITY.md) and for the fisher
    /// allocation; for the greedy allocation otherwise the quantile its search ran with
    /// (`calibrate --greedy --quantile`); else abs.
    #[arg(long, value_enum)]
    quantile: Option<QuantileArg>,
    /// Which positions are sparsified: all, half (the last half of each window, TEAL's
    /// evaluation; ppl only, an error in run and serve), decode-only (prefill dense; in ppl and report each window's first position
    /// is the prefill, every later one a decode step). ppl and report score only the
    /// predictions of sparsified positions, against dense on the same tokens.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    mode: ModeArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum AllocationArg {
    Auto,
    Uniform,
    Greedy,
    Fisher,
}
/// Whose next tokens the loss gradients of `calibrate --fisher` are taken for.
#[derive(Clone, Copy, ValueEnum)]
enum FisherLabelsArg {
    /// Drawn from the model's own next-token distribution (the Fisher of its predictions).
    Model,
    /// The calibration text's next tokens (the empirical Fisher).
    Text,
}
#[derive(Clone, Copy, ValueEnum)]
enum QuantileArg {
    Teal,
    Abs,
    Wina,
    Fisher,
}
impl From<QuantileArg> for Quantile {
    fn from(q: QuantileArg) -> Quantile {
        match q {
            QuantileArg::Teal => Quantile::Teal,
            QuantileArg::Abs => Quantile::Abs,
            QuantileArg::Wina => Quantile::Wina,
            QuantileArg::Fisher => Quantile::Fisher,
        }
    }
}

/// `teal ppl --scoring`.
#[derive(Clone, Copy, ValueEnum)]
enum ScoringArg {
    /// Every token after each window's first, the text without BOS (the docs' figures).
    P512,
    /// As llama-perplexity: the text read as its -f reads it (one trailing newline dropped,
    /// control tokens' text not parsed) with BOS where the model adds one, BOS in place of each
    /// window's first token, the tokens after each window's first half scored; at least two
    /// windows of text.
    LlamaCpp,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    All,
    Half,
    DecodeOnly,
}

/// A sparsity request resolved against a model: the masks of each layer, the spec, the
/// thresholds file and where it was read from.
type Resolved = (
    Vec<[Option<InputMask>; 7]>,
    SparsitySpec,
    Thresholds,
    PathBuf,
);

/// The fisher allocation picks each projection's inputs by its own loss-aware scores: asking
/// it for another quantile is an error.
fn check_allocation_quantile(
    allocation: AllocationArg,
    quantile: Option<QuantileArg>,
) -> Result<()> {
    match (allocation, quantile) {
        (AllocationArg::Fisher, Some(q)) if !matches!(q, QuantileArg::Fisher) => bail!(
            "--allocation fisher --quantile {}: the fisher allocation picks each projection's \
             inputs by its own loss-aware scores (leave --quantile out, or use another \
             allocation)",
            Quantile::from(q).name()
        ),
        _ => Ok(()),
    }
}

impl SparseArgs {
    /// The request; `auto` allocation and an unset quantile are decided by what `th` holds. The
    /// fisher allocation picks the inputs by its loss-aware scores, so its quantile is `fisher`
    /// (results say so), and asking it for another is an error.
    fn spec(&self, th: Option<&Thresholds>) -> Result<SparsitySpec> {
        check_allocation_quantile(self.allocation, self.quantile)?;
        let has_greedy = th.is_some_and(|t| t.greedy.is_some());
        let has_fisher = th.is_some_and(|t| t.fisher.is_some());
        let allocation = match self.allocation {
            AllocationArg::Auto if has_greedy => Allocation::Greedy,
            AllocationArg::Auto
                if has_fisher && matches!(self.quantile, None | Some(QuantileArg::Fisher)) =>
            {
                Allocation::Fisher
            }
            AllocationArg::Auto | AllocationArg::Uniform => Allocation::Uniform,
            AllocationArg::Greedy => Allocation::Greedy,
            AllocationArg::Fisher => Allocation::Fisher,
        };
        Ok(SparsitySpec {
            target: self.sparsity,
            allocation,
            quantile: match (allocation, self.quantile) {
                (Allocation::Fisher, None) => Quantile::Fisher,
                (Allocation::Greedy, None) if has_fisher => Quantile::Fisher,
                // The quantile the greedy search ran with (`calibrate --greedy --quantile`).
                (Allocation::Greedy, None) => th
                    .and_then(|t| t.greedy.as_ref())
                    .map_or(Quantile::Abs, |g| g.quantile),
                (_, None) => Quantile::Abs,
                (_, Some(q)) => q.into(),
            },
            mode: match self.mode {
                ModeArg::All => Mode::All,
                ModeArg::Half => Mode::Half,
                ModeArg::DecodeOnly => Mode::DecodeOnly,
            },
        })
    }

    /// The per-layer thresholds for this request, checked against the model; `None` when dense.
    fn resolve(&self, files: &ModelFiles) -> Result<Option<Resolved>> {
        check_target(self.sparsity)?;
        if self.sparsity == 0.0 {
            if self.thresholds.is_some() {
                eprintln!("note: --thresholds without --sparsity: the model runs dense");
            }
            return Ok(None);
        }
        let fp = files.fingerprint()?;
        let path = match &self.thresholds {
            Some(p) => p.clone(),
            None => {
                let p = teal::assets::thresholds_path(&fp);
                if !p.exists() {
                    bail!(
                        "--sparsity needs thresholds: none given and none cached for this model ({}).\n\
                         Calibrate once with: teal calibrate -m MODEL --fisher   (as scripts/demo.sh; --greedy adds TEAL's search), or pass --thresholds FILE",
                        p.display()
                    );
                }
                p
            }
        };
        let th = Thresholds::load(&path)?;
        th.check_model(&fp)
            .with_context(|| format!("thresholds {}", path.display()))?;
        if th.other_weights(&fp) {
            eprintln!(
                "warning: thresholds {} were calibrated on other weights of this architecture \
                 (another fine-tune or quantization of it): `teal calibrate` for this model's own",
                path.display()
            );
        }
        let spec = self.spec(Some(&th))?;
        let t = th.resolve(&spec)?;
        Ok(Some((t, spec, th, path)))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Perplexity of a text file (windows of -c tokens, each from an empty cache, every token
    /// after a window's first scored: protocol P512 at -c 512); with --sparsity, against dense.
    Ppl(PplArgs),
    /// Calibrate TEAL thresholds (activation statistics; optional greedy and fisher
    /// allocations).
    Calibrate(CalibrateArgs),
    /// Quality vs sparsity for each allocation method (markdown + PNG) and activation plots.
    Report(ReportArgs),
    /// Architecture, dimensions, tensor types and tokenizer of a model.
    Inspect(InspectArgs),
    /// Token ids and pieces of a text, as the model's tokenizer splits it.
    Tokenize(TokenizeArgs),
    /// Decode and prompt speed per sparsity, bytes per token and the bandwidth floor
    /// (in the form of llama-bench).
    Bench(BenchArgs),
    /// OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context length (default: the model's, at most 4096).
    #[arg(short = 'c', long)]
    ctx: Option<usize>,
    /// Model id in answers and /v1/models (default: the model file's name).
    #[arg(long)]
    alias: Option<String>,
    /// KV caches kept between requests (slots), each with the tokens it holds: a prompt runs on
    /// the slot it continues, else an empty one, else the most similar or least recently used,
    /// so that several conversations each keep their cache. Requests on different slots run at
    /// the same time, a token each per round (on the CPU a layer at a time across them).
    /// On a GPU the slots share one copy of the weights.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Requests must carry this key (`Authorization: Bearer KEY` or `X-Api-Key`); repeat for
    /// several. `/health` and `/v1/models` (also `/v1/health`, `/models`, `/v1/models/{id}`)
    /// stay open. Also read from TEAL_API_KEY.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "TEAL_API_KEY",
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Web pages from this origin (`http://localhost:3000`; `*`: any) may call the server from
    /// a browser (CORS); repeat for several. Default: none.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Serve GET /metrics (Prometheus' text format, llama.cpp's metric names).
    #[arg(long)]
    metrics: bool,
    #[command(flatten)]
    sparse: SparseArgs,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Model-wide sparsities (from the thresholds file, spread by --allocation).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.25,0.4,0.5,0.65,0.75",
        allow_negative_numbers = true
    )]
    sparsity: Vec<f64>,
    /// Thresholds file (default: the cached one for this model).
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// How each sparsity is spread over the seven projections of each block, as in `run`
    /// (default uniform: the protocol of docs/PERFORMANCE.md; auto: what `run` would take).
    #[arg(long, value_enum, default_value_t = AllocationArg::Uniform)]
    allocation: AllocationArg,
    /// How thresholds are read from the statistics (default as in `run`: fisher for the fisher
    /// allocation, and for the greedy one where the file has fisher tables; for the greedy
    /// allocation otherwise the quantile its search ran with; else abs).
    #[arg(long, value_enum)]
    quantile: Option<QuantileArg>,
    /// Tokens decoded per repetition.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Prompt tokens.
    #[arg(short = 'p', long, default_value_t = 64)]
    n_prompt: usize,
    /// Timed repetitions (plus one untimed warm-up).
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Buffer for the CPU read-bandwidth measurement, MiB (much larger than the last-level
    /// cache); a GPU measures a device-to-device copy.
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Benchmark a seeded random-weights model of this shape instead of a model file
    /// (smollm2-135m, llama3-8b, llama3-8b-2l, qwen2-tiny), with thresholds calibrated on its
    /// own activations. Stored in --dtype on the CPU, in --gpu-dtype for a GPU.
    #[arg(long, value_name = "SHAPE", conflicts_with_all = ["model", "thresholds"])]
    random_weights: Option<String>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1, requires = "random_weights")]
    seed: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    common: Common,
    /// The text.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Prepend BOS and no EOS (default: the model's own setting for both).
    #[arg(long)]
    bos: Option<bool>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The prompt (with --interactive: the first message, optional).
    #[arg(short = 'p', long, required_unless_present_any = ["interactive", "file"])]
    prompt: Option<String>,
    /// The prompt from a file, less one trailing newline (as llama.cpp's -f).
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "prompt")]
    file: Option<PathBuf>,
    /// Chat turn by turn: each line of standard input is a user message in the model's chat
    /// template, answered in one conversation whose cached tokens each turn reuses (only the
    /// new message is run). `/clear` starts a new conversation; end of input (Ctrl-D) ends.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Tokens to generate (with --interactive: per answer); -1: until an end-of-sequence
    /// token or the context is full, as llama.cpp's.
    #[arg(short = 'n', long, default_value_t = 128, allow_negative_numbers = true, value_parser = parse_n_predict)]
    n_predict: usize,
    /// Context length (default: the model's, at most 4096).
    #[arg(short = 'c', long, allow_negative_numbers = true)]
    ctx: Option<usize>,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = SamplerConfig::LLAMA_CPP.temperature, allow_negative_numbers = true)]
    temp: f32,
    /// Top-k cut (0: off).
    #[arg(long, default_value_t = SamplerConfig::LLAMA_CPP.top_k)]
    top_k: usize,
    /// Nucleus cut (1: off).
    #[arg(long, default_value_t = SamplerConfig::LLAMA_CPP.top_p)]
    top_p: f32,
    /// Drop tokens less likely than this times the most likely one (0: off).
    #[arg(long, default_value_t = SamplerConfig::LLAMA_CPP.min_p)]
    min_p: f32,
    /// Penalty on tokens among the last --repeat-last-n: positive logits divided by it,
    /// negative ones multiplied (1: off).
    #[arg(long, default_value_t = Penalties::OFF.repeat)]
    repeat_penalty: f32,
    /// How many recent tokens (prompt and generated) the penalties look at.
    #[arg(long, default_value_t = Penalties::OFF.last_n)]
    repeat_last_n: usize,
    /// Subtracted once from the logit of every token among the recent ones (0: off).
    #[arg(long, default_value_t = Penalties::OFF.presence, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a recent token's logit per occurrence (0: off).
    #[arg(long, default_value_t = Penalties::OFF.frequency, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Adds BIAS to a token's logit before sampling, as `TOKEN_ID=BIAS` (repeatable; BIAS
    /// `-inf` bans the token; ids from `teal tokenize`).
    #[arg(long = "logit-bias", value_name = "TOKEN_ID=BIAS", value_parser = parse_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// JSON mode: the answer is one JSON object (tokens that would break it are never
    /// sampled, and it ends when the object closes).
    #[arg(long)]
    json_object: bool,
    /// A GBNF grammar the answer must follow (llama.cpp's format; see teal::grammar).
    #[arg(long, value_name = "GBNF", conflicts_with_all = ["grammar_file", "json_schema", "json_schema_file", "json_object"])]
    grammar: Option<String>,
    /// The grammar from a file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_schema", "json_schema_file", "json_object"])]
    grammar_file: Option<PathBuf>,
    /// A JSON Schema the answer must meet (converted to a grammar, as llama.cpp's -j).
    #[arg(short = 'j', long, value_name = "SCHEMA", conflicts_with_all = ["json_schema_file", "json_object"])]
    json_schema: Option<String>,
    /// The JSON Schema from a file.
    #[arg(long, value_name = "FILE", conflicts_with = "json_object")]
    json_schema_file: Option<PathBuf>,
    /// Seed of the sampler; -1: a random one (printed), as llama.cpp's.
    #[arg(long, default_value_t = SamplerConfig::LLAMA_CPP.seed, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: u64,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Fill in the middle: the prompt is the text before, this the text after, and the model
    /// writes what goes between (code models with FIM tokens, e.g. Qwen2.5-Coder).
    #[arg(long, conflicts_with_all = ["chat", "interactive"])]
    suffix: Option<String>,
    /// System message for --chat and --interactive.
    #[arg(long)]
    system: Option<String>,
    /// Never end at an end-of-sequence token: they are not sampled (as llama.cpp's), so the
    /// answer runs to -n or the context (a grammar or JSON answer still ends when complete, an
    /// infill when nothing is left to write).
    #[arg(long)]
    ignore_eos: bool,
    /// Show the control tokens the model writes (`<|im_start|>`, FIM tokens, ...), as
    /// llama.cpp's --special; by default they leave no text.
    #[arg(long)]
    special: bool,
    /// Write only the generated text, not the prompt before it (as llama.cpp's; a chat's
    /// prompt is never written).
    #[arg(long)]
    no_display_prompt: bool,
    #[command(flatten)]
    sparse: SparseArgs,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    common: Common,
    /// UTF-8 text file, tokenized whole as stored (no BOS; --scoring llama-cpp reads it as
    /// llama-perplexity does).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first K windows (default: all; more than the text has: all, with a note,
    /// as llama-perplexity caps it).
    #[arg(long)]
    chunks: Option<usize>,
    /// Which tokens are scored.
    #[arg(long, value_enum, default_value_t = ScoringArg::P512)]
    scoring: ScoringArg,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sparse: SparseArgs,
}

#[derive(Args)]
struct CalibrateArgs {
    #[command(flatten)]
    common: Common,
    /// Calibration text (default: the C4 sample from scripts/fetch-assets.sh calib).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Tokens per window (capped at the model's context).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Also run TEAL's block-wise greedy allocation.
    #[arg(long)]
    greedy: bool,
    /// Windows of dense block inputs the greedy search scores on.
    #[arg(long, default_value_t = 2)]
    greedy_samples: usize,
    /// Positions per greedy window (the last quarter is scored).
    #[arg(long, default_value_t = 256)]
    greedy_seq_len: usize,
    /// Greedy step (a projection's sparsity rises by step / its relative size).
    #[arg(long, default_value_t = 0.05)]
    greedy_step: f64,
    /// Quantile reading the greedy search uses (fisher: the loss-aware masks, with --fisher).
    #[arg(long, value_enum, default_value_t = QuantileArg::Abs)]
    quantile: QuantileArg,
    /// Skip the weight-aware (wina) tables (calibration is faster; `--quantile wina` unavailable;
    /// a file recalibrated without --force keeps those it has).
    #[arg(long)]
    no_wina: bool,
    /// Also compute loss gradients for the loss-aware allocation (`--allocation fisher`): the
    /// diagonal Fisher of every projection input, on the first calibration tokens.
    #[arg(long)]
    fisher: bool,
    /// Windows of calibration text the loss gradients are taken on.
    #[arg(long, default_value_t = 16)]
    fisher_samples: usize,
    /// Tokens per loss-gradient window (capped at the model's context).
    #[arg(long, default_value_t = 512)]
    fisher_seq_len: usize,
    /// Whose next tokens the loss gradients are taken for.
    #[arg(long, value_enum, default_value_t = FisherLabelsArg::Model)]
    fisher_labels: FisherLabelsArg,
    /// Seed of the drawn labels (`--fisher-labels model`).
    #[arg(long, default_value_t = 0)]
    fisher_seed: u64,
    /// Output file (default: the cache, where run/ppl find it).
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Recalibrate even if the output exists, with only the tables asked for (without it, a
    /// file lacking tables asked for is recalibrated keeping the kinds it had).
    #[arg(long)]
    force: bool,
    /// On a GPU: host memory for the collected activations, MiB; the calibration windows run
    /// once per group of layers whose values fit.
    #[arg(long, default_value_t = 4096)]
    collect_mib: usize,
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    common: Common,
    /// Thresholds file (default: the cached one for this model).
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// Evaluation text (UTF-8).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Target sparsities.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.25,0.4,0.5,0.65,0.75",
        allow_negative_numbers = true
    )]
    sparsities: Vec<f64>,
    /// Windows of -c tokens scored per point (at most the text's, with a note, as `ppl`).
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx: usize,
    /// Layers whose activation distributions are plotted, in order (default: first, middle,
    /// last).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Which positions are sparsified.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    mode: ModeArg,
    /// Output directory.
    #[arg(short = 'o', long, default_value = "report")]
    out: PathBuf,
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
    if let Err(e) = on_pool_worker(cli) {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", each cause once: the library's messages already
/// end with their cause where they have one (`FILE: No such file or directory`), which
/// anyhow's `{:#}` would print a second time.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.ends_with(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}

/// Runs the command on a worker of the global thread pool (built by `setup_threads`), so that the
/// kernels' parallel sections fork from inside the pool (work stealing among spinning workers)
/// instead of injecting each section from outside and blocking this thread on a futex: at 200+
/// sections per decoded token, that cold path costs milliseconds per token.
fn on_pool_worker(cli: Cli) -> Result<()> {
    cli.cmd.common().setup_threads()?;
    rayon::scope(|_| dispatch(cli))
}

impl Cmd {
    fn common(&self) -> &Common {
        match self {
            Cmd::Run(a) => &a.common,
            Cmd::Ppl(a) => &a.common,
            Cmd::Calibrate(a) => &a.common,
            Cmd::Report(a) => &a.common,
            Cmd::Inspect(a) => &a.common,
            Cmd::Tokenize(a) => &a.common,
            Cmd::Bench(a) => &a.common,
            Cmd::Serve(a) => &a.common,
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Ppl(a) => cmd_ppl(a),
        Cmd::Calibrate(a) => cmd_calibrate(a),
        Cmd::Report(a) => cmd_report(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Serve(a) => cmd_serve(a),
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
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let n = self.threads.unwrap_or(cores);
        if n == 0 {
            bail!("-t/--threads must be at least 1");
        }
        // Each thread is a pool worker with its own stack; far beyond the cores the process
        // only runs out of memory for them.
        let most = (4 * cores).max(1024);
        if n > most {
            bail!("-t {n}: at most {most} threads on this machine's {cores} cores");
        }
        if n > cores {
            eprintln!("warning: {n} threads on {cores} cores: threads will share cores and decode slows down");
        }
        if !teal::simd_available() {
            eprintln!("note: this CPU lacks AVX2/FMA/F16C: kernels run on the portable path (correct, slower)");
        }
        // One heap keeps the CPU decoder's resident memory down. A GPU process keeps glibc's
        // heap per thread: with one heap NVRTC's compile threads (a first run) queue on its
        // lock, 25 s instead of 8 s on 16 cores.
        if self.device == "cpu" {
            teal::load::single_heap();
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting the thread pool")?;
        Ok(())
    }

    /// Loads the weights in the requested format.
    fn load(&self, files: &ModelFiles) -> Result<teal::models::llama::Llama> {
        let dtype: teal::Dtype = self.dtype.into();
        let model = files
            .load_model_as(dtype)
            .with_context(|| format!("loading the weights as {}", dtype.name()))?;
        if self.device == "cpu" {
            // SAFETY: a CPU run maps and unmaps memory only on this thread here: the weights
            // are loaded, the thread pool is idle, and no library is being opened.
            unsafe { teal::load::release_code_pages() };
        }
        Ok(model)
    }

    /// The device asked for; `auto` is resolved here and notes where it falls back.
    fn device(&self) -> Result<Device> {
        let (device, note) = Device::select(&self.device, &self.gpu_dtype)
            .with_context(|| format!("--device {}", self.device))?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        Ok(device)
    }

    /// The KV cache type on `device`: `--kv-dtype`, else the device's default.
    fn kv(&self, device: Device) -> Result<KvDtype> {
        match &self.kv_dtype {
            Some(s) => KvDtype::parse(s).with_context(|| format!("--kv-dtype {s}")),
            None => Ok(device.default_kv()),
        }
    }

    /// A decoder for `models` on `device` with room for `ctx` positions and `--kv-dtype`'s
    /// cache; an error names the `--device` asked for.
    fn decoder<'a>(
        &self,
        device: Device,
        models: Models<'a>,
        ctx: usize,
    ) -> Result<Box<dyn Decoder + 'a>> {
        device
            .decoder_kv(models, ctx, self.kv(device)?)
            .with_context(|| format!("opening --device {}", self.device))
    }

    fn open(&self) -> Result<ModelFiles> {
        let path = self.model_path()?;
        ModelFiles::open(&path).with_context(|| format!("opening model {}", path.display()))
    }
}

/// A model loaded for generation (run, serve): the dense weights and, with --sparsity, the
/// masked model and its mode (they share weights), and a line describing TEAL's settings.
struct Loaded {
    dense: teal::models::llama::Llama,
    sparse: Option<(teal::models::llama::Llama, Mode)>,
    teal: Option<String>,
}

impl Loaded {
    fn new(common: &Common, sparse: &SparseArgs, files: &ModelFiles) -> Result<Loaded> {
        // The thresholds first: a missing or mismatched file is reported before loading.
        let resolved = sparse.resolve(files)?;
        if resolved
            .as_ref()
            .is_some_and(|(_, spec, ..)| spec.mode == Mode::Half)
        {
            bail!("--mode half is an evaluation mode (teal ppl); for generation use all or decode-only");
        }
        let t0 = std::time::Instant::now();
        let dense = common.load(files)?;
        eprintln!(
            "loaded {} ({}) in {:.2}s",
            files.config.arch.name(),
            files.format,
            t0.elapsed().as_secs_f64()
        );
        let (sparse, teal) = match resolved {
            Some((t, spec, th, path)) => {
                let line = format!(
                    "sparsity {} ({} allocation, {} quantile, mode {}; planned model-wide {:.3}) from {}",
                    spec.target,
                    spec.allocation.name(),
                    spec.quantile.name(),
                    spec.mode.name(),
                    th.planned_sparsity(&spec, &files.config)?,
                    path.display()
                );
                eprintln!("TEAL: {line}");
                (Some((dense.with_masks(&t)?, spec.mode)), Some(line))
            }
            None => (None, None),
        };
        Ok(Loaded {
            dense,
            sparse,
            teal,
        })
    }

    /// The prefill and decode models: the masked one for both in mode `all`, dense prefill
    /// in `decode-only`.
    fn models(&self) -> Models<'_> {
        match &self.sparse {
            None => Models::single(&self.dense),
            Some((m, Mode::DecodeOnly)) => Models {
                prefill: &self.dense,
                decode: m,
            },
            Some((m, _)) => Models::single(m),
        }
    }
}

/// `-n`: a count, or -1 for no limit.
fn parse_n_predict(s: &str) -> std::result::Result<usize, String> {
    match s.trim() {
        "-1" => Ok(usize::MAX),
        t => t
            .parse()
            .map_err(|_| format!("'{s}': a count of tokens, or -1 for no limit")),
    }
}

/// `--seed`: a number, or -1 for a random one (printed on stderr).
fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    match s.trim() {
        "-1" => {
            let seed = teal::sampler::random_seed();
            eprintln!("seed: {seed}");
            Ok(seed)
        }
        t => t
            .parse()
            .map_err(|_| format!("'{s}': a seed from 0 to 2^64-1, or -1 for a random one")),
    }
}

/// `--logit-bias TOKEN_ID=BIAS`.
fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, b) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected TOKEN_ID=BIAS"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}': not a token id"))?;
    let b = b
        .trim()
        .parse()
        .map_err(|_| format!("'{b}': not a number (-inf bans the token)"))?;
    Ok((id, b))
}

/// The grammar `--grammar`, `--grammar-file`, `--json-schema` or `--json-schema-file` asks for.
fn run_grammar(a: &RunArgs) -> Result<Option<std::sync::Arc<teal::grammar::Grammar>>> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("{what} file {}", p.display()))
    };
    let schema = match (&a.json_schema, &a.json_schema_file) {
        (Some(s), _) => Some((s.clone(), "--json-schema".to_string())),
        (None, Some(p)) => Some((read(p, "JSON schema")?, p.display().to_string())),
        (None, None) => None,
    };
    let (text, source) = match (&a.grammar, &a.grammar_file, schema) {
        (Some(g), _, _) => (g.clone(), "--grammar".to_string()),
        (None, Some(p), _) => (read(p, "grammar")?, p.display().to_string()),
        (None, None, Some((s, source))) => {
            let v: serde_json::Value =
                serde_json::from_str(&s).with_context(|| format!("{source}: not valid JSON"))?;
            let g = teal::json_schema::schema_to_gbnf(&v)
                .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            (g, source)
        }
        (None, None, None) => return Ok(None),
    };
    let g = teal::grammar::Grammar::parse(&text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    Ok(Some(std::sync::Arc::new(g)))
}

/// The context of run and serve: `-c`, else the model's, at most 4096.
fn generation_ctx(ctx: Option<usize>, files: &ModelFiles) -> usize {
    ctx.unwrap_or(files.config.max_position_embeddings.min(4096))
}

/// Checks `caches` contexts of `ctx` positions (`what` names the flag), with `per_position`
/// more host bytes a position (the logits ppl and report keep), before anything is loaded:
/// more host memory than is available is an error, a context beyond the model's a warning.
/// (A GPU's caches are on the device, where its allocator checks them.)
fn check_ctx(
    common: &Common,
    device: Device,
    config: &teal::config::Config,
    (ctx, caches, per_position): (usize, usize, u64),
    what: &str,
) -> Result<()> {
    let kv = common.kv(device)?;
    let host = if device == Device::Cpu { caches } else { 0 };
    if let Some(w) = teal::kv_cache::check_context(config, ctx, kv, (host, per_position), what)? {
        eprintln!("{w}");
    }
    Ok(())
}

/// [`check_ctx`] for the windows of `-c ctx` positions of ppl and report, each position of
/// which keeps its logits on the host: dense and, with a sparse model, sparse.
fn check_window_ctx(
    common: &Common,
    device: Device,
    config: &teal::config::Config,
    ctx: usize,
    sparse: bool,
) -> Result<()> {
    let logits = 4 * config.vocab_size as u64 * if sparse { 2 } else { 1 };
    check_ctx(
        common,
        device,
        config,
        (ctx, 1, logits),
        &format!("-c {ctx}"),
    )
}

fn cmd_run(a: RunArgs) -> Result<()> {
    check_target(a.sparse.sparsity)?;
    if a.system.is_some() && !a.chat && !a.interactive {
        bail!("--system is the system message of a chat: add --chat (or --interactive)");
    }
    let text = run_prompt(&a)?;
    let sampler = SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
        penalties: Penalties {
            last_n: a.repeat_last_n,
            repeat: a.repeat_penalty,
            presence: a.presence_penalty,
            frequency: a.frequency_penalty,
        },
        logit_bias: a.logit_bias.clone(),
        json_object: a.json_object,
        grammar: run_grammar(&a)?,
        infill: false,
    };
    sampler
        .check()
        .map_err(|e| anyhow::anyhow!("sampling: {e}"))?;
    let device = a.common.device()?;
    let files = a.common.open()?;
    let tok = &files.tokenizer;
    sampler
        .check_tokens(tok.vocab_size())
        .map_err(|e| anyhow::anyhow!("sampling: {e}"))?;
    let ctx = generation_ctx(a.ctx, &files);
    check_ctx(
        &a.common,
        device,
        &files.config,
        (ctx, 1, 0),
        &format!("-c {ctx}"),
    )?;
    let loaded = Loaded::new(&a.common, &a.sparse, &files)?;
    let models = loaded.models();

    let params = GenerateParams {
        max_tokens: a.n_predict,
        sampler,
        ctx,
        stop_at_eos: !a.ignore_eos,
        logprobs: None,
        prompt_logprobs: false,
        prefill_chunk: None,
        special: a.special,
    };
    let mut dec = a.common.decoder(device, models, ctx)?;
    eprintln!("device: {}", dec.describe());
    if a.interactive {
        return chat_loop(&a, text, &mut *dec, tok, &params);
    }
    let text = text.unwrap_or_default();
    let request = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s.as_str()));
        }
        msgs.push(Message::new("user", text.as_str()));
        Prompt::Chat(msgs)
    } else if let Some(suffix) = &a.suffix {
        Prompt::Infill(Infill::new(text.as_str(), suffix.as_str()))
    } else {
        Prompt::Text(text.clone())
    };
    let prompt = encode_prompt(tok, &request)?;
    teal::generate::check_prompt(&*dec, &prompt)?;
    let mut out = std::io::stdout().lock();
    if !a.chat && !a.no_display_prompt {
        write!(out, "{text}")?;
    }
    let g = generate_on(&mut *dec, tok, &prompt, &params, |_, piece, _| {
        let ok = write!(out, "{piece}").and_then(|_| out.flush()).is_ok();
        ok
    })?;
    // An infill prints the whole text: before, the middle, after.
    writeln!(out, "{}", a.suffix.as_deref().unwrap_or_default())?;
    eprintln!("{}", generation_stats(&g));
    Ok(())
}

/// `prompt: N tokens (C cached), P tok/s | decode: M tokens, D tok/s | stop: S`.
fn generation_stats(g: &Generation) -> String {
    let cached = if g.cached_tokens > 0 {
        format!(" ({} cached)", g.cached_tokens)
    } else {
        String::new()
    };
    format!(
        "prompt: {} tokens{cached}, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | stop: {:?}",
        g.prompt_tokens,
        g.prompt_tok_s(),
        g.decode_tokens,
        g.decode_tok_s(),
        g.stop
    )
}

/// The prompt of `teal run`: `-p`, or the text of `-f` less one trailing newline (llama.cpp's
/// `-f` drops it); `None` with neither (--interactive without a first message).
fn run_prompt(a: &RunArgs) -> Result<Option<String>> {
    let Some(p) = &a.file else {
        return Ok(a.prompt.clone());
    };
    let mut text = teal::error::read_text(p).context("prompt file")?;
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(Some(text))
}

/// `teal run --interactive`: one conversation in the chat template, a user message per line of
/// standard input (`first`, the prompt of `-p` or `-f`, before them where given); each turn
/// reuses the cached conversation so far.
fn chat_loop(
    a: &RunArgs,
    mut first: Option<String>,
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    params: &GenerateParams,
) -> Result<()> {
    use std::io::BufRead;
    let start: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let mut msgs = start.clone();
    let mut session = Session::new(dec);
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut lines = stdin.lock().lines();
    loop {
        let line = match first.take() {
            Some(p) => p,
            None => {
                if tty {
                    eprint!("> ");
                    std::io::stderr().flush()?;
                }
                match lines.next() {
                    Some(l) => l.context("reading standard input")?,
                    None => return Ok(()),
                }
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/clear" {
            msgs.clone_from(&start);
            eprintln!("(a new conversation)");
            continue;
        }
        msgs.push(Message::new("user", line));
        let prompt = encode_prompt(tok, &Prompt::Chat(msgs.clone()))?;
        let mut out = std::io::stdout().lock();
        let mut reply = String::new();
        let g = session.generate(tok, &prompt, params, |_, piece, _| {
            reply.push_str(piece);
            write!(out, "{piece}").and_then(|_| out.flush()).is_ok()
        });
        let g = match g {
            Err(e @ teal::Error::ContextOverflow { .. }) => {
                msgs.pop();
                eprintln!("{e}: /clear starts a new conversation");
                continue;
            }
            g => g?,
        };
        writeln!(out)?;
        eprintln!("{}", generation_stats(&g));
        msgs.push(Message::new("assistant", reply));
    }
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    check_target(a.sparse.sparsity)?;
    let device = a.common.device()?;
    if a.slots == 0 {
        bail!("--slots 0: at least 1");
    }
    if a.api_keys.iter().any(String::is_empty) {
        bail!(
            "--api-key: an empty key (TEAL_API_KEY set to nothing?) would let in any request \
             that sends an empty one"
        );
    }
    let files = a.common.open()?;
    let ctx = generation_ctx(a.ctx, &files);
    check_ctx(
        &a.common,
        device,
        &files.config,
        (ctx, a.slots, 0),
        &format!("-c {ctx}"),
    )?;
    let loaded = Loaded::new(&a.common, &a.sparse, &files)?;
    let mut decs = device
        .decoders(loaded.models(), a.slots, ctx, a.common.kv(device)?)
        .with_context(|| format!("opening --device {}", a.common.device))?;
    let dec = &decs[0];
    let id = a.alias.clone().unwrap_or_else(|| {
        files.path.file_name().map_or_else(
            || files.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let model = teal_server::ModelInfo {
        id,
        ctx,
        slots: a.slots,
        meta: serde_json::json!({
            "device": dec.describe(),
            "dtype": teal::Dtype::from(a.common.dtype).name(),
            "sparsity": a.sparse.sparsity,
            "teal": loaded.teal,
            "slots": a.slots,
        }),
    };
    eprintln!("device: {} ({} slot(s))", dec.describe(), a.slots);
    let addr = format!("{}:{}", a.host, a.port);
    let slots = decs
        .iter_mut()
        .map(|d| &mut **d as &mut dyn Decoder)
        .collect();
    let opts = teal_server::ServeOptions {
        api_keys: a.api_keys.clone(),
        cors_origins: a.cors_origins.clone(),
        metrics: a.metrics,
    };
    teal_server::serve(&addr, slots, &files.tokenizer, model, opts, |bound| {
        eprintln!(
            "listening on http://{bound} (POST /v1/completions, /v1/chat/completions, llama.cpp's /completion and /infill; Ctrl-C stops)"
        )
    })?;
    Ok(())
}

/// How many windows `opts` scores on `n_tokens` tokens; where `--chunks` asks for more than the
/// text has, a note on stderr says that all of them are scored (llama-perplexity's cap).
fn scored_windows(n_tokens: usize, opts: &PplOptions) -> Result<usize> {
    let n = teal::eval::perplexity::windows(n_tokens, opts)?.len();
    if let Some(k) = opts.chunks.filter(|&k| k > n) {
        eprintln!(
            "note: --chunks {k}: the text has {n} windows of {} tokens; scoring those {n}",
            opts.ctx
        );
    }
    Ok(n)
}

fn cmd_ppl(a: PplArgs) -> Result<()> {
    check_target(a.sparse.sparsity)?;
    let device = a.common.device()?;
    let files = a.common.open()?;
    let sparse = a.sparse.sparsity > 0.0;
    check_window_ctx(&a.common, device, &files.config, a.ctx, sparse)?;
    let text = teal::error::read_text(&a.file)?;
    let tok = &files.tokenizer;
    let scoring = match a.scoring {
        ScoringArg::P512 => Scoring::P512,
        ScoringArg::LlamaCpp => Scoring::llama_cpp(tok),
    };
    let tokens = scoring.encode(tok, &text)?;
    // The thresholds before the weights: a missing or mismatched file is reported at once.
    let resolved = a.sparse.resolve(&files)?;
    let model = a.common.load(&files)?;
    let kv = a.common.kv(device)?;
    let opts = PplOptions {
        ctx: a.ctx,
        chunks: a.chunks,
        kv,
        scoring,
    };
    let n_windows = scored_windows(tokens.len(), &opts)?;
    let bar = ProgressBar::new(n_windows as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} windows, {elapsed} (eta {eta})",
    )?);
    bar.set_message("perplexity");
    let model_path = a.common.model_path()?.display().to_string();
    if let Some((t, spec, th, path)) = resolved {
        let sparse = model.with_masks(&t)?;
        let progress = |d: usize, _| bar.set_position(d as u64);
        let (r, where_) = compare_models(
            &a.common, device, &model, &sparse, &t, spec.mode, &tokens, &opts, progress,
        )?;
        bar.finish_and_clear();
        let planned = th.planned_sparsity(&spec, &files.config)?;
        if a.json {
            let site: serde_json::Map<String, serde_json::Value> = r
                .site_sparsity
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            let j = serde_json::json!({
                "model": model_path,
                "file": a.file.display().to_string(),
                "device": where_,
                "thresholds": path.display().to_string(),
                "sparsity": spec.target,
                "planned_sparsity": planned,
                "ppl": r.ppl,
                "dense_ppl": r.dense_ppl,
                "ppl_ratio": r.ppl_ratio,
                "kl": r.kl,
                "top1": r.top1,
                "model_sparsity": r.model_sparsity,
                "site_sparsity": site,
                "allocation": spec.allocation.name(),
                "quantile": spec.quantile.name(),
                "mode": r.mode,
                "tokens_scored": r.tokens_scored,
                "chunks": r.chunks,
                "ctx": r.ctx,
                "scoring": scoring.name(),
            });
            println!("{j}");
        } else {
            println!(
                "{where_}: sparsity {} ({} allocation, {} quantile, mode {}): PPL {:.4} vs dense {:.4} (x{:.4}), KL {:.5}, top-1 {:.4}",
                spec.target, spec.allocation.name(), spec.quantile.name(), r.mode, r.ppl, r.dense_ppl, r.ppl_ratio, r.kl, r.top1
            );
            println!(
                "model-wide sparsity (parameter-weighted, realized): {:.4} (planned {:.4})",
                r.model_sparsity, planned
            );
            for (name, s) in &r.site_sparsity {
                println!("  {name:10} {s:.4}");
            }
            println!(
                "{} tokens scored in {} windows of {} ({} scoring)",
                r.tokens_scored,
                r.chunks,
                r.ctx,
                scoring.name()
            );
        }
        return Ok(());
    }
    let mut dec = a.common.decoder(device, Models::single(&model), opts.ctx)?;
    let r = perplexity_on(&mut *dec, &tokens, &opts, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if a.json {
        let j = serde_json::json!({
            "model": model_path,
            "file": a.file.display().to_string(),
            "device": dec.describe(),
            "ppl": r.ppl,
            "ppl_uncertainty": r.ppl * r.nll_std_err,
            "nll": r.nll,
            "nll_std_err": r.nll_std_err,
            "tokens_scored": r.tokens_scored,
            "chunks": r.chunks,
            "ctx": r.ctx,
            "scoring": scoring.name(),
            "text_tokens": tokens.len(),
            "sparsity": 0.0,
            "planned_sparsity": 0.0,
            "model_sparsity": 0.0,
            "site_sparsity": teal::sparsity::PROJ_NAMES
                .iter()
                .map(|p| (p.to_string(), serde_json::json!(0.0)))
                .collect::<serde_json::Map<_, _>>(),
            // The dense model against itself: the keys of a sparse result, with no allocation
            // or quantile (nothing is zeroed), so that a sweep from s = 0 reads alike.
            "dense_ppl": r.ppl,
            "ppl_ratio": 1.0,
            "kl": 0.0,
            "top1": 1.0,
            "allocation": null,
            "quantile": null,
            "thresholds": null,
            "mode": "dense",
            "chunk_nll": r.chunk_nll,
        });
        println!("{j}");
    } else {
        println!(
            "{}: PPL = {:.4} +/- {:.5} (mean NLL {:.5}) over {} tokens in {} windows of {} ({} scoring); text has {} tokens",
            dec.describe(),
            r.ppl,
            r.ppl * r.nll_std_err,
            r.nll,
            r.tokens_scored,
            r.chunks,
            r.ctx,
            scoring.name(),
            tokens.len()
        );
    }
    Ok(())
}

/// The dense model and `sparse` (the same weights with `masks`) on the same windows:
/// [`compare`] on the CPU, elsewhere [`compare_on`] through one decoder opened on `sparse` (so
/// that its fused launches take these masks; mode `all` only). Also returns where it ran.
#[allow(clippy::too_many_arguments)]
fn compare_models(
    common: &Common,
    device: Device,
    model: &Llama,
    sparse: &Llama,
    masks: &Masks,
    mode: Mode,
    tokens: &[u32],
    opts: &PplOptions,
    progress: impl FnMut(usize, usize),
) -> Result<(SparseReport, String)> {
    if device == Device::Cpu {
        let r = compare(&model.config, model, sparse, mode, tokens, opts, progress)?;
        return Ok((r, teal::device::describe_cpu(opts.kv)));
    }
    // Per window the dense and the sparse logits, then the sparse pass once more, one
    // position at a time, to count the zeroed inputs.
    if mode != Mode::All {
        bail!(
            "--device {} supports --mode all only (got {}); use --device cpu",
            common.device,
            mode.name()
        );
    }
    let mut dec = common.decoder(device, Models::single(sparse), opts.ctx)?;
    let r = compare_on(&mut *dec, sparse, masks, tokens, opts, progress)?;
    Ok((r, dec.describe()))
}

fn cmd_calibrate(a: CalibrateArgs) -> Result<()> {
    let Some(collect_bytes) = a.collect_mib.checked_mul(1 << 20) else {
        bail!(
            "--collect-mib {}: more bytes than memory holds",
            a.collect_mib
        );
    };
    let device = a.common.device()?;
    let files = a.common.open()?;
    let fp = files.fingerprint()?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| teal::assets::thresholds_path(&fp));
    // Without --force, a file that lacks tables asked for is calibrated again with them and
    // with the kinds it had, those with the file's settings (asking for greedy tables keeps
    // its fisher ones, and the reverse; the weight-aware tables count as a kind too).
    let mut weight_aware = !a.no_wina;
    let seq_len = a.seq_len.min(files.config.max_position_embeddings);
    let mut greedy = a.greedy.then(|| {
        (
            GreedyOptions {
                samples: a.greedy_samples,
                seq_len: a.greedy_seq_len.min(seq_len),
                step: a.greedy_step,
                max_sparsity: 0.9,
            },
            Quantile::from(a.quantile),
        )
    });
    let mut fisher = a.fisher.then(|| FisherOptions {
        samples: a.fisher_samples,
        seq_len: a.fisher_seq_len.min(files.config.max_position_embeddings),
        labels: match a.fisher_labels {
            FisherLabelsArg::Model => FisherLabels::Model {
                seed: a.fisher_seed,
            },
            FisherLabelsArg::Text => FisherLabels::Text,
        },
    });
    let data = match &a.data {
        Some(d) => d.clone(),
        None => teal::assets::cached("data", "c4.utf8").ok_or_else(|| {
            anyhow::anyhow!("no --data given and the C4 calibration sample is not cached: run scripts/fetch-assets.sh calib")
        })?,
    };
    let text = teal::error::read_text(&data)?;
    let tokens = files.tokenizer.encode(&text, false)?;
    // The allocations' options come after the check below (which may take the file's).
    let opts = CalibOptions {
        weight_aware,
        samples: a.samples,
        seq_len,
        greedy: None,
        fisher: None,
        text_label: data
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        text_bytes: text.len(),
    };
    if out.exists() && !a.force {
        let redo = || format!("{} exists (--force recalibrates over it)", out.display());
        let th = Thresholds::load(&out).with_context(redo)?;
        th.check_model(&fp).with_context(redo)?;
        let want = teal::sparsity::calibrate::provenance(&opts, &tokens, String::new());
        let differ = th.calibration.differences(&want);
        if !differ.is_empty() {
            bail!(
                "{} was calibrated on other text or windows: {}; --force recalibrates over it, \
                 or -o names another file",
                out.display(),
                differ.join(", ")
            );
        }
        if th.other_weights(&fp) {
            bail!(
                "{} was calibrated on other weights of this architecture (another fine-tune or \
                 quantization of it); --force recalibrates over it",
                out.display()
            );
        }
        if (!a.greedy || th.greedy.is_some())
            && (!a.fisher || th.fisher.is_some())
            && (!weight_aware || th.wina.is_some())
        {
            eprintln!(
                "thresholds already calibrated: {} (use --force to redo)",
                out.display()
            );
            println!("{}", out.display());
            return Ok(());
        }
        if let (None, Some(g)) = (&greedy, &th.greedy) {
            eprintln!(
                "keeping the file's greedy tables: searched again ({} x {} tokens, step {}, {} quantile)",
                g.samples,
                g.seq_len,
                g.step,
                g.quantile.name()
            );
            let opts = GreedyOptions {
                samples: g.samples,
                seq_len: g.seq_len,
                step: g.step,
                max_sparsity: 0.9,
            };
            greedy = Some((opts, g.quantile));
        }
        if let (None, Some(f)) = (&fisher, &th.fisher) {
            eprintln!(
                "keeping the file's fisher tables: loss gradients again ({} x {} tokens)",
                f.samples, f.seq_len
            );
            fisher = Some(FisherOptions {
                samples: f.samples,
                seq_len: f.seq_len,
                labels: f.labels,
            });
        }
        if !weight_aware && th.wina.is_some() {
            eprintln!("keeping the file's weight-aware (wina) tables");
            weight_aware = true;
        }
    }
    // Where the file goes, checked before minutes of calibration.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Thresholds::check_writable(&out)?;
    let model = a.common.load(&files)?;
    let (greedy_wanted, fisher_wanted) = (greedy.is_some(), fisher.is_some());
    let opts = CalibOptions {
        weight_aware,
        greedy,
        fisher,
        ..opts
    };
    let bar = ProgressBar::new(files.config.num_hidden_layers as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg:24} [{bar:30}] {pos}/{len}, {elapsed} (eta {eta})",
    )?);
    let t0 = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut progress = |stage: &str, done: usize, total: usize| {
        // The loss gradients count windows, the statistics and the search layers.
        let unit = if stage == "fisher" {
            "windows"
        } else {
            "layers"
        };
        bar.set_message(format!("{stage} ({unit})"));
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if !tty {
            eprintln!(
                "{stage}: {done}/{total} {unit}, {:.0}s",
                t0.elapsed().as_secs_f64()
            );
        }
    };
    let th = match device {
        Device::Cpu => calibrate(&model, fp, &tokens, &opts, &mut progress)?,
        gpu => {
            let mut dec = gpu
                .decoder(Models::single(&model), seq_len)
                .with_context(|| format!("opening --device {}", gpu.name()))?;
            eprintln!("device: {}", dec.describe());
            calibrate_on(
                &mut *dec,
                &model,
                fp,
                &tokens,
                &opts,
                collect_bytes,
                &mut progress,
            )?
        }
    };
    bar.finish_and_clear();
    th.save(&out)?;
    eprintln!(
        "calibrated on {} x {} tokens of {}{} in {:.1}s",
        opts.samples,
        opts.seq_len,
        opts.text_label,
        match (greedy_wanted, fisher_wanted) {
            (true, true) => " with greedy and fisher allocations",
            (true, false) => " with greedy allocation",
            (false, true) => " with fisher allocation",
            (false, false) => "",
        },
        t0.elapsed().as_secs_f64()
    );
    println!("{}", out.display());
    Ok(())
}

fn cmd_report(a: ReportArgs) -> Result<()> {
    let device = a.common.device()?;
    let files = a.common.open()?;
    let sparse_args = SparseArgs {
        sparsity: a.sparsities.iter().cloned().fold(0.0, f64::max),
        thresholds: a.thresholds.clone(),
        allocation: AllocationArg::Uniform,
        quantile: Some(QuantileArg::Teal),
        mode: a.mode,
    };
    for &s in &a.sparsities {
        check_target(s)?;
    }
    // In order, each once: the plot joins its points in this order.
    let mut sparsities = a.sparsities.clone();
    sparsities.sort_by(f64::total_cmp);
    sparsities.dedup();
    let Some((_, spec0, th, path)) = sparse_args.resolve(&files)? else {
        bail!("--sparsities must include a value above 0");
    };
    let n_layers = files.config.num_hidden_layers;
    let mut layers = if a.layers.is_empty() {
        vec![0, n_layers / 2, n_layers - 1]
    } else {
        a.layers.clone()
    };
    // Each layer plotted once (the default repeats layers of a model of one or two).
    layers.sort_unstable();
    layers.dedup();
    if let Some(&l) = layers.iter().find(|&&l| l >= n_layers) {
        bail!("--layers: layer {l} does not exist (the model has {n_layers})");
    }
    check_window_ctx(&a.common, device, &files.config, a.ctx, true)?;
    let text = teal::error::read_text(&a.file)?;
    let tokens = Scoring::P512.encode(&files.tokenizer, &text)?;
    // The output directory once the arguments are checked, before any work: an unwritable one
    // is found at once.
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let probe = a.out.join(".teal-report-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| format!("-o {}: cannot write there", a.out.display()))?;
    let model = a.common.load(&files)?;
    let opts = PplOptions {
        ctx: a.ctx,
        chunks: Some(a.chunks),
        kv: a.common.kv(device)?,
        scoring: Default::default(),
    };
    let n_windows = scored_windows(tokens.len(), &opts)?;
    let mut methods = vec![
        (Allocation::Uniform, Quantile::Teal),
        (Allocation::Uniform, Quantile::Abs),
    ];
    if th.wina.is_some() {
        methods.push((Allocation::Uniform, Quantile::Wina));
    }
    if let Some(g) = &th.greedy {
        methods.push((Allocation::Greedy, g.quantile));
    }
    if th.fisher.is_some() {
        methods.push((Allocation::Fisher, Quantile::Abs));
        if th
            .greedy
            .as_ref()
            .is_some_and(|g| g.quantile != Quantile::Fisher)
        {
            methods.push((Allocation::Greedy, Quantile::Fisher));
        }
    }
    report::register_font()?;
    let bar = ProgressBar::new((methods.len() * sparsities.len()) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg:28} [{bar:30}] {pos}/{len} points, {elapsed} (eta {eta})",
    )?);
    let mode = spec0.mode;
    let mut rows = Vec::new();
    let mut dense_ppl = f64::NAN;
    let mut ran_on = String::new();
    for &(allocation, quantile) in &methods {
        let name = match allocation {
            Allocation::Fisher => "fisher (loss-aware, one global threshold)".to_string(),
            _ => format!("{} / {} quantile", allocation.name(), quantile.name()),
        };
        for &target in sparsities.iter().filter(|&&s| s > 0.0) {
            bar.set_message(format!("{name} @ {target}"));
            let spec = SparsitySpec {
                target,
                allocation,
                quantile,
                mode,
            };
            let t = th.resolve(&spec)?;
            let sparse = model.with_masks(&t)?;
            let (r, on) = compare_models(
                &a.common,
                device,
                &model,
                &sparse,
                &t,
                mode,
                &tokens,
                &opts,
                |_, _| {},
            )?;
            dense_ppl = r.dense_ppl;
            ran_on = on;
            rows.push(report::Row {
                method: name.clone(),
                target,
                report: r,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let md = report::markdown(&rows, dense_ppl);
    let ppl_png = a.out.join("ppl_vs_sparsity.png");
    report::plot_ppl(&rows, dense_ppl, &ppl_png)?;

    // Activation distributions on the first window.
    struct Grab {
        layers: Vec<usize>,
        values: std::collections::BTreeMap<(usize, usize), Vec<f32>>,
    }
    impl teal::models::llama::Observer for Grab {
        fn observe(
            &mut self,
            layer: usize,
            site: teal::models::llama::Site,
            rows: &[f32],
            _: usize,
        ) {
            if self.layers.contains(&layer) {
                let si = teal::models::llama::Site::ALL
                    .iter()
                    .position(|&s| s == site)
                    .unwrap_or(0);
                self.values
                    .entry((layer, si))
                    .or_default()
                    .extend_from_slice(rows);
            }
        }
    }
    let mut grab = Grab {
        layers: layers.clone(),
        values: Default::default(),
    };
    let first = &tokens[..a.ctx.min(tokens.len())];
    a.common
        .decoder(device, Models::single(&model), first.len())?
        .prefill_observed(first, &mut grab)?;
    let site_names = ["q/k/v input", "o input", "gate/up input", "down input"];
    let mut pngs = vec![ppl_png];
    for &l in &layers {
        let sites: Vec<(&str, Vec<f32>)> = (0..4)
            .map(|si| {
                (
                    site_names[si],
                    grab.values.remove(&(l, si)).unwrap_or_default(),
                )
            })
            .collect();
        let p = a.out.join(format!("activations_layer{l}.png"));
        report::plot_activations(l, &sites, &p)?;
        pngs.push(p);
    }
    let header = format!(
        "# TEAL report\n\nModel `{}`, thresholds `{}` (calibrated on {} x {} tokens of {}), text `{}`, \
         {} windows of {} tokens, sparsify mode `{}`, on {}. The activation histograms are the \
         dense model's inputs of each site over the text's first window ({} tokens).\n\n",
        a.common.model_path()?.display(),
        path.display(),
        th.calibration.samples,
        th.calibration.seq_len,
        th.calibration.text,
        a.file.display(),
        n_windows,
        a.ctx,
        mode.name(),
        ran_on,
        first.len()
    );
    let figures: String = pngs
        .iter()
        .map(|p| {
            format!(
                "![{0}]({0})\n",
                p.file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default()
            )
        })
        .collect();
    let doc = format!("{header}{md}\n{figures}");
    std::fs::write(a.out.join("report.md"), &doc)
        .with_context(|| format!("writing {}", a.out.join("report.md").display()))?;
    print!("{doc}");
    eprintln!("wrote {}", a.out.display());
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
    println!(
        "heads:         {} (KV {}), head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocab:         {}", c.vocab_size);
    println!("context:       {}", c.max_position_embeddings);
    println!(
        "rope:          theta {} scaling {}",
        c.rope_theta,
        rope_kind(&c.rope_scaling)
    );
    println!("rms_norm_eps:  {}", c.rms_norm_eps);
    println!("tied embed:    {}", c.tie_word_embeddings);
    println!("qkv bias:      {}", c.attention_bias);
    println!(
        "tokenizer:     {} ({} tokens)",
        files.tokenizer.kind(),
        files.tokenizer.vocab_size()
    );
    println!(
        "chat template: {}",
        if files.tokenizer.chat_template().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    let tensors = &files.tensors;
    let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for (_, shape, ty) in tensors {
        let e = by_type.entry(ty.clone()).or_default();
        e.0 += 1;
        e.1 += shape.iter().map(|&d| d as u64).product::<u64>();
    }
    println!("tensors:       {}", tensors.len());
    for (ty, (n, el)) in &by_type {
        println!("  {ty:>6}: {n:4} tensors, {:.2} M values", *el as f64 / 1e6);
    }
    if a.tensors {
        // In the model's order: the embedding, the layers by number, then the rest.
        let key = |name: &str| match teal::loader::layer_of(name) {
            Some((l, tail)) => (1, l, tail.to_string()),
            None => (
                if name.starts_with("model.embed_tokens") {
                    0
                } else {
                    2
                },
                0,
                name.to_string(),
            ),
        };
        let mut sorted: Vec<_> = tensors.iter().collect();
        sorted.sort_by_cached_key(|(name, ..)| key(name));
        for (name, shape, ty) in sorted {
            println!("  {name:50} {ty:>6} {shape:?}");
        }
    }
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let files = a.common.open()?;
    let tok = &files.tokenizer;
    // The model's own special tokens (BOS, and EOS where it adds one) as llama-tokenize adds
    // them, unless --bos says otherwise.
    let ids = match a.bos {
        None => tok.encode_special(&a.prompt)?,
        Some(bos) => tok.encode(&a.prompt, bos)?,
    };
    for id in &ids {
        println!("{id:6} -> {:?}", tok.token_str(*id).unwrap_or_default());
    }
    Ok(())
}

fn rope_kind(r: &teal::config::RopeScaling) -> String {
    match r {
        teal::config::RopeScaling::None => "none".into(),
        teal::config::RopeScaling::Llama3(_) => "llama3".into(),
        teal::config::RopeScaling::Factors(_) => "per-frequency factors (rope_freqs)".into(),
        teal::config::RopeScaling::Linear(f) => format!("linear (factor {f})"),
    }
}

/// The bench prompt: ordinary English prose, repeated to the requested length.
const BENCH_TEXT: &str = "The history of the city begins with a small settlement on the river, \
where traders met to exchange grain, salt and cloth. Over the following centuries the town grew \
into a regional centre, with a market square, a cathedral and a university whose library still \
holds many of the manuscripts copied by its first students. ";

fn cmd_bench(a: BenchArgs) -> Result<()> {
    for &s in &a.sparsity {
        check_target(s)?;
    }
    if a.n_gen == 0 || a.reps == 0 || a.n_prompt == 0 {
        bail!(
            "-n {} -r {} -p {}: bench needs at least one prompt token, one decoded token and one \
             repetition",
            a.n_gen,
            a.reps,
            a.n_prompt
        );
    }
    if a.bandwidth_mib == 0 {
        bail!("--bandwidth-mib 0: the bandwidth probe needs a buffer (default 1024)");
    }
    check_allocation_quantile(a.allocation, a.quantile)?;
    let device = a.common.device()?;
    // On the CPU the probe's buffer must fit in memory (a GPU's allocation fails cleanly).
    let avail = match device {
        Device::Cpu => teal::bench::available_memory(),
        _ => None,
    };
    let Some(probe_bytes) = a
        .bandwidth_mib
        .checked_mul(1 << 20)
        .filter(|&b| avail.is_none_or(|m| b as u64 <= m))
    else {
        bail!(
            "--bandwidth-mib {}: the probe's buffer does not fit in memory{}",
            a.bandwidth_mib,
            avail.map_or(String::new(), |m| format!(
                " ({:.1} GiB available)",
                m as f64 / (1u64 << 30) as f64
            ))
        );
    };
    // The positions a repetition runs (the last token decoded is not run).
    let Some(n_positions) = a.n_prompt.checked_add(a.n_gen) else {
        bail!(
            "-p {} + -n {}: more positions than any context holds",
            a.n_prompt,
            a.n_gen
        );
    };
    let positions = (n_positions, 1, 0);
    let ctx_flag = format!("-p {} + -n {}", a.n_prompt, a.n_gen);
    // Each row's masks and the request they were resolved for (`None`: dense).
    type RowMasks = Option<(Vec<[Option<InputMask>; 7]>, SparsitySpec)>;
    // Each sparse row's request resolved by `resolve`; `None` for a dense row.
    let rows_with = |resolve: &dyn Fn(SparseArgs) -> Result<RowMasks>| {
        a.sparsity
            .iter()
            .map(|&s| match s > 0.0 {
                false => Ok(None),
                true => resolve(SparseArgs {
                    sparsity: s,
                    thresholds: a.thresholds.clone(),
                    allocation: a.allocation,
                    quantile: a.quantile,
                    mode: ModeArg::All,
                }),
            })
            .collect::<Result<Vec<_>>>()
    };
    let (model, dtype, model_label, prompt, rows) = match &a.random_weights {
        Some(shape) => {
            let config = teal::models::random::shape(shape)
                .with_context(|| format!("--random-weights {shape}"))?;
            check_ctx(&a.common, device, &config, positions, &ctx_flag)?;
            let dtype = device.host_dtype(a.common.dtype.into());
            let t0 = std::time::Instant::now();
            let (model, th) = teal::bench::random_model(shape, dtype, a.seed)
                .with_context(|| format!("random weights of shape {shape}"))?;
            eprintln!(
                "random weights {shape} ({}, seed {}) generated and calibrated on {} in {:.1}s",
                dtype.name(),
                a.seed,
                th.calibration.text,
                t0.elapsed().as_secs_f64()
            );
            let rows = rows_with(&|sparse| {
                let spec = sparse.spec(Some(&th))?;
                Ok(Some((th.resolve(&spec)?, spec)))
            })?;
            let prompt = teal::bench::spread_tokens(a.n_prompt, model.config.vocab_size, 0);
            (model, dtype, format!("random {shape}"), prompt, rows)
        }
        None => {
            let files = a.common.open()?;
            check_ctx(&a.common, device, &files.config, positions, &ctx_flag)?;
            // The thresholds before the weights: a missing or mismatched file is reported at
            // once, as in run and ppl.
            let rows =
                rows_with(&|sparse| Ok(sparse.resolve(&files)?.map(|(t, spec, ..)| (t, spec))))?;
            let model = a.common.load(&files)?;
            let base = files.tokenizer.encode(BENCH_TEXT, false)?;
            if base.is_empty() {
                bail!("the bench prompt tokenized to nothing");
            }
            let prompt: Vec<u32> = base.iter().cycle().take(a.n_prompt).copied().collect();
            let label = a.common.model_path()?.display().to_string();
            (model, a.common.dtype.into(), label, prompt, rows)
        }
    };
    let ctx = prompt.len() + a.n_gen + 1;
    let t_dec = std::time::Instant::now();
    let mut dec = device
        .decoder_kv(Models::single(&model), ctx, a.common.kv(device)?)
        .with_context(|| format!("opening --device {}", device.name()))?;
    eprintln!(
        "device: {} (model ready in {:.1}s)",
        dec.describe(),
        t_dec.elapsed().as_secs_f64()
    );
    // Before the bandwidth probe, whose buffer would otherwise count as the load's peak.
    let after_load = teal::bench::resident_memory();
    let bw = dec.bandwidth(probe_bytes)?;
    eprintln!(
        "bandwidth: {:.2} GB/s ({})",
        bw.bytes_per_s / 1e9,
        bw.method
    );
    let opts = teal::bench::BenchOptions {
        n_decode: a.n_gen,
        reps: a.reps,
    };
    let (masks, specs): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .map(|m| match m {
            Some((m, spec)) => (Some(m), Some(spec)),
            None => (None, None),
        })
        .unzip();
    // The request of the sparse rows (the same for each: only the target differs).
    let spec = specs.into_iter().flatten().next();
    let models = masks
        .iter()
        .map(|m| match m {
            Some(m) => Ok(model.with_masks(m)?),
            None => Ok(model.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let variants: Vec<teal::bench::Variant> = a
        .sparsity
        .iter()
        .zip(&masks)
        .zip(&models)
        .map(|((&sparsity, masks), model)| teal::bench::Variant {
            sparsity,
            masks: masks.as_deref(),
            model,
        })
        .collect();
    let results = teal::bench::bench_decode(&mut *dec, &variants, &prompt, &opts, bw.bytes_per_s)?;
    if !a.json {
        for r in &results {
            eprintln!(
                "sparsity {:.2}: decode {:.2} tok/s [{:.2}, {:.2}]",
                r.sparsity, r.decode.median, r.decode.min, r.decode.max
            );
        }
    }
    let threads = rayon::current_num_threads();
    let model_path = model_label;
    // Resident memory against the weights in their format plus the KV cache (first row's run).
    let weight_bytes = model.weight_bytes();
    let kv_bytes = results.first().map_or(0, |r| r.kv_cache_bytes);
    let decoding = results.first().and_then(|r| r.resident_bytes);
    let memory = serde_json::json!({
        "resident_after_load": after_load.map(|m| m.0),
        "peak_during_load": after_load.map(|m| m.1),
        "resident_decoding": decoding,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes": kv_bytes,
        "ratio": decoding.map(|r| r as f64 / (weight_bytes + kv_bytes) as f64),
    });
    // Speed-ups are relative to the dense row, when there is one: the median over rounds of
    // the two speeds' ratio in the same round (the variants run interleaved).
    let dense = results.iter().find(|r| r.sparsity == 0.0).cloned();
    let speedup = |r: &teal::bench::BenchResult| {
        let d = dense.as_ref()?;
        Some((
            teal::bench::paired_speedup(r, d)?,
            d.bytes_per_token / r.bytes_per_token,
        ))
    };
    if a.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "sparsity": r.sparsity,
                    "realized_sparsity": r.realized_sparsity,
                    "decode_tok_s": r.decode.median,
                    "decode_tok_s_min": r.decode.min,
                    "decode_tok_s_max": r.decode.max,
                    "decode_tok_s_rounds": r.decode_rounds,
                    "prompt_tok_s": r.prompt.median,
                    "prompt_tok_s_min": r.prompt.min,
                    "prompt_tok_s_max": r.prompt.max,
                    "bytes_per_token": r.bytes_per_token,
                    "gb_s": r.gb_s,
                    "floor_ratio": r.floor_ratio,
                    "speedup": speedup(r).map(|s| s.0),
                    "ideal_speedup": speedup(r).map(|s| s.1),
                    "decoder": r.decoder,
                })
            })
            .collect();
        let j = serde_json::json!({
            "results": rows,
            "device": dec.describe(),
            "machine": {
                "bandwidth_gb_s": bw.bytes_per_s / 1e9,
                "bandwidth_method": bw.method,
                "threads": threads,
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "simd": teal_simd_note(),
            },
            "memory": memory,
            "model": model_path,
            "allocation": spec.map(|s| s.allocation.name()),
            "quantile": spec.map(|s| s.quantile.name()),
            "dtype": dtype.name(),
            "n_prompt": a.n_prompt,
            "n_gen": a.n_gen,
            "reps": a.reps,
        });
        println!("{j}");
    } else {
        let sparse_note = spec.map_or(String::new(), |s| {
            format!(
                " | {} allocation, {} quantile",
                s.allocation.name(),
                s.quantile.name()
            )
        });
        println!(
            "model {model_path} | dtype {} | device {} | threads {threads} | simd {} | bandwidth {:.2} GB/s ({}) | p {} n {} r {}{sparse_note}",
            dtype.name(),
            dec.describe(),
            teal_simd_note(),
            bw.bytes_per_s / 1e9,
            bw.method,
            a.n_prompt,
            a.n_gen,
            a.reps
        );
        println!("| sparsity | realized | decode tok/s (min-max) | prompt tok/s | MB/token | GB/s | floor ratio | speed-up (ideal) |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &results {
            let su = match speedup(r) {
                Some((s, i)) => format!("{s:.2}x ({i:.2}x)"),
                None => "-".into(),
            };
            println!(
                "| {:.2} | {:.3} | {:.2} ({:.2}-{:.2}) | {:.1} | {:.1} | {:.2} | {:.2} | {su} |",
                r.sparsity,
                r.realized_sparsity,
                r.decode.median,
                r.decode.min,
                r.decode.max,
                r.prompt.median,
                r.bytes_per_token / 1e6,
                r.gb_s,
                r.floor_ratio,
            );
        }
        let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6));
        println!(
            "memory: resident {} MB while decoding ({} MB after load, load peak {} MB) | weights {:.1} MB + KV cache {:.1} MB | ratio {}",
            mb(decoding),
            mb(after_load.map(|m| m.0)),
            mb(after_load.map(|m| m.1)),
            weight_bytes as f64 / 1e6,
            kv_bytes as f64 / 1e6,
            decoding.map_or("-".into(), |r| format!(
                "{:.3}",
                r as f64 / (weight_bytes + kv_bytes) as f64
            )),
        );
    }
    Ok(())
}

/// The CPU kernels' path: what the decode numbers were measured with (q8's products are exact
/// without AVX-512 VNNI, 8-bit with it; q4's are 8-bit on any AVX2 CPU).
fn teal_simd_note() -> &'static str {
    if !teal::simd_available() {
        "portable (no AVX2/FMA/F16C)"
    } else if teal::int8_dots() {
        "avx2+fma+f16c+avx512vnni (q8 and q4 decode in 8-bit products)"
    } else {
        "avx2+fma+f16c (q4 decode in 8-bit products)"
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use anyhow::Context;

    #[test]
    fn error_chain_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let lib = anyhow::Error::from(teal::Error::Io {
            path: "/x.txt".into(),
            source: io(),
        });
        assert_eq!(error_chain(&lib), "/x.txt: No such file");
        let ctx = Err::<(), _>(io()).context("reading the text").unwrap_err();
        assert_eq!(error_chain(&ctx), "reading the text: No such file");
    }
}
