//! The published `scheduler_config.json` of SD 1.5, SD 2.1, SDXL, SD-Turbo, FLUX.1-dev and FLUX.1-schnell
//! (fixtures/schedulers/): for every sampler, sigma schedule and 4, 20 and 50 steps, our timesteps and
//! sigmas equal what diffusers' `<Sampler>.from_config(file)` gives (tools/real_config_schedules.py).

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
    if ours.len() != theirs.len() {
        return Err(format!("{what}: {} values, diffusers has {}: {ours:?} vs {theirs:?}", ours.len(), theirs.len()));
    }
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        // diffusers keeps these in float32/float64 tensors; 1e-6 relative to the value (at least 1).
        if (a - b).abs() > 1e-6 * b.abs().max(1.0) {
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
