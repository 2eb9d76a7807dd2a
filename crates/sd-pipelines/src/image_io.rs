//! Images in and out (sd-core's [`sd_core::image_io`]) and the A1111 infotext of a Stable Diffusion run.

pub use sd_core::image_io::*;

use crate::pipeline::GenerationParams;

/// The A1111 `parameters` text for a run: prompt, negative prompt, then the settings line.
pub fn a1111_parameters(p: &GenerationParams, model: &str, extra: &[(&str, String)]) -> String {
    let mut fields = vec![("Steps", p.steps.to_string()), ("Sampler", p.sampler.kind.display_name().to_string())];
    if let Some(schedule) = p.sampler.schedule {
        fields.push(("Schedule type", schedule.a1111().1.to_string()));
    }
    fields.extend([
        ("CFG scale", format!("{}", p.guidance_scale)),
        ("Seed", p.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", model.to_string()),
    ]);
    if p.clip_skip > 1 {
        fields.push(("Clip skip", p.clip_skip.to_string()));
    }
    if let Some(v) = p.variation {
        fields.push(("Variation seed", v.subseed.to_string()));
        fields.push(("Variation seed strength", format!("{}", v.strength)));
    }
    if let Some((h, w)) = p.seed_resize_from {
        fields.push(("Seed resize from", format!("{w}x{h}")));
    }
    if p.eta_noise_seed_delta != 0 {
        fields.push(("ENSD", p.eta_noise_seed_delta.to_string()));
    }
    // A1111 writes the random source only when it is not its default "GPU" (NV noise on NVIDIA cards).
    if p.noise == sd_core::run::NoiseKind::A1111Cpu {
        fields.push(("RNG", "CPU".to_string()));
    }
    fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    infotext(&p.prompt, &p.negative_prompt, &fields)
}
