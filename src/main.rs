//! The `cartedge` binary: the command line ([`cli`]) over the service library, the local
//! cluster launcher ([`local`]) over the `cartedge-dev` tooling, and the load generator
//! ([`loadgen`]). None of these modules is part of the library.

mod cli;
mod drill;
mod loadgen;
mod local;

use clap::Parser;

/// mimalloc: the request path allocates many small short-lived objects across worker threads,
/// where glibc malloc spent ~12 % of the edge's CPU in a cache-hit profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let arguments = cli::Cli::parse();
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
    match runtime.block_on(cli::run(arguments)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cartedge: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
