//! Why a config could not be loaded, as one line naming the file, the place in
//! it and the key.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// 1-based line and column (in characters) of a place in the file.
pub type Location = Option<(usize, usize)>;

/// Why a config could not be loaded. Each displays as one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {}", one_line(.path.display()), one_line(io_message(.error)))]
    Read { path: PathBuf, error: io::Error },
    #[error("{}{}: TOML syntax error: {}", one_line(.path.display()), format_location(*.location), one_line(.message))]
    Syntax {
        path: PathBuf,
        /// 1-based line and column, when the parser reports where.
        location: Location,
        message: String,
    },
    #[error("{}{}: unknown key `{}` (expected one of: {})", one_line(.path.display()), format_location(*.location), one_line(.key), .expected.join(", "))]
    UnknownKey {
        path: PathBuf,
        location: Location,
        key: String,
        expected: Vec<String>,
    },
    #[error("{}{}: key `{}` is missing: expected {expected}", one_line(.path.display()), format_location(*.location), one_line(.key))]
    Missing {
        path: PathBuf,
        /// Where the table that lacks the key is; none for the top level.
        location: Location,
        key: String,
        expected: String,
    },
    #[error("{}{}: key `{}`: {}", one_line(.path.display()), format_location(*.location), one_line(.key), one_line(.message))]
    Invalid {
        path: PathBuf,
        location: Location,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::UnknownKey { path, .. }
            | ConfigError::Missing { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// Where in the file, if the error is about a place in it.
    pub fn location(&self) -> Location {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { location, .. }
            | ConfigError::UnknownKey { location, .. }
            | ConfigError::Missing { location, .. }
            | ConfigError::Invalid { location, .. } => *location,
        }
    }
}

/// `text` with its control characters escaped (a newline as `\n`), so that an
/// error stays one line whatever the names and values it quotes from the file.
pub(crate) fn one_line(text: impl fmt::Display) -> String {
    let mut line = String::new();
    for c in text.to_string().chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

/// The io error without Rust's " (os error N)" suffix, which says nothing to an operator.
fn io_message(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

fn format_location(location: Location) -> String {
    location.map_or_else(String::new, |(line, column)| format!(":{line}:{column}"))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
