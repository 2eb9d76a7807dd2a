//! A1111 prompt editing and alternation in the Stable Diffusion loop: the conditioning changes at the
//! model call A1111's schedule says, and nowhere else.

use candle_core::Tensor;
use sd_core::run::{RunContext, StepProgress, Task};
use sd_core::schedulers::{Sampler, SamplerKind};
use sd_models::loader::{load, LoadOptions, StableDiffusionModels};
use sd_pipelines::hires::{generate_hires, HiresFix, HiresUpscaler};
use sd_pipelines::pipeline::{default_params, generate, GenerationParams};

fn models(name: &str) -> StableDiffusionModels {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name);
    load(&dir, &LoadOptions::default()).expect("fixture loads")
}

fn request(m: &StableDiffusionModels, prompt: &str, steps: usize) -> GenerationParams {
    let mut p = default_params(m, prompt);
    (p.width, p.height, p.steps, p.seed) = (32, 32, steps, 11);
    p.negative_prompt = "blurry".into();
    p.sampler = Sampler { kind: SamplerKind::Euler, schedule: None };
    p
}

fn latents(m: &StableDiffusionModels, p: &GenerationParams) -> Tensor {
    generate(m, p, &Task::TextToImage, &mut RunContext::default(), Default::default()).expect("run").latents
}

/// The latents after every step of a run.
fn trajectory(m: &StableDiffusionModels, p: &GenerationParams) -> Vec<Tensor> {
    let mut seen = Vec::new();
    let mut edit = |s: &StepProgress<'_>| -> sd_core::Result<Option<Tensor>> {
        seen.push(s.latents.clone());
        Ok(None)
    };
    {
        let mut run = RunContext { edit: Some(&mut edit), ..RunContext::default() };
        generate(m, p, &Task::TextToImage, &mut run, Default::default()).expect("run");
    }
    seen
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
    d == 0.0
}

#[test]
fn an_edit_switches_the_prompt_after_the_model_call_a1111_names() {
    let m = models("sd15");
    // 3 Euler steps, [cat:dog:1]: calls 0 and 1 (A1111 switches after `when`, inclusive) see "cat", call 2 "dog".
    let edited = trajectory(&m, &request(&m, "a [cat:dog:1]", 3));
    let cat = trajectory(&m, &request(&m, "a cat", 3));
    assert!(same(&edited[0], &cat[0]) && same(&edited[1], &cat[1]), "the first two calls are the 'cat' prompt's");
    assert!(!same(&edited[2], &cat[2]), "the last call is conditioned on 'dog'");
    // The last call equals a 'dog' step taken from the 'cat' latents (Euler keeps no other state).
    let cat_after_two = cat[1].clone();
    let mut edit = |s: &StepProgress<'_>| -> sd_core::Result<Option<Tensor>> { Ok((s.step == 2).then(|| cat_after_two.clone())) };
    let mut run = RunContext { edit: Some(&mut edit), ..RunContext::default() };
    let dog = generate(&m, &request(&m, "a dog", 3), &Task::TextToImage, &mut run, Default::default()).expect("run");
    assert!(same(&dog.latents, &edited[2]));
}

#[test]
fn schedules_that_never_switch_equal_the_plain_prompt_and_alternation_switches_every_call() {
    let m = models("sd15");
    let cat = latents(&m, &request(&m, "a cat", 3));
    assert!(same(&latents(&m, &request(&m, "a [cat:dog:9]", 3)), &cat), "switching after the last call changes nothing");
    assert!(same(&latents(&m, &request(&m, "a [cat|cat]", 3)), &cat));
    assert!(same(&latents(&m, &request(&m, "a [cat:dog:0]", 3)), &latents(&m, &request(&m, "a dog", 3))));
    // A1111's alternation: call k takes the schedule entry ending at max(k, 1), so calls 0 and 1 both take the first option.
    assert!(same(&latents(&m, &request(&m, "a [cat|dog]", 3)), &latents(&m, &request(&m, "a [cat:dog:1]", 3))));
    // The negative prompt is scheduled too.
    let mut p = request(&m, "a cat", 3);
    p.negative_prompt = "[blurry:ugly:1]".into();
    assert!(!same(&latents(&m, &p), &cat));
    p.negative_prompt = "[blurry:ugly:5]".into();
    assert!(same(&latents(&m, &p), &cat));
}

#[test]
fn second_order_samplers_schedule_over_twice_the_steps() {
    let m = models("sd15");
    let mut p = request(&m, "a [cat:dog:3]", 2);
    p.sampler = Sampler { kind: SamplerKind::Heun, schedule: None };
    // Heun runs 3 model calls for 2 steps; A1111 schedules over 4, so `3` keeps "cat" for every call.
    let mut plain = p.clone();
    plain.prompt = "a cat".into();
    assert!(same(&latents(&m, &p), &latents(&m, &plain)));
    p.prompt = "a [cat:dog:1]".into();
    assert!(!same(&latents(&m, &p), &latents(&m, &plain)));
}

#[test]
fn a_hires_fix_counts_fractions_over_both_passes() {
    let m = models("sd15");
    let hr = HiresFix { width: 48, height: 48, upscaler: HiresUpscaler::Latent, steps: Some(3), strength: 1.0, esrgan: None };
    let run = |prompt: &str| {
        let p = request(&m, prompt, 2);
        generate_hires(&m, &p, &hr, &mut RunContext::default()).expect("hires").latents
    };
    // 0.9 ends inside the first pass: the second is all "dog"; 1.9 ends at the last call of the second.
    assert!(!same(&run("a [cat:dog:0.9]"), &run("a cat")));
    assert!(same(&run("a [cat:dog:1.9]"), &run("a cat")), "the first pass is all 'cat', the second switches after its last call");
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff")
}

#[test]
fn composable_diffusion_blends_each_part_against_the_unconditional_prediction() {
    // A1111: guided = uncond + Σ wᵢ·scale·(condᵢ − uncond). Two equal parts of weight ½ are the plain prompt;
    // two of weight 1 are the plain prompt at twice the scale; so is one part of weight 2, even at scale 1
    // (composable prompts always compute the unconditional prediction).
    for name in ["sd15", "sdxl"] {
        let m = models(name);
        let run = |prompt: &str, scale: f64| {
            let mut p = request(&m, prompt, 3);
            p.guidance_scale = scale;
            latents(&m, &p)
        };
        let plain = run("a cat", 4.0);
        let doubled = run("a cat", 8.0);
        assert!(max_diff(&run("a cat:0.5 AND a cat :0.5", 4.0), &plain) < 1e-4, "{name}: halves");
        assert!(max_diff(&run("a cat AND a cat", 4.0), &doubled) < 1e-4, "{name}: two parts");
        assert!(max_diff(&run("a cat :2", 4.0), &doubled) < 1e-4, "{name}: one part of weight 2");
        assert!(max_diff(&run("a cat:2", 1.0), &run("a cat", 2.0)) < 1e-4, "{name}: weight 2 at scale 1");
        assert!(max_diff(&run("a cat:2", 0.0), &run("a cat", 2.0)) < 1e-4, "{name}: at CFG 0 too (scale 1, as a plain prompt's cond alone)");
        let mut p = request(&m, &["a"; 9].join(" AND "), 1);
        p.guidance_scale = 4.0;
        let e = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), Default::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("prompt") && e.contains("AND parts"), "{e}");
        // Different parts really steer: neither part's picture alone.
        let both = run("a cat AND a dog", 4.0);
        assert!(max_diff(&both, &plain) > 1e-3 && max_diff(&both, &run("a dog", 4.0)) > 1e-3, "{name}: two prompts");
        // Prompt editing works inside a part: [cat:dog:0] is "dog" from the first call.
        assert!(max_diff(&run("a [cat:dog:0] AND a cat", 4.0), &run("a dog AND a cat", 4.0)) == 0.0, "{name}: editing in a part");
    }
}

#[test]
fn euler_cfg_pp_runs_guided_at_any_scale() {
    // CFG++ re-noises along the unconditional prediction, so the pipeline computes it even at scale ≤ 1:
    // with the negative prompt equal to the prompt the two predictions agree and CFG++ is Euler; with
    // another negative prompt it is not.
    let m = models("sd15");
    let run = |sampler: SamplerKind, negative: &str| {
        let mut p = request(&m, "a cat", 3);
        p.sampler = Sampler { kind: sampler, schedule: None };
        p.negative_prompt = negative.into();
        p.guidance_scale = 1.0;
        latents(&m, &p)
    };
    let euler = run(SamplerKind::Euler, "blurry");
    assert!(max_diff(&run(SamplerKind::EulerCfgPp, "a cat"), &euler) < 1e-5, "equal predictions: Euler");
    assert!(max_diff(&run(SamplerKind::EulerCfgPp, "blurry"), &euler) > 1e-4, "the unconditional prediction steers CFG++");
}
