//! The `kubectl keyward` plugin; everything lives in `keyward::plugin`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyward::plugin::execute(keyward::plugin::Plugin::parse()).await
}
