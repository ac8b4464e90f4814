//! How many users the ACT benchmarks (`micro`, `act_floor`) load. Included
//! by each with `#[path]`: benchmark targets share no crate of their own.

/// 1M under `cargo bench`; `CONSENTRY_BENCH_USERS` overrides it.
pub fn users() -> usize {
    // `cargo test --all-targets` runs benchmarks once without `--bench`, as
    // a smoke test: a small table keeps that quick in a debug build.
    let default = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        2_000
    };
    std::env::var("CONSENTRY_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
