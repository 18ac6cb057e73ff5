//! The `keyward` binary; everything lives in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyward::cli::execute(keyward::cli::Cli::parse()).await
}
