//! Picking the device a model runs on.

use candle_core::{DType, Device};

/// The best device compiled in and present: CUDA, then Metal, else the CPU. A GPU backend that is
/// compiled in but cannot open device `ordinal` (no GPU, no driver) falls back to the CPU instead
/// of failing; the second value then says why, for a log line.
pub fn auto_device(ordinal: usize) -> (Device, Option<String>) {
    let mut why = Vec::new();
    if candle_core::utils::cuda_is_available() {
        match Device::new_cuda(ordinal) {
            Ok(d) => return (d, None),
            Err(e) => why.push(format!("CUDA device {ordinal} cannot be opened ({})", first_line(&e))),
        }
    }
    if candle_core::utils::metal_is_available() {
        match Device::new_metal(ordinal) {
            Ok(d) => return (d, None),
            Err(e) => why.push(format!("Metal device {ordinal} cannot be opened ({})", first_line(&e))),
        }
    }
    let note = (!why.is_empty()).then(|| format!("{}; running on the CPU", why.join("; ")));
    (Device::Cpu, note)
}

/// The first line of an error: candle appends a backtrace to device errors, which a log line or a
/// user does not need.
pub fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_backend_auto_is_the_cpu_without_a_note() {
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            let (d, note) = auto_device(0);
            assert!(d.is_cpu());
            assert!(note.is_none());
        }
    }

    #[test]
    fn first_line_drops_backtraces() {
        assert_eq!(first_line(&"DriverError(NO_DEVICE)\n   0: candle_core::error::Error::bt"), "DriverError(NO_DEVICE)");
        assert_eq!(first_line(&""), "");
    }
}

/// Parses a dtype as users write it: `f32`/`fp32`/`float32`, `f16`/`fp16`/`float16`/`half`,
/// `bf16`/`bfloat16` (any case).
pub fn parse_dtype(s: &str) -> crate::Result<DType> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => return Err(crate::Error::UnknownDtype(s.to_string())),
    })
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    #[test]
    fn dtypes_parse_as_users_write_them() {
        for (names, dtype) in [(["f32", "FP32", "float32"], DType::F32), (["f16", "half", " Float16 "], DType::F16), (["bf16", "BF16", "bfloat16"], DType::BF16)] {
            for n in names {
                assert_eq!(parse_dtype(n).expect(n), dtype);
            }
        }
        let e = parse_dtype("f64").expect_err("f64");
        assert_eq!(e.to_string(), "unknown dtype \"f64\": use f32, f16 or bf16");
    }
}
