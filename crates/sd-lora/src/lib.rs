//! LoRA adapters for Stable Diffusion models in Candle, merged into the weights while the model
//! loads, so no model code changes and inference runs at full speed.
//!
//! Reads kohya-ss / civitai files (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*`/`lora_te2_*`,
//! diffusers-style or LDM-style block names, LyCORIS LoCon conv layers with an optional Tucker core,
//! LyCORIS LoHa and LoKr without Tucker cores),
//! diffusers/PEFT files (`lora_A`/`lora_B`, legacy `.lora.down`/`.lora.up`, `unet.`/`text_encoder.`
//! prefixes). A [`LoraSet`] holds several adapters with their own (possibly negative) strengths and
//! plugs into [`sd_models::loader::LoadOptions::backend_hook`]: every weight the model asks for
//! becomes `W + Σ strength · alpha/rank · up · down` (the Hadamard / Kronecker product for LoHa / LoKr), computed in F32 on the model's device and cast
//! to the model dtype. Works for diffusers folders and single-file checkpoints alike (the OpenCLIP
//! fused attention of SD2/SDXL files is split before the LoRA sees it).

pub mod adapter;
pub mod error;
pub mod keys;
pub mod live;
pub mod merge;
pub mod peft;
pub mod set;

pub use adapter::{AdapterKind, LoraAdapter, LoraFormat, LoraMetadata, LoraModule};
pub use error::{Error, Result};
pub use live::LivePatcher;
pub use merge::{KeyTable, Merge, MergeBackend, Target, TransformerLoras};
pub use peft::{PeftAlpha, PeftAlphas};
pub use set::{parse_spec, AdapterReport, LoraReport, LoraSet};
