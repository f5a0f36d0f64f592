//! The `cartedge` binary: see `cartedge::cli`.

use clap::Parser;

/// mimalloc: the request path allocates many small short-lived objects across worker threads,
/// where glibc malloc spent ~12 % of the edge's CPU in a cache-hit profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cartedge::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cartedge: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cartedge::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cartedge: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
