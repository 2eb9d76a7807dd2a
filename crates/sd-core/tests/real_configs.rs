//! The published `scheduler_config.json` of SD 1.5, SD 2.1, SDXL, SD-Turbo, FLUX.1-dev and FLUX.1-schnell
//! (fixtures/schedulers/): for every sampler, sigma schedule and 4, 20 and 50 steps, our timesteps and
//! sigmas equal what diffusers' `<Sampler>.from_config(file)` gives (tools/real_config_schedules.py;
//! the samplers added for A1111 names: tools/scheduler_goldens_a1111.py, real_configs_a1111.json).

use std::path::PathBuf;

use sd_core::schedulers::flow_match::{FlowMatchConfig, FlowMatchEulerScheduler};
use sd_core::schedulers::{build_scheduler, Sampler, SamplerKind, SchedulerConfig, SigmaSchedule};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[derive(Deserialize)]
struct Case {
    model: String,
    sampler: String,
    schedule: String,
    steps: usize,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    image_seq_len: Option<usize>,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn close(what: &str, ours: &[f64], theirs: &[f64]) -> Result<(), String> {
    close_to(what, ours, theirs, 1e-6)
}

fn close_to(what: &str, ours: &[f64], theirs: &[f64], tol: f64) -> Result<(), String> {
    if ours.len() != theirs.len() {
        return Err(format!("{what}: {} values, diffusers has {}: {ours:?} vs {theirs:?}", ours.len(), theirs.len()));
    }
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        // diffusers keeps these in float32/float64 tensors; 1e-6 relative to the value (at least 1).
        if (a - b).abs() > tol * b.abs().max(1.0) {
            return Err(format!("{what}[{i}]: {a} vs diffusers {b}"));
        }
    }
    Ok(())
}

#[test]
fn published_configs_give_diffusers_schedules() {
    let text = std::fs::read_to_string(fixtures().join("goldens/schedulers/real_configs.json")).expect("real_configs.json");
    let cases: Cases = serde_json::from_str(&text).expect("json");
    assert!(cases.cases.len() >= 200, "{} cases", cases.cases.len());
    let mut failures = Vec::new();
    let mut models = std::collections::BTreeSet::new();
    for c in &cases.cases {
        models.insert(c.model.clone());
        let config_text = std::fs::read_to_string(fixtures().join(format!("schedulers/{}.json", c.model))).expect("config");
        let label = format!("{} {} {} {} steps", c.model, c.sampler, c.schedule, c.steps);
        if c.sampler == "flow_match_euler" {
            let cfg = FlowMatchConfig::from_json(&config_text).expect("flow-match config");
            let s = FlowMatchEulerScheduler::new(&cfg, c.steps, c.image_seq_len.expect("seq len")).expect("scheduler");
            let r = close(&format!("{label} timesteps"), s.timesteps(), &c.timesteps)
                .and_then(|()| close(&format!("{label} sigmas"), s.sigmas(), c.sigmas.as_deref().unwrap_or_default()));
            if let Err(e) = r {
                failures.push(e);
            }
            continue;
        }
        let cfg = SchedulerConfig::from_json_str(&config_text).expect("config");
        let kind = SamplerKind::ALL.into_iter().find(|k| k.id() == c.sampler).expect("sampler id");
        // A schedule named by the user wins over the config's flags; "default" follows the config.
        let schedule = match c.schedule.as_str() {
            "default" => None,
            "karras" => Some(SigmaSchedule::Karras),
            "exponential" => Some(SigmaSchedule::Exponential),
            other => panic!("unknown schedule {other}"),
        };
        let sched = build_scheduler(Sampler { kind, schedule }, &cfg, c.steps).expect("build");
        let mut r = close(&format!("{label} timesteps"), sched.timesteps(), &c.timesteps);
        if let (Ok(()), Some(theirs)) = (&r, &c.sigmas) {
            r = close(&format!("{label} sigmas"), sched.sigmas().unwrap_or_default(), theirs);
        }
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert_eq!(models.len(), 6, "{models:?}");
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.cases.len(), failures.join("\n"));
}

/// The samplers added for A1111 names (LMS, PNDM, DPM2, DPM2 a, DEIS, TCD) on the SD configs, from
/// real_configs_a1111.json (DPM2's sigmas are the noise level of every model call plus the final 0).
#[test]
fn published_configs_give_diffusers_schedules_for_a1111_samplers() {
    let text = std::fs::read_to_string(fixtures().join("goldens/schedulers/real_configs_a1111.json"))
        .expect("real_configs_a1111.json; run tools/scheduler_goldens_a1111.py");
    let cases: Cases = serde_json::from_str(&text).expect("json");
    assert!(cases.cases.len() >= 150, "{} cases", cases.cases.len());
    let mut failures = Vec::new();
    let mut samplers = std::collections::BTreeSet::new();
    for c in &cases.cases {
        let config_text = std::fs::read_to_string(fixtures().join(format!("schedulers/{}.json", c.model))).expect("config");
        let cfg = SchedulerConfig::from_json_str(&config_text).expect("config");
        let label = format!("{} {} {} {} steps", c.model, c.sampler, c.schedule, c.steps);
        let kind = SamplerKind::ALL.into_iter().find(|k| k.id() == c.sampler).expect("sampler id");
        samplers.insert(kind.id());
        let schedule = match c.schedule.as_str() {
            "default" => None,
            other => Some(other.parse::<SigmaSchedule>().expect("schedule")),
        };
        let sched = build_scheduler(Sampler { kind, schedule }, &cfg, c.steps).expect("build");
        // DPM2 a's midpoints come from σ_down = sqrt(σ_next² − σ_up²), which cancels in float32 on
        // the last steps; torch's vectorised f32 sqrt is not always correctly rounded there, so
        // those midpoints (and their timesteps) agree to 1e-4 only.
        let tol = if kind == SamplerKind::Dpm2Ancestral { 1e-4 } else { 1e-6 };
        let mut r = close_to(&format!("{label} timesteps"), sched.timesteps(), &c.timesteps, tol);
        if let (Ok(()), Some(theirs)) = (&r, &c.sigmas) {
            r = close_to(&format!("{label} sigmas"), sched.sigmas().unwrap_or_default(), theirs, tol);
        }
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(samplers.len() >= 6, "{samplers:?}");
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.cases.len(), failures.join("\n"));
}
