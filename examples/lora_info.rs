//! What a LoRA file holds: `cargo run --example lora_info -- file.safetensors [--model model]`.
//!
//! Prints the key format, kohya training metadata (`ss_network_dim`, `ss_network_alpha`,
//! `ss_base_model_version`, …), ranks, alphas and module counts; with `--model`, also which modules
//! match that model (no weights are loaded).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use sd_lora::keys::KeyResolver;
use sd_lora::LoraAdapter;
use sd_models::loader::{inspect, read_folder_config};
use sd_toolkit::AnyResult;

/// Describe a LoRA file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The LoRA `.safetensors` file.
    file: PathBuf,
    /// A model (diffusers folder or single file) to match the modules against.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Print every module key.
    #[arg(long)]
    verbose: bool,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let a = LoraAdapter::open(&cli.file)?;
    println!("file:    {}", a.path().display());
    println!("format:  {}", a.format());
    println!("modules: {}", a.modules().len());
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for m in a.modules() {
        *kinds.entry(m.kind.to_string()).or_default() += 1;
    }
    println!("kinds:   {kinds:?}");
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut alphas: BTreeMap<String, usize> = BTreeMap::new();
    let mut prefixes: BTreeMap<String, usize> = BTreeMap::new();
    for m in a.modules() {
        *ranks.entry(m.rank).or_default() += 1;
        *alphas.entry(m.alpha.map(|v| v.to_string()).unwrap_or_else(|| "none (= rank)".into())).or_default() += 1;
        let prefix = if m.key.starts_with("lora_") {
            m.key.splitn(3, '_').take(2).collect::<Vec<_>>().join("_")
        } else {
            m.key.split('.').next().unwrap_or_default().to_string()
        };
        *prefixes.entry(prefix).or_default() += 1;
    }
    println!("ranks:   {ranks:?}");
    println!("alphas:  {alphas:?}");
    println!("groups:  {prefixes:?}");
    println!("conv modules: {}", a.modules().iter().filter(|m| m.down_shape.len() == 4).count());
    println!("likely base model: {}", a.likely_family().unwrap_or_else(|| "unknown".into()));
    let md = a.metadata();
    println!("ss_network_dim:        {}", md.network_dim.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("ss_network_alpha:      {}", md.network_alpha.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("ss_base_model_version: {}", md.base_model_version.as_deref().unwrap_or("-"));
    println!("ss_network_module:     {}", md.network_module.as_deref().unwrap_or("-"));
    let other = md.all.len();
    if other > 0 {
        println!("metadata entries: {other}");
    }
    if !a.ignored_tensors().is_empty() {
        println!("ignored tensors: {} (e.g. {})", a.ignored_tensors().len(), a.ignored_tensors()[0]);
    }
    if let Some(model) = &cli.model {
        let cfg =
            if model.is_dir() { read_folder_config(model, None)? } else { inspect(model)?.detection.variant.config() };
        let r = KeyResolver::new(&cfg);
        let unmatched: Vec<&str> =
            a.modules().iter().filter(|m| r.resolve(&m.key).is_none()).map(|m| m.key.as_str()).collect();
        println!(
            "against {} ({}): {} match, {} unmatched",
            model.display(),
            cfg.variant,
            a.modules().len() - unmatched.len(),
            unmatched.len()
        );
        for k in unmatched.iter().take(if cli.verbose { usize::MAX } else { 5 }) {
            println!("  unmatched: {k}");
        }
    }
    if cli.verbose {
        for m in a.modules() {
            println!("  {} rank {} alpha {:?} down {:?} up {:?}", m.key, m.rank, m.alpha, m.down_shape, m.up_shape);
        }
    }
    Ok(())
}
