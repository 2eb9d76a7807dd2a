//! The scheduler seam: a caller-built scheduler gets each guided call's unconditional and conditional
//! predictions separately (what CFG++-style samplers need), and the default blend is the pipeline's CFG.

use candle_core::Tensor;
use sd_core::run::{RunContext, Task};
use sd_core::schedulers::{build_scheduler, NoiseSource, SamplerKind, Scheduler};
use sd_models::loader::{load, LoadOptions};
use sd_pipelines::pipeline::{default_params, generate, scheduler_config, SdExtras};

/// Euler, watching the predictions it is handed.
struct Watching {
    inner: Box<dyn Scheduler>,
    guided_calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Scheduler for Watching {
    fn kind(&self) -> SamplerKind {
        self.inner.kind()
    }
    fn timesteps(&self) -> &[f64] {
        self.inner.timesteps()
    }
    fn sigmas(&self) -> Option<&[f64]> {
        self.inner.sigmas()
    }
    fn num_inference_steps(&self) -> usize {
        self.inner.num_inference_steps()
    }
    fn init_noise_sigma(&self) -> f64 {
        self.inner.init_noise_sigma()
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> sd_core::Result<Tensor> {
        self.inner.scale_model_input(sample, i)
    }
    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> sd_core::Result<Tensor> {
        self.inner.step(out, i, sample, noise)
    }
    fn step_guided(&mut self, uncond: &Tensor, cond: &Tensor, scale: f64, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> sd_core::Result<Tensor> {
        assert_eq!(uncond.dims(), sample.dims(), "one prediction per image, not the doubled batch");
        let apart = (cond - uncond)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(apart > 0.0, "the two predictions differ");
        self.guided_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.step_guided(uncond, cond, scale, i, sample, noise)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> sd_core::Result<Tensor> {
        self.inner.add_noise(original, noise, i)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}

#[test]
fn a_caller_scheduler_sees_both_predictions_of_every_guided_call() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd15");
    let m = load(&dir, &LoadOptions::default()).expect("fixture loads");
    let mut p = default_params(&m, "a lighthouse");
    (p.width, p.height, p.steps, p.seed, p.guidance_scale) = (32, 32, 3, 2, 6.0);
    p.sampler = SamplerKind::Euler.into();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = build_scheduler(p.sampler, &scheduler_config(&m).expect("config"), p.steps).expect("scheduler");
    let watching = Watching { inner, guided_calls: calls.clone() };
    let extras = SdExtras { scheduler: Some(Box::new(watching)), ..SdExtras::default() };
    let seen = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), extras).expect("run").latents;
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 3);
    let plain = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect("run").latents;
    let d = (seen - plain).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
    assert_eq!(d, 0.0, "the default blend is the pipeline's classifier-free guidance");
}
