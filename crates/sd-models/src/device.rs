//! Picking the device a model runs on.

use candle_core::Device;

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
