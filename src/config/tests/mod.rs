//! The config's messages, key by key, one module an area; the helpers here
//! parse a file as if read from [`ORIGIN`].

use super::*;

mod activation;
mod documents;
mod errors;
mod limits;
mod listen;
mod observe;
mod process;
mod release;

const ORIGIN: &str = "/etc/ally/web.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(ORIGIN), None)
}

/// The error message for `text`, checked to be one line naming the file.
fn error(text: &str) -> String {
    let message = parse(text)
        .expect_err("config should be refused")
        .to_string();
    assert!(message.starts_with(ORIGIN), "{message}");
    assert!(!message.contains('\n'), "{message}");
    message
}

fn with_command(rest: &str) -> String {
    format!("command = [\"/bin/app\"]\n{rest}")
}
