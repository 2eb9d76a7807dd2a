//! Shared pieces of the criterion benches: random weights (from `sd_toolkit::random`) and the median export.

pub use sd_toolkit::random::random_vb;

/// Whether `SD_BENCH_SMALL` asks for tiny shapes (to smoke-test the harness in seconds).
pub fn small() -> bool {
    std::env::var_os("SD_BENCH_SMALL").is_some_and(|v| v != "0")
}
