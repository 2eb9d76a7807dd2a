//! The model families the workspace knows, as the shared runtime needs to name them (previews, progress).

use serde::{Deserialize, Serialize};

/// Architecture family: decides text conditioning, latent preview colours and key layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelFamily {
    /// SD 1.x: one OpenAI CLIP-L encoder, 768-wide context.
    Sd1,
    /// SD 2.x: one OpenCLIP-H encoder (penultimate layer), 1024-wide context.
    Sd2,
    /// SDXL: CLIP-L + OpenCLIP-bigG, pooled embeddings and size/crop time ids.
    Sdxl,
    /// FLUX.1 (dev/schnell): T5-XXL + CLIP-L, 16 latent channels, run by sd-flux.
    Flux,
}
