//! One Linear layer with half-precision weights on the CPU: time and peak RSS of candle's matmul
//! (which widens BF16 operands to whole F32 copies) against `sd_models::ops::Linear`'s panel
//! product, with F32 weights for scale. One variant per process, so each peak is its own:
//!
//! ```text
//! cargo bench -p sd-models --bench linear_bf16 -- VARIANT M K N [--runs R]
//! ```
//!
//! VARIANT: `candle-bf16` (BF16 weight and input, `candle_nn::Linear`), `ours-bf16` (the same
//! through `ops::Linear`), `ours-bf16-f32in` (BF16 weight, F32 input), `candle-f16` /
//! `ours-f16` (F16 weight and input), `f32` (F32 weight and input, candle's matmul, which
//! `ops::Linear` also runs). Prints one JSON line: best and median seconds, GFLOP/s, RSS with the
//! inputs built (`base_kib`), peak RSS while multiplying (`peak_kib`, VmHWM reset after setup) and
//! their difference (`transient_kib`). Never run in CI.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use half::{bf16, f16};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Values in [-1, 1) without an F32 staging copy (which would raise the peak before the product).
fn value(i: usize, seed: usize) -> f32 {
    ((i.wrapping_mul(2654435761).wrapping_add(seed * 97) % 2000) as f32) / 1000.0 - 1.0
}

fn tensor(len: usize, shape: (usize, usize), dtype: DType, seed: usize) -> AnyResult<Tensor> {
    let dev = Device::Cpu;
    Ok(match dtype {
        DType::BF16 => Tensor::from_vec((0..len).map(|i| bf16::from_f32(value(i, seed) * 0.05)).collect::<Vec<_>>(), shape, &dev)?,
        DType::F16 => Tensor::from_vec((0..len).map(|i| f16::from_f32(value(i, seed) * 0.05)).collect::<Vec<_>>(), shape, &dev)?,
        _ => Tensor::from_vec((0..len).map(|i| value(i, seed) * 0.05).collect::<Vec<f32>>(), shape, &dev)?,
    })
}

fn main() -> AnyResult<()> {
    // `cargo bench` appends `--bench`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let usage = "usage: linear_bf16 VARIANT M K N [--runs R]";
    let [variant, m, k, n, rest @ ..] = args.as_slice() else { return Err(usage.into()) };
    let (m, k, n): (usize, usize, usize) = (m.parse()?, k.parse()?, n.parse()?);
    let runs = match rest {
        [flag, r] if flag == "--runs" => r.parse()?,
        [] => 3,
        _ => return Err(usage.into()),
    };
    let (w_dtype, x_dtype, ours) = match variant.as_str() {
        "candle-bf16" => (DType::BF16, DType::BF16, false),
        "ours-bf16" => (DType::BF16, DType::BF16, true),
        "ours-bf16-f32in" => (DType::BF16, DType::F32, true),
        "candle-f16" => (DType::F16, DType::F16, false),
        "ours-f16" => (DType::F16, DType::F16, true),
        "f32" => (DType::F32, DType::F32, false),
        other => return Err(format!("unknown variant {other:?}; {usage}").into()),
    };
    let w = tensor(n * k, (n, k), w_dtype, 1)?;
    let b = tensor(n, (1, n), w_dtype, 2)?.flatten_all()?;
    let x = tensor(m * k, (m, k), x_dtype, 3)?;
    let layer: Box<dyn Module> =
        if ours { Box::new(sd_models::ops::Linear::new(w, Some(b))) } else { Box::new(candle_nn::Linear::new(w, Some(b))) };
    let base = status_kib("VmRSS");
    // Writing 5 resets VmHWM to the current RSS, so the peak below is the product's alone.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let mut secs = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let y = layer.forward(&x)?;
        secs.push(start.elapsed().as_secs_f64());
        if y.dims() != [m, n] || y.dtype() != x_dtype {
            return Err(format!("output {:?} {:?}", y.dims(), y.dtype()).into());
        }
        black_box(y);
    }
    let peak = status_kib("VmHWM");
    secs.sort_by(f64::total_cmp);
    let best = secs[0];
    println!(
        "{{\"variant\": \"{variant}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"best_s\": {best:.4}, \"median_s\": {:.4}, \"gflops\": {:.1}, \"base_kib\": {base}, \"peak_kib\": {peak}, \"transient_kib\": {}, \"threads\": {}}}",
        secs[secs.len() / 2],
        2.0 * (m * n * k) as f64 / best / 1e9,
        peak.saturating_sub(base),
        rayon::current_num_threads()
    );
    Ok(())
}
