//! Scheduler tests: goldens from diffusers 0.42.1 (tools/scheduler_goldens.py, and
//! tools/scheduler_goldens_a1111.py for the samplers added for A1111 names), name parsing,
//! errors and properties of every schedule.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use sd_core::schedulers::{
    build_scheduler, NoNoise, NoiseQueue, NoiseSource, PredictionType, Sampler, SamplerKind,
    Scheduler, SchedulerConfig, SeededNoise, SigmaSchedule, TimestepSpacing, TorchCpuNoise,
};
use sd_core::Error;
use serde::Deserialize;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/goldens/schedulers")
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    family: String,
    sampler: String,
    steps: usize,
    img2img_strength: Option<f64>,
    config_json: String,
    num_calls: usize,
}

#[derive(Debug, Deserialize)]
struct CaseFile {
    cases: Vec<Case>,
}

struct Goldens {
    cases: Vec<Case>,
    common: HashMap<String, Tensor>,
    families: HashMap<String, HashMap<String, Tensor>>,
}

fn load_goldens() -> Goldens {
    let dir = golden_dir();
    let mut file = CaseFile { cases: Vec::new() };
    for (name, tool) in [
        ("cases.json", "tools/scheduler_goldens.py"),
        ("cases_a1111.json", "tools/scheduler_goldens_a1111.py"),
    ] {
        let text = std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}; run {tool} first"));
        let part: CaseFile = serde_json::from_str(&text).expect(name);
        file.cases.extend(part.cases);
    }
    let common = candle_core::safetensors::load(dir.join("common.safetensors"), &Device::Cpu)
        .expect("common");
    let mut families = HashMap::new();
    for case in &file.cases {
        if !families.contains_key(&case.family) {
            let path = dir.join(format!("{}.safetensors", case.family));
            families.insert(
                case.family.clone(),
                candle_core::safetensors::load(path, &Device::Cpu).expect("family"),
            );
        }
    }
    Goldens {
        cases: file.cases,
        common,
        families,
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

thread_local! {
    /// The largest relative deviation seen by `compare` on this thread.
    static WORST: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
    /// The largest absolute deviation seen by `compare` on this thread.
    static WORST_ABS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// The team tolerance: max|ours − golden| ≤ 1e-4 · max(1, max|golden|).
fn compare(what: &str, ours: &[f64], golden: &[f64]) -> Result<(), String> {
    if ours.len() != golden.len() {
        return Err(format!(
            "{what}: length {} vs golden {}",
            ours.len(),
            golden.len()
        ));
    }
    let scale = golden.iter().fold(1.0f64, |m, g| m.max(g.abs()));
    let diff = ours
        .iter()
        .zip(golden)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0f64,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    WORST.with(|w| w.set(w.get().max(diff / scale)));
    WORST_ABS.with(|w| w.set(w.get().max(diff)));
    if diff > 1e-4 * scale {
        return Err(format!(
            "{what}: max diff {diff:.3e} > {:.3e} (ours[..4] {:?}, golden[..4] {:?})",
            1e-4 * scale,
            &ours[..ours.len().min(4)],
            &golden[..golden.len().min(4)]
        ));
    }
    Ok(())
}

fn compare_t(what: &str, ours: &Tensor, golden: &Tensor) -> Result<(), String> {
    if ours.dims() != golden.dims() {
        return Err(format!(
            "{what}: shape {:?} vs golden {:?}",
            ours.dims(),
            golden.dims()
        ));
    }
    compare(what, &to_vec(ours), &to_vec(golden))
}

/// The fake model of the goldens: `0.5·x + fixed·cos(0.003·t)`.
fn fake_model(x: &Tensor, t: f64, fixed: &Tensor) -> Tensor {
    (x.affine(0.5, 0.0).unwrap() + fixed.affine((0.003 * t).cos(), 0.0).unwrap()).unwrap()
}

fn noise_list(g: &HashMap<String, Tensor>, prefix: &str) -> Vec<Tensor> {
    (0..)
        .map_while(|k| g.get(&format!("{prefix}{k}")).cloned())
        .collect()
}

/// Noise from a source, counting the draws.
struct Counting<N> {
    inner: N,
    draws: usize,
}

impl<N: NoiseSource> NoiseSource for Counting<N> {
    fn randn(
        &mut self,
        shape: &candle_core::Shape,
        dtype: DType,
        device: &Device,
    ) -> sd_core::Result<Tensor> {
        self.draws += 1;
        self.inner.randn(shape, dtype, device)
    }
}

/// The noise of a golden run: its recorded draws, or (goldens that store only `noise_draws`, to
/// stay small) the torch CPU generator stream of `seed` they were drawn from.
enum GoldenNoise {
    Recorded(NoiseQueue),
    Torch(Counting<TorchCpuNoise>, usize),
}

impl GoldenNoise {
    fn new(g: &HashMap<String, Tensor>, prefix: &str, seed: u64) -> Self {
        let recorded = noise_list(g, &format!("{prefix}noise."));
        match g.get(&format!("{prefix}noise_draws")) {
            Some(n) if recorded.is_empty() => {
                let n = n.to_vec1::<i64>().map(|v| v[0] as usize).unwrap_or(0);
                Self::Torch(Counting { inner: TorchCpuNoise::new(seed), draws: 0 }, n)
            }
            _ => Self::Recorded(NoiseQueue::new(recorded)),
        }
    }

    fn source(&mut self) -> &mut dyn NoiseSource {
        match self {
            Self::Recorded(q) => q,
            Self::Torch(c, _) => c,
        }
    }

    /// Fails when the run did not use exactly the draws diffusers made.
    fn finish(&self, what: &str) -> Result<(), String> {
        match self {
            Self::Recorded(q) if q.remaining() != 0 => {
                Err(format!("{what}: {} noise draws of diffusers were not used", q.remaining()))
            }
            Self::Torch(c, n) if c.draws != *n => {
                Err(format!("{what}: {} noise draws, diffusers made {n}", c.draws))
            }
            _ => Ok(()),
        }
    }
}

/// Samplers whose `scale_model_input` is not the identity.
fn scales_input(kind: SamplerKind) -> bool {
    use SamplerKind::*;
    matches!(
        kind,
        Euler | EulerAncestral | Heun | Lms | Dpm2 | Dpm2Ancestral | DpmPp2sAncestral | DpmPpSde
    )
}

/// Model calls of a `steps`-step run with an SD 1.5-style config.
fn expected_calls(kind: SamplerKind, steps: usize) -> usize {
    use SamplerKind::*;
    match kind {
        Heun | Dpm2 | Dpm2Ancestral | DpmPp2sAncestral | DpmPpSde => 2 * steps - 1,
        // PLMS repeats its first step (with skip_prk_steps, as SD configs set).
        Pndm if steps > 1 => steps + 1,
        _ => steps,
    }
}

fn check_case(
    case: &Case,
    g: &HashMap<String, Tensor>,
    common: &HashMap<String, Tensor>,
) -> Result<(), String> {
    let key = |what: &str| format!("{}.{}", case.name, what);
    let get = |what: &str| {
        g.get(&key(what))
            .ok_or_else(|| format!("golden {} missing", key(what)))
    };
    let cfg = SchedulerConfig::from_json_str(&case.config_json).map_err(|e| e.to_string())?;
    let sampler: Sampler = case.sampler.parse().map_err(|e: Error| e.to_string())?;
    let mut sched = build_scheduler(sampler, &cfg, case.steps).map_err(|e| e.to_string())?;
    let n = sched.timesteps().len();
    if n != case.num_calls {
        return Err(format!(
            "{} model calls, diffusers makes {}",
            n, case.num_calls
        ));
    }
    compare("timesteps", sched.timesteps(), &to_vec(get("timesteps")?))?;
    if let Some(gs) = g.get(&key("sigmas")) {
        let ours = sched.sigmas().ok_or("scheduler exposes no sigmas")?;
        compare("sigmas", ours, &to_vec(gs))?;
    }
    compare(
        "init_noise_sigma",
        &[sched.init_noise_sigma()],
        &to_vec(get("init_noise_sigma")?),
    )?;

    let fixed = &common["fixed"];
    let mut noise = GoldenNoise::new(g, &format!("{}.", case.name), 1234);
    let mut sample = common["unit_sample"]
        .affine(sched.init_noise_sigma(), 0.0)
        .map_err(|e| e.to_string())?;
    for i in 0..n {
        let scaled = sched
            .scale_model_input(&sample, i)
            .map_err(|e| e.to_string())?;
        if let Some(gs) = g.get(&key(&format!("scaled.{i}"))) {
            compare_t(&format!("scaled.{i}"), &scaled, gs)?;
        } else if !scales_input(sched.kind()) {
            compare_t(&format!("identity scaling {i}"), &scaled, &sample)?;
        }
        let out = fake_model(&scaled, sched.timesteps()[i], fixed);
        sample = sched
            .step(&out, i, &sample, noise.source())
            .map_err(|e| format!("step {i}: {e}"))?;
        if let Some(gp) = g.get(&key(&format!("prev.{i}"))) {
            compare_t(&format!("prev.{i}"), &sample, gp)?;
        }
    }
    noise.finish("run")?;
    if sched.kind().is_stochastic() {
        // The goldens drew from torch.Generator().manual_seed(1234): TorchCpuNoise(1234) must
        // reproduce the whole stochastic run without injected tensors.
        let mut fresh = build_scheduler(sampler, &cfg, case.steps).map_err(|e| e.to_string())?;
        let mut torch_noise = TorchCpuNoise::new(1234);
        let mut x = common["unit_sample"]
            .affine(fresh.init_noise_sigma(), 0.0)
            .map_err(|e| e.to_string())?;
        for i in 0..n {
            let scaled = fresh.scale_model_input(&x, i).map_err(|e| e.to_string())?;
            let out = fake_model(&scaled, fresh.timesteps()[i], fixed);
            x = fresh
                .step(&out, i, &x, &mut torch_noise)
                .map_err(|e| e.to_string())?;
        }
        compare_t("seeded run", &x, get(&format!("prev.{}", n - 1))?)?;
    }
    for i in 0..n {
        if let Some(ga) = g.get(&key(&format!("add_noise.{i}"))) {
            let ours = sched
                .add_noise(&common["original"], &common["noise"], i)
                .map_err(|e| e.to_string())?;
            compare_t(&format!("add_noise.{i}"), &ours, ga)?;
        }
    }

    if let Some(strength) = case.img2img_strength {
        let mut sched = build_scheduler(sampler, &cfg, case.steps).map_err(|e| e.to_string())?;
        let start = sched
            .begin_at_strength(strength)
            .map_err(|e| e.to_string())?;
        let gstart = get("img2img.start")?
            .to_vec1::<i64>()
            .map_err(|e| e.to_string())?[0] as usize;
        if start != gstart {
            return Err(format!("img2img start index {start}, diffusers {gstart}"));
        }
        compare(
            "img2img.timesteps",
            sched.timesteps(),
            &to_vec(get("img2img.timesteps")?),
        )?;
        let mut sample = sched
            .add_noise(&common["original"], &common["noise"], start)
            .map_err(|e| e.to_string())?;
        compare_t("img2img.noised", &sample, get("img2img.noised")?)?;
        let mut noise = GoldenNoise::new(g, &format!("{}.img2img.", case.name), 99);
        for i in start..sched.timesteps().len() {
            let scaled = sched
                .scale_model_input(&sample, i)
                .map_err(|e| e.to_string())?;
            let out = fake_model(&scaled, sched.timesteps()[i], fixed);
            sample = sched
                .step(&out, i, &sample, noise.source())
                .map_err(|e| format!("img2img step {i}: {e}"))?;
        }
        compare_t("img2img.final", &sample, get("img2img.final")?)?;
        noise.finish("img2img")?;
    }
    Ok(())
}

#[test]
fn schedulers_match_diffusers_goldens() {
    let goldens = load_goldens();
    assert!(goldens.cases.len() > 90, "expected the full golden matrix");
    let mut failures = Vec::new();
    let mut per_family = std::collections::BTreeMap::<&str, (f64, f64)>::new();
    for case in &goldens.cases {
        let before = WORST.with(|w| w.replace(0.0));
        let before_abs = WORST_ABS.with(|w| w.replace(0.0));
        if let Err(e) = check_case(case, &goldens.families[&case.family], &goldens.common) {
            failures.push(format!("{}: {e}", case.name));
        }
        let this = WORST.with(|w| w.get());
        let this_abs = WORST_ABS.with(|w| w.get());
        let f = per_family.entry(case.family.as_str()).or_insert((0.0, 0.0));
        *f = (f.0.max(this), f.1.max(this_abs));
        WORST.with(|w| w.set(before.max(this)));
        WORST_ABS.with(|w| w.set(before_abs.max(this_abs)));
    }
    for (family, (rel, abs)) in &per_family {
        println!("{family}: worst deviation {rel:.2e} x max(1, max|golden|), max abs diff {abs:.2e}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        goldens.cases.len(),
        failures.join("\n")
    );
    println!(
        "worst deviation over {} cases: {:.2e} x max(1, max|golden|)",
        goldens.cases.len(),
        WORST.with(|w| w.get())
    );
}

#[test]
fn every_sampler_family_has_goldens() {
    let goldens = load_goldens();
    // Euler CFG++ runs Euler's schedule and, unguided, Euler's step; its guided step is checked by
    // `euler_cfg_pp_matches_comfyui_s_loop` against tools/cfg_pp_goldens.py.
    for kind in SamplerKind::ALL.into_iter().filter(|k| *k != SamplerKind::EulerCfgPp) {
        let n = goldens
            .cases
            .iter()
            .filter(|c| c.sampler == kind.id())
            .count();
        assert!(n >= 4, "{kind}: only {n} golden cases");
        for pred in ["\"epsilon\"", "\"v_prediction\""] {
            assert!(
                goldens.cases.iter().any(|c| c.sampler == kind.id()
                    && c.config_json
                        .contains(&format!("\"prediction_type\": {pred}"))),
                "{kind}: no {pred} golden"
            );
        }
    }
}

#[test]
fn a1111_karras_name_overrides_a_plain_config() {
    // SD 1.5's own config plus the A1111 name must give diffusers' use_karras_sigmas schedule.
    let goldens = load_goldens();
    let g = &goldens.families["dpmpp_2m"];
    let sched = build_scheduler(
        "DPM++ 2M Karras".parse::<Sampler>().unwrap(),
        &SchedulerConfig::sd15(),
        20,
    )
    .unwrap();
    compare(
        "timesteps",
        sched.timesteps(),
        &to_vec(&g["dpmpp_2m_karras_eps_20.timesteps"]),
    )
    .unwrap();
    compare(
        "sigmas",
        sched.sigmas().unwrap(),
        &to_vec(&g["dpmpp_2m_karras_eps_20.sigmas"]),
    )
    .unwrap();
    // An explicit default schedule wins over a Karras config.
    let mut cfg = SchedulerConfig::sd15();
    cfg.use_karras_sigmas = Some(true);
    let plain = build_scheduler(
        Sampler::new(SamplerKind::DpmPp2m, SigmaSchedule::Default),
        &cfg,
        20,
    )
    .unwrap();
    compare(
        "timesteps",
        plain.timesteps(),
        &to_vec(&g["dpmpp_2m_default_eps_20.timesteps"]),
    )
    .unwrap();
}

#[test]
fn presets_equal_the_shipped_json() {
    let sd15 = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
        "clip_sample": false}"#;
    assert_eq!(
        SchedulerConfig::from_json_str(sd15).unwrap(),
        SchedulerConfig::sd15()
    );
    let sdxl = r#"{"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false}"#;
    assert_eq!(
        SchedulerConfig::from_json_str(sdxl).unwrap(),
        SchedulerConfig::sdxl()
    );
    let v = SchedulerConfig::sd21_v();
    assert_eq!(v.prediction_type, PredictionType::VPrediction);
    assert_eq!(
        SamplerKind::from_diffusers_class(v.class_name.as_deref().unwrap()),
        Some(SamplerKind::Ddim)
    );
    // SD 1.5's model_index names PNDM, which is now a sampler of its own.
    assert_eq!(
        SamplerKind::from_diffusers_class(SchedulerConfig::sd15().class_name.as_deref().unwrap()),
        Some(SamplerKind::Pndm)
    );
    assert_eq!(SchedulerConfig::sd15().skip_prk_steps, Some(true));
}

#[test]
fn user_facing_names_parse() {
    use SamplerKind::*;
    use SigmaSchedule::*;
    let table: &[(&str, SamplerKind, Option<SigmaSchedule>)] = &[
        ("Euler", Euler, None),
        ("Euler a", EulerAncestral, None),
        ("euler_a", EulerAncestral, None),
        ("k_euler_ancestral", EulerAncestral, None),
        ("DDIM", Ddim, None),
        ("DDPM", Ddpm, None),
        ("Heun", Heun, None),
        ("DPM++ 2M", DpmPp2m, None),
        ("DPM++ 2M Karras", DpmPp2m, Some(Karras)),
        ("dpmpp_2m", DpmPp2m, None),
        ("dpmpp_2m_karras", DpmPp2m, Some(Karras)),
        ("k_dpmpp_2m", DpmPp2m, None),
        ("DPM++ 2M SDE", DpmPp2mSde, None),
        ("DPM++ 2M SDE Karras", DpmPp2mSde, Some(Karras)),
        ("DPM++ 2M Exponential", DpmPp2m, Some(Exponential)),
        ("Euler Karras", Euler, Some(Karras)),
        ("Euler a Karras", EulerAncestral, Some(Karras)),
        ("euler_a_karras", EulerAncestral, Some(Karras)),
        ("DPM++ 2M Beta", DpmPp2m, Some(Beta)),
        ("DPM++ 2M SDE SGM Uniform", DpmPp2mSde, Some(SgmUniform)),
        ("dpmpp_2m_sgm_uniform", DpmPp2m, Some(SgmUniform)),
        ("Euler Simple", Euler, Some(Simple)),
        ("euler_simple", Euler, Some(Simple)),
        ("Euler DDIM Uniform", Euler, Some(DdimUniform)),
        ("euler_ddim_uniform", Euler, Some(DdimUniform)),
        ("DPM++ 2M Align Your Steps", DpmPp2m, Some(AlignYourSteps)),
        ("dpmpp_2m_ays", DpmPp2m, Some(AlignYourSteps)),
        ("Euler Align Your Steps SDXL", Euler, Some(AlignYourStepsXl)),
        ("LMS Beta", Lms, Some(Beta)),
        ("DPM2 a SGM Uniform", Dpm2Ancestral, Some(SgmUniform)),
        ("LCM", Lcm, None),
        ("UniPC", UniPc, None),
        ("unipc", UniPc, None),
        ("EulerAncestralDiscreteScheduler", EulerAncestral, None),
        ("DPMSolverMultistepScheduler", DpmPp2m, None),
        ("LMS", Lms, None),
        ("LMS Karras", Lms, Some(Karras)),
        ("k_lms", Lms, None),
        ("lms_karras", Lms, Some(Karras)),
        ("LMSDiscreteScheduler", Lms, None),
        ("PNDM", Pndm, None),
        ("PLMS", Pndm, None),
        ("PNDMScheduler", Pndm, None),
        ("DPM2", Dpm2, None),
        ("DPM2 Karras", Dpm2, Some(Karras)),
        ("k_dpm_2", Dpm2, None),
        ("KDPM2DiscreteScheduler", Dpm2, None),
        ("DPM2 a", Dpm2Ancestral, None),
        ("DPM2 a Karras", Dpm2Ancestral, Some(Karras)),
        ("k_dpm_2_a", Dpm2Ancestral, None),
        ("dpm2_a", Dpm2Ancestral, None),
        ("KDPM2AncestralDiscreteScheduler", Dpm2Ancestral, None),
        ("DEIS", Deis, None),
        ("DEIS Exponential", Deis, Some(Exponential)),
        ("DEISMultistepScheduler", Deis, None),
        ("TCD", Tcd, None),
        ("TCDScheduler", Tcd, None),
        ("DPM++ 2S a", DpmPp2sAncestral, None),
        ("DPM++ 2S a Karras", DpmPp2sAncestral, Some(Karras)),
        ("k_dpmpp_2s_ancestral", DpmPp2sAncestral, None),
        ("DPM++ SDE", DpmPpSde, None),
        ("DPM++ SDE Karras", DpmPpSde, Some(Karras)),
        ("dpmpp_sde", DpmPpSde, None),
        ("DPMSolverSDEScheduler", DpmPpSde, None),
        ("DPM++ 3M SDE", DpmPp3mSde, None),
        ("DPM++ 3M SDE Exponential", DpmPp3mSde, Some(Exponential)),
        ("dpmpp_3m_sde_karras", DpmPp3mSde, Some(Karras)),
    ];
    for &(name, kind, schedule) in table {
        let s: Sampler = name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((s.kind, s.schedule), (kind, schedule), "{name}");
    }
    for kind in SamplerKind::ALL {
        assert_eq!(kind.display_name().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(kind.id().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(
            Sampler::from(kind).to_string().parse::<Sampler>().unwrap(),
            Sampler::from(kind)
        );
    }
    assert_eq!(Sampler::new(DpmPp2m, Karras).to_string(), "DPM++ 2M Karras");
    assert_eq!("karras".parse::<SigmaSchedule>().unwrap(), Karras);
    // A1111's `scheduler` field labels and ComfyUI's scheduler names.
    for (label, schedule) in [
        ("Automatic", Default),
        ("Karras", Karras),
        ("Exponential", Exponential),
        ("Beta", Beta),
        ("SGM Uniform", SgmUniform),
        ("sgm_uniform", SgmUniform),
        ("Simple", Simple),
        ("DDIM", DdimUniform),
        ("ddim_uniform", DdimUniform),
        ("Align Your Steps", AlignYourSteps),
        ("AYS", AlignYourSteps),
        ("align_your_steps_sdxl", AlignYourStepsXl),
    ] {
        assert_eq!(label.parse::<SigmaSchedule>().unwrap(), schedule, "{label}");
    }
    for schedule in SigmaSchedule::ALL {
        assert_eq!(schedule.as_str().parse::<SigmaSchedule>().unwrap(), schedule);
        if schedule != Default {
            assert_eq!(schedule.display_name().parse::<SigmaSchedule>().unwrap(), schedule);
            let s = Sampler::new(DpmPp2m, schedule);
            assert_eq!(s.to_string().parse::<Sampler>().unwrap(), s, "{s}");
            let id = format!("dpmpp_2m_{}", schedule.as_str());
            assert_eq!(id.parse::<Sampler>().unwrap(), s, "{id}");
        }
    }
    assert_eq!(AlignYourSteps.for_sdxl(), AlignYourStepsXl);
    assert_eq!(Karras.for_sdxl(), Karras);
}

#[test]
fn errors_are_reported() {
    let cfg = SchedulerConfig::sd15();
    for kind in SamplerKind::ALL {
        assert!(
            matches!(
                build_scheduler(kind, &cfg, 0),
                Err(Error::InvalidSteps { steps: 0, .. })
            ),
            "{kind} 0 steps"
        );
        assert!(
            matches!(
                build_scheduler(kind, &cfg, 1001),
                Err(Error::InvalidSteps { steps: 1001, .. })
            ),
            "{kind} 1001 steps"
        );
    }
    assert!(matches!(
        build_scheduler(SamplerKind::Lcm, &cfg, 51),
        Err(Error::InvalidSteps { max: 50, .. })
    ));
    for bad in [
        "Euler b",
        "",
        "DPM++ 3M",
        "DDIM Karras",
        "lcm_karras",
        "DDIM Beta",
        "Euler Spicy",
        "PNDM Karras",
        "TCD Karras",
        "DPM2 b",
    ] {
        assert!(
            matches!(bad.parse::<Sampler>(), Err(Error::UnknownSampler { .. })),
            "{bad:?} should not parse"
        );
    }
    assert!(matches!(
        "DPM++ 2M Karras".parse::<SamplerKind>(),
        Err(Error::UnknownSampler { .. })
    ));
    assert!(matches!(
        "spicy".parse::<SigmaSchedule>(),
        Err(Error::UnknownSchedule { .. })
    ));
    assert!(matches!(
        build_scheduler(
            Sampler::new(SamplerKind::Ddim, SigmaSchedule::Karras),
            &cfg,
            20
        ),
        Err(Error::UnsupportedSchedule { .. })
    ));
    let mut thresh = cfg.clone();
    thresh.thresholding = true;
    assert!(matches!(
        build_scheduler(SamplerKind::Ddim, &thresh, 20),
        Err(Error::UnsupportedConfig { .. })
    ));
    assert!(matches!(
        SchedulerConfig::from_json_str("{\"beta_schedule\": \"sigmoid\"}"),
        Err(Error::ConfigJson { .. })
    ));
    assert!(matches!(
        SchedulerConfig::from_file("/nonexistent/scheduler_config.json"),
        Err(Error::Io { .. })
    ));

    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let mut sched = build_scheduler(SamplerKind::Euler, &cfg, 10).unwrap();
    assert!(matches!(
        sched.step(&x, 10, &x, &mut NoNoise),
        Err(Error::StepIndex { index: 10, len: 10 })
    ));
    assert!(matches!(
        sched.scale_model_input(&x, 11),
        Err(Error::StepIndex { .. })
    ));
    assert!(matches!(
        sched.begin_at_strength(0.0),
        Err(Error::InvalidStrength { .. })
    ));
    assert!(matches!(
        sched.begin_at_strength(1.5),
        Err(Error::InvalidStrength { .. })
    ));
    assert!(matches!(
        sched.begin_at_strength(0.05),
        Err(Error::InvalidStrength { .. })
    ));
    assert_eq!(sched.begin_at_strength(1.0).unwrap(), 0);

    let mut heun = build_scheduler(SamplerKind::Heun, &cfg, 10).unwrap();
    assert!(matches!(
        heun.step(&x, 1, &x, &mut NoNoise),
        Err(Error::StepOutOfOrder {
            index: 1,
            expected: 0,
            ..
        })
    ));

    for kind in [
        SamplerKind::Dpm2,
        SamplerKind::Dpm2Ancestral,
        SamplerKind::DpmPp2sAncestral,
        SamplerKind::DpmPpSde,
    ] {
        let mut s = build_scheduler(kind, &cfg, 10).unwrap();
        assert!(
            matches!(s.step(&x, 3, &x, &mut NoNoise), Err(Error::StepOutOfOrder { index: 3, expected: 2, .. })),
            "{kind}"
        );
    }
    let mut dpm2a = build_scheduler(SamplerKind::Dpm2Ancestral, &cfg, 10).unwrap();
    dpm2a.step(&x, 0, &x, &mut NoNoise).unwrap();
    assert!(matches!(
        dpm2a.step(&x, 1, &x, &mut NoNoise),
        Err(Error::NoiseRequired { .. })
    ));
    for kind in [SamplerKind::DpmPpSde, SamplerKind::DpmPp3mSde] {
        let mut s = build_scheduler(kind, &cfg, 10).unwrap();
        assert!(
            matches!(s.step(&x, 0, &x, &mut NoNoise), Err(Error::NoiseRequired { .. })),
            "{kind}"
        );
    }
    let mut tcd = build_scheduler(SamplerKind::Tcd, &cfg, 4).unwrap();
    assert!(matches!(
        tcd.step(&x, 0, &x, &mut NoNoise),
        Err(Error::NoiseRequired { .. })
    ));
    assert!(matches!(
        build_scheduler(SamplerKind::Tcd, &cfg, 51),
        Err(Error::InvalidSteps { max: 50, .. })
    ));
    let prk = SchedulerConfig { skip_prk_steps: Some(false), ..cfg.clone() };
    let Err(e) = build_scheduler(SamplerKind::Pndm, &prk, 3) else {
        panic!("PRK with 3 steps was accepted")
    };
    assert!(e.to_string().contains("skip_prk_steps"), "{e}");
    assert_eq!(build_scheduler(SamplerKind::Pndm, &prk, 4).unwrap().timesteps().len(), 13);
    let mut deis = cfg.clone();
    deis.solver_order = Some(4);
    assert!(matches!(
        build_scheduler(SamplerKind::Deis, &deis, 20),
        Err(Error::UnsupportedConfig { .. })
    ));
    // Fields of other classes are ignored, as diffusers' from_config does: DPM-Solver's
    // sigma_min does not move LMS's Karras range, zero-SNR rescaling does not exist for DPM2.
    let other = SchedulerConfig {
        sigma_min: Some(0.5),
        rescale_betas_zero_snr: true,
        ..cfg.clone()
    };
    for kind in [SamplerKind::Lms, SamplerKind::Dpm2, SamplerKind::Deis] {
        let a = build_scheduler(Sampler::new(kind, SigmaSchedule::Karras), &other, 10).unwrap();
        let b = build_scheduler(Sampler::new(kind, SigmaSchedule::Karras), &cfg, 10).unwrap();
        assert_eq!(a.sigmas(), b.sigmas(), "{kind}");
    }

    let mut ancestral = build_scheduler(SamplerKind::EulerAncestral, &cfg, 10).unwrap();
    assert!(matches!(
        ancestral.step(&x, 0, &x, &mut NoNoise),
        Err(Error::NoiseRequired { .. })
    ));
    let mut short =
        NoiseQueue::new([Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap()]);
    assert!(matches!(
        ancestral.step(&x, 0, &x, &mut short),
        Err(Error::NoiseQueue { .. })
    ));
}

#[test]
fn boxed_scheduler_crosses_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Box<dyn Scheduler>>();
    assert_send::<SeededNoise>();
    let mut sched = build_scheduler(SamplerKind::DpmPp2m, &SchedulerConfig::sd15(), 5).unwrap();
    let handle = std::thread::spawn(move || {
        let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let eps = x.affine(0.1, 0.0).unwrap();
        let mut s = x.clone();
        for i in 0..sched.timesteps().len() {
            s = sched.step(&eps, i, &s, &mut NoNoise).unwrap();
        }
        s
    });
    let out = handle.join().unwrap();
    assert!(to_vec(&out).iter().all(|v| v.is_finite()));
}

#[test]
fn seeded_noise_makes_stochastic_runs_repeatable() {
    let cfg = SchedulerConfig::sd15();
    let run = |seed: u64| {
        let mut sched = build_scheduler(SamplerKind::EulerAncestral, &cfg, 8).unwrap();
        let mut noise = SeededNoise::new(seed);
        let mut x = noise
            .randn(&(1, 4, 8, 8).into(), DType::F32, &Device::Cpu)
            .unwrap()
            .affine(sched.init_noise_sigma(), 0.0)
            .unwrap();
        for i in 0..sched.timesteps().len() {
            let input = sched.scale_model_input(&x, i).unwrap();
            let eps = input.affine(0.3, 0.0).unwrap();
            x = sched.step(&eps, i, &x, &mut noise).unwrap();
        }
        to_vec(&x)
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn torch_cpu_noise_matches_torch_randn() {
    let g =
        candle_core::safetensors::load(golden_dir().join("torch_randn.safetensors"), &Device::Cpu)
            .unwrap();
    for seed in [0u64, (1 << 40) + 17] {
        let mut noise = TorchCpuNoise::new(seed);
        let draws: Vec<&Tensor> = (0..).map_while(|k| g.get(&format!("{seed}.{k}"))).collect();
        assert!(!draws.is_empty());
        for (k, golden) in draws.into_iter().enumerate() {
            let ours = noise
                .randn(golden.shape(), DType::F32, &Device::Cpu)
                .unwrap();
            compare_t(&format!("seed {seed} draw {k}"), &ours, golden).unwrap();
        }
    }
}

#[test]
fn steps_keep_the_model_output_dtype() {
    let cfg = SchedulerConfig::sd15();
    let x = Tensor::ones((1, 4, 2, 2), DType::F16, &Device::Cpu).unwrap();
    for kind in SamplerKind::ALL {
        let mut sched = build_scheduler(kind, &cfg, 4).unwrap();
        let mut noise = SeededNoise::new(0);
        let out = sched.step(&x, 0, &x, &mut noise).unwrap();
        assert_eq!(out.dtype(), DType::F16, "{kind}");
    }
}

#[test]
fn unipc_variants_finish_finite_on_a_zero_final_sigma() {
    // diffusers yields NaN here (0·∞ on the last step); the port takes the limit.
    for (solver, predict_x0) in [("bh1", true), ("bh2", false), ("bh1", false)] {
        let cfg = SchedulerConfig {
            solver_type: Some(solver.into()),
            predict_x0: Some(predict_x0),
            ..SchedulerConfig::sd15()
        };
        let mut sched = build_scheduler(SamplerKind::UniPc, &cfg, 10).unwrap();
        assert_eq!(sched.sigmas().unwrap()[10], 0.0);
        let mut x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        for i in 0..10 {
            let eps = x.affine(0.2, 0.05).unwrap();
            x = sched.step(&eps, i, &x, &mut NoNoise).unwrap();
        }
        assert!(
            to_vec(&x).iter().all(|v| v.is_finite()),
            "{solver} predict_x0={predict_x0}: {:?}",
            to_vec(&x)
        );
    }
}

fn schedules_for(kind: SamplerKind) -> Vec<SigmaSchedule> {
    if kind.supports_sigma_schedules() {
        SigmaSchedule::ALL.to_vec()
    } else {
        vec![SigmaSchedule::Default]
    }
}

fn arb_setup() -> impl Strategy<Value = (SamplerKind, SigmaSchedule, TimestepSpacing, bool, usize)>
{
    let spacing = prop_oneof![
        Just(TimestepSpacing::Leading),
        Just(TimestepSpacing::Trailing),
        Just(TimestepSpacing::Linspace)
    ];
    (
        0..SamplerKind::ALL.len(),
        0usize..SigmaSchedule::ALL.len(),
        spacing,
        any::<bool>(),
        1usize..=200,
    )
        .prop_map(|(k, s, sp, v, steps)| {
            let kind = SamplerKind::ALL[k];
            let schedules = schedules_for(kind);
            let steps = if matches!(kind, SamplerKind::Lcm | SamplerKind::Tcd) {
                1 + (steps - 1) % 50
            } else {
                steps
            };
            (kind, schedules[s % schedules.len()], sp, v, steps)
        })
}

fn config_for(spacing: TimestepSpacing, v_pred: bool) -> SchedulerConfig {
    SchedulerConfig {
        timestep_spacing: Some(spacing),
        prediction_type: if v_pred {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        },
        ..SchedulerConfig::sd15()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn schedules_are_well_formed((kind, schedule, spacing, v, steps) in arb_setup()) {
        let cfg = config_for(spacing, v);
        let sched = build_scheduler(Sampler::new(kind, schedule), &cfg, steps).unwrap();
        let ts = sched.timesteps();
        if schedule == SigmaSchedule::DdimUniform {
            // ⌈(T−1)/⌊T/steps⌋⌉ steps, as ComfyUI and A1111 give.
            let stride = (1000 / steps).max(1);
            prop_assert_eq!(sched.num_inference_steps(), 999usize.div_ceil(stride));
        } else {
            prop_assert_eq!(sched.num_inference_steps(), steps);
        }
        let steps = sched.num_inference_steps();
        prop_assert_eq!(ts.len(), expected_calls(kind, steps));
        prop_assert!(ts.iter().all(|&t| (0.0..=1000.0).contains(&t)), "timesteps {:?}", ts);
        // DPM2's midpoint timesteps are fractional while diffusers rounds its Karras step
        // timesteps, and DPM2 a's midpoint lands (up to rounding) on the next step's sigma.
        let slack = if matches!(kind, SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral | SamplerKind::DpmPp2sAncestral) { 1.0 } else { 0.0 };
        prop_assert!(ts.windows(2).all(|w| w[0] + slack >= w[1]), "timesteps not descending: {:?}", ts);
        prop_assert!(sched.init_noise_sigma() > 0.0);
        if let Some(sigmas) = sched.sigmas() {
            prop_assert_eq!(sigmas.len(), expected_calls(kind, steps) + 1);
            // Their midpoints go through the timestep ↔ sigma interpolation in f32: where a schedule repeats a
            // sigma (beta sigmas at few steps), a midpoint can land up to ~2e-4 above its neighbour.
            let slack = if matches!(kind, SamplerKind::Dpm2Ancestral | SamplerKind::DpmPp2sAncestral) { 1e-3 } else { 0.0 };
            prop_assert!(sigmas.windows(2).all(|w| w[0] * (1.0 + slack) >= w[1]), "sigmas not non-increasing: {:?}", sigmas);
            if kind == SamplerKind::Deis {
                // diffusers' DEIS ends at the smallest training sigma (or repeats the last one).
                prop_assert!(sigmas[sigmas.len() - 1] > 0.0);
            } else {
                prop_assert_eq!(sigmas[sigmas.len() - 1], 0.0);
            }
            prop_assert!(sigmas[..sigmas.len() - 1].iter().all(|&s| s > 0.0));
        }
    }

    #[test]
    fn loops_stay_finite((kind, schedule, spacing, v, steps) in arb_setup(), seed in any::<u64>()) {
        let steps = steps.min(30);
        let cfg = config_for(spacing, v);
        let mut sched = build_scheduler(Sampler::new(kind, schedule), &cfg, steps).unwrap();
        let mut noise = SeededNoise::new(seed);
        let mut x = noise.randn(&(1, 4, 2, 2).into(), DType::F32, &Device::Cpu).unwrap().affine(sched.init_noise_sigma(), 0.0).unwrap();
        for i in 0..sched.timesteps().len() {
            let input = sched.scale_model_input(&x, i).unwrap();
            let out = input.affine(0.5, 0.1).unwrap();
            x = sched.step(&out, i, &x, &mut noise).unwrap();
        }
        let values = to_vec(&x);
        prop_assert!(values.iter().all(|v| v.is_finite() && v.abs() < 1e3), "{:?}", values);
    }

    #[test]
    fn img2img_start_matches_get_timesteps((kind, schedule, spacing, v, steps) in arb_setup(), strength in 0.0f64..=1.0) {
        let cfg = config_for(spacing, v);
        let mut sched = build_scheduler(Sampler::new(kind, schedule), &cfg, steps).unwrap();
        // ddim_uniform may run more steps than asked; strength applies to the steps it runs.
        let steps = sched.num_inference_steps();
        let init = ((steps as f64 * strength) as usize).min(steps);
        match sched.begin_at_strength(strength) {
            Ok(start) if matches!(kind, SamplerKind::Lcm | SamplerKind::Tcd) => {
                prop_assert_eq!(start, 0);
                prop_assert_eq!(sched.timesteps().len(), steps);
            }
            Ok(start) => {
                prop_assert!(init > 0);
                prop_assert_eq!(start, (steps - init) * sched.order());
                prop_assert!(start < sched.timesteps().len());
            }
            Err(Error::InvalidStrength { .. }) => prop_assert!(init == 0 || matches!(kind, SamplerKind::Lcm | SamplerKind::Tcd)),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[derive(Debug, Deserialize)]
struct TableCase {
    config: String,
    config_json: String,
    schedule: String,
    steps: usize,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct KRun {
    name: String,
    sampler: String,
    schedule: String,
    steps: usize,
    config_json: String,
    sigmas: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct ScheduleFile {
    tables: Vec<TableCase>,
    runs: Vec<KRun>,
}

fn schedule_file() -> ScheduleFile {
    let text = std::fs::read_to_string(golden_dir().join("schedules_a1111.json"))
        .expect("schedules_a1111.json; run tools/scheduler_goldens_a1111.py");
    serde_json::from_str(&text).expect("schedules_a1111.json")
}

thread_local! {
    /// The largest relative deviation seen by `close_f32` on this thread.
    static WORST_F32: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Relative closeness for values the reference computed in float32 (k-diffusion, ComfyUI).
fn close_f32(what: &str, ours: &[f64], theirs: &[f64]) -> Result<(), String> {
    if ours.len() != theirs.len() {
        return Err(format!("{what}: {} values, reference {}: {ours:?} vs {theirs:?}", ours.len(), theirs.len()));
    }
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        WORST_F32.with(|w| w.set(w.get().max((a - b).abs() / b.abs().max(1.0))));
        if (a - b).abs() > 1e-5 * b.abs().max(1.0) {
            return Err(format!("{what}[{i}]: {a} vs reference {b}"));
        }
    }
    Ok(())
}

#[test]
fn comfyui_schedules_match_the_reference() {
    // sgm_uniform, simple, ddim_uniform and Align Your Steps against ComfyUI's formulas on
    // k-diffusion's DiscreteSchedule (tools/scheduler_goldens_a1111.py).
    let file = schedule_file();
    assert!(file.tables.len() >= 40, "{} cases", file.tables.len());
    let mut failures = Vec::new();
    for c in &file.tables {
        let cfg = SchedulerConfig::from_json_str(&c.config_json).unwrap();
        let schedule: SigmaSchedule = c.schedule.parse().unwrap();
        let label = format!("{} {} {} steps", c.config, c.schedule, c.steps);
        let m = c.sigmas.len() - 1;
        for kind in [SamplerKind::Euler, SamplerKind::EulerAncestral, SamplerKind::Lms] {
            let sched = build_scheduler(Sampler::new(kind, schedule), &cfg, c.steps).unwrap();
            let r = close_f32(&format!("{label} {kind} sigmas"), sched.sigmas().unwrap(), &c.sigmas)
                .and_then(|()| close_f32(&format!("{label} {kind} timesteps"), sched.timesteps(), &c.timesteps));
            if let Err(e) = r {
                failures.push(e);
            }
        }
        // The multistep samplers take the same sigmas (and integer timesteps).
        for kind in [SamplerKind::DpmPp2m, SamplerKind::UniPc, SamplerKind::Deis] {
            let sched = build_scheduler(Sampler::new(kind, schedule), &cfg, c.steps).unwrap();
            let sigmas = sched.sigmas().unwrap();
            if let Err(e) = close_f32(&format!("{label} {kind} sigmas"), &sigmas[..m], &c.sigmas[..m]) {
                failures.push(e);
            }
            let truncated: Vec<f64> = c.timesteps.iter().map(|t| t.trunc()).collect();
            let off = sched.timesteps().iter().zip(&truncated).filter(|(a, b)| (*a - *b).abs() > 1.0).count();
            if off > 0 {
                failures.push(format!("{label} {kind}: timesteps {:?} vs {truncated:?}", sched.timesteps()));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    println!("worst relative deviation: {:.2e}", WORST_F32.with(|w| w.get()));
}

#[test]
fn k_diffusion_loops_match_on_a1111_schedules() {
    // k-diffusion's own sample_euler / _euler_ancestral / _heun / _lms / _dpm_2 / _dpm_2_ancestral
    // with the goldens' fake model, on ComfyUI schedules and Euler a Karras (which diffusers lacks).
    let file = schedule_file();
    let goldens = load_goldens();
    let finals = candle_core::safetensors::load(golden_dir().join("k_diffusion_runs.safetensors"), &Device::Cpu)
        .expect("k_diffusion_runs.safetensors");
    assert!(file.runs.len() >= 8);
    let mut failures = Vec::new();
    for run in &file.runs {
        let cfg = SchedulerConfig::from_json_str(&run.config_json).unwrap();
        let kind = SamplerKind::ALL.into_iter().find(|k| k.id() == run.sampler).unwrap();
        let schedule: SigmaSchedule = run.schedule.parse().unwrap();
        let mut sched = build_scheduler(Sampler::new(kind, schedule), &cfg, run.steps).unwrap();
        if matches!(kind, SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::Lms) {
            if let Err(e) = close_f32(&format!("{} sigmas", run.name), sched.sigmas().unwrap(), &run.sigmas) {
                failures.push(e);
                continue;
            }
        }
        let fixed = &goldens.common["fixed"];
        let mut noise = TorchCpuNoise::new(1234);
        let mut x = goldens.common["unit_sample"].affine(sched.init_noise_sigma(), 0.0).unwrap();
        for i in 0..sched.timesteps().len() {
            let scaled = sched.scale_model_input(&x, i).unwrap();
            let out = fake_model(&scaled, sched.timesteps()[i], fixed);
            x = sched.step(&out, i, &x, &mut noise).unwrap();
        }
        if let Err(e) = compare_t(&format!("{} final", run.name), &x, &finals[&format!("{}.final", run.name)]) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    println!("worst deviation: {:.2e} x max(1, max|golden|)", WORST.with(|w| w.get()));
}

#[test]
fn a1111_second_order_samplers_count_double_steps() {
    // A1111 schedules prompt editing over 2 × steps for its second-order samplers; the others make
    // one model call per step (DPM++ 3M SDE is multistep).
    use SamplerKind::*;
    for kind in SamplerKind::ALL {
        let doubled = matches!(kind, Heun | Dpm2 | Dpm2Ancestral | DpmPp2sAncestral | DpmPpSde);
        assert_eq!(kind.schedule_steps(20), if doubled { 40 } else { 20 }, "{kind}");
        let sched = build_scheduler(kind, &SchedulerConfig::sd15(), 20).unwrap();
        assert_eq!(sched.order(), if doubled { 2 } else { 1 }, "{kind}");
    }
}

#[test]
fn dpmpp_sde_draws_brownian_increments() {
    // DPM++ SDE draws two normals per step but the last: z1 for the midpoint, z2 for the rest of
    // the Brownian increment (their joint law is checked against diffusers with the same
    // construction in tools/scheduler_goldens_a1111.py).
    let cfg = SchedulerConfig::sd15();
    let mut sched = build_scheduler(SamplerKind::DpmPpSde, &cfg, 6).unwrap();
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut noise = Counting { inner: SeededNoise::new(3), draws: 0 };
    let mut s = x.clone();
    for i in 0..sched.timesteps().len() {
        let eps = sched.scale_model_input(&s, i).unwrap().affine(0.2, 0.0).unwrap();
        s = sched.step(&eps, i, &s, &mut noise).unwrap();
    }
    assert_eq!(noise.draws, 2 * 5);
    assert!(to_vec(&s).iter().all(|v| v.is_finite()));
}

#[derive(Debug, Deserialize)]
struct CfgPpCase {
    name: String,
    steps: usize,
    scale: f64,
    karras: bool,
}

#[derive(Debug, Deserialize)]
struct CfgPpCases {
    cases: Vec<CfgPpCase>,
}

/// Euler CFG++ against ComfyUI's `sample_euler_cfg_pp` loop (k-diffusion's `to_d`, diffusers' Euler sigmas
/// for SD 1.5's config) with a fixed synthetic epsilon model; unguided, it is plain Euler.
#[test]
fn euler_cfg_pp_matches_comfyui_s_loop() {
    let dir = golden_dir();
    let cases: CfgPpCases = serde_json::from_str(&std::fs::read_to_string(dir.join("euler_cfg_pp.json")).expect("cases")).expect("json");
    let g = candle_core::safetensors::load(dir.join("euler_cfg_pp.safetensors"), &Device::Cpu).expect("goldens");
    let cfg = SchedulerConfig::from_json_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/schedulers/sd15.json")).expect("config"),
    )
    .expect("config");
    assert_eq!(cases.cases.len(), 3);
    for c in &cases.cases {
        let schedule = if c.karras { SigmaSchedule::Karras } else { SigmaSchedule::Default };
        let mut sched = build_scheduler(Sampler::new(SamplerKind::EulerCfgPp, schedule), &cfg, c.steps).expect("build");
        assert_eq!(sched.kind(), SamplerKind::EulerCfgPp);
        let sigmas: Vec<f32> = g[&format!("{}.sigmas", c.name)].to_vec1().expect("sigmas");
        let ours = sched.sigmas().expect("sigmas");
        assert_eq!(ours.len(), sigmas.len(), "{}", c.name);
        for (a, b) in ours.iter().zip(&sigmas) {
            assert!((*a as f32 - b).abs() <= 1e-5 * b.max(1.0), "{}: sigma {a} vs {b}", c.name);
        }
        let mut x = g[&format!("{}.x_init", c.name)].clone();
        let steps = &g[&format!("{}.steps", c.name)];
        for i in 0..sched.timesteps().len() {
            let input = sched.scale_model_input(&x, i).expect("scale");
            let uncond = (&input * 0.3).expect("uncond");
            let cond = ((&input * 0.25).expect("cond") + 0.1).expect("cond");
            x = sched.step_guided(&uncond, &cond, c.scale, i, &x, &mut NoNoise).expect("step");
            let want = steps.get(i).expect("step golden");
            let d = (&x - &want).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
            let m = want.abs().and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("max");
            assert!(d <= 1e-5 * m.max(1.0), "{} step {i}: max diff {d} (max |golden| {m})", c.name);
        }
    }
    // Given one prediction (unguided) CFG++ is Euler's step; with equal predictions too, up to rounding.
    let mut a = build_scheduler(SamplerKind::EulerCfgPp, &cfg, 10).expect("cfg++");
    let mut b = build_scheduler(SamplerKind::Euler, &cfg, 10).expect("euler");
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).expect("x");
    let eps = (&x * 0.2).expect("eps");
    let values = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
    let euler = values(b.step(&eps, 3, &x, &mut NoNoise).expect("b"));
    assert_eq!(values(a.step(&eps, 3, &x, &mut NoNoise).expect("a")), euler);
    let guided = values(a.step_guided(&eps, &eps, 1.0, 3, &x, &mut NoNoise).expect("a"));
    assert!(guided.iter().zip(&euler).all(|(g, e)| (g - e).abs() < 1e-5), "{guided:?} vs {euler:?}");
    assert!(SamplerKind::EulerCfgPp.needs_uncond() && !SamplerKind::Euler.needs_uncond());
    assert_eq!("Euler CFG++".parse::<Sampler>().expect("name").kind, SamplerKind::EulerCfgPp);
}

/// Edge cases no golden covers: the longest schedules multistep samplers accept, few steps over a wide sigma
/// range (cosine betas), table schedules ending at sigma_min, and reuse after img2img.
#[test]
fn edge_schedules_stay_finite_and_reusable() {
    let finite = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values").iter().all(|v| v.is_finite());
    let run = |kind: SamplerKind, schedule: Option<SigmaSchedule>, cfg: &SchedulerConfig, steps: usize| -> Tensor {
        let mut s = build_scheduler(Sampler { kind, schedule }, cfg, steps).unwrap_or_else(|e| panic!("{kind} {steps}: {e}"));
        let mut noise = SeededNoise::new(3);
        let mut x = (Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).expect("x") * s.init_noise_sigma()).expect("x");
        for i in 0..s.timesteps().len() {
            let input = s.scale_model_input(&x, i).expect("scale");
            let eps = (&input * 0.5).expect("eps");
            x = s.step_guided(&eps, &eps, 1.0, i, &x, &mut noise).expect("step");
        }
        x
    };
    let sd15 = SchedulerConfig::sd15();
    // The multistep samplers take at most T − 1 steps (at T the spacing repeats a timestep).
    for kind in [SamplerKind::DpmPp2m, SamplerKind::DpmPp2mSde, SamplerKind::DpmPp3mSde, SamplerKind::Deis, SamplerKind::UniPc] {
        assert!(finite(&run(kind, None, &sd15, 999)), "{kind} at 999 steps");
        assert!(build_scheduler(kind, &sd15, 1000).is_err(), "{kind} at 1000 steps");
    }
    // Cosine betas span sigmas from ~0.006 to ~2e4: DPM2 a's sigma_down rounds to 0 before the end.
    let cosine = SchedulerConfig { beta_schedule: Some(sd_core::schedulers::BetaSchedule::SquaredcosCapV2), ..SchedulerConfig::sd15() };
    for kind in SamplerKind::ALL {
        for steps in [2, 3] {
            if build_scheduler(kind, &cosine, steps).is_ok() {
                assert!(finite(&run(kind, None, &cosine, steps)), "{kind} {steps} steps on cosine betas");
            }
        }
    }
    // DEIS on a table schedule ends at sigma_min, not above it.
    for schedule in [SigmaSchedule::SgmUniform, SigmaSchedule::Simple, SigmaSchedule::AlignYourSteps] {
        let s = build_scheduler(Sampler::new(SamplerKind::Deis, schedule), &sd15, 10).expect("deis");
        let last = *s.sigmas().expect("sigmas").last().expect("last");
        assert!(last <= 0.0292 + 1e-4, "DEIS {schedule:?} ends at {last}");
    }
    // TCD and LCM run the full schedule again after an img2img start.
    for kind in [SamplerKind::Tcd, SamplerKind::Lcm] {
        let mut s = build_scheduler(kind, &sd15, 4).expect("build");
        let full = s.timesteps().to_vec();
        s.begin_at_strength(0.5).expect("strength");
        assert_ne!(s.timesteps(), full.as_slice(), "{kind}: img2img truncates");
        s.reset();
        assert_eq!(s.timesteps(), full.as_slice(), "{kind}: reset restores the schedule");
    }
}
