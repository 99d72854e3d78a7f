//! Which key of the document a place in it belongs to, so that a refusal from
//! serde, which knows only the place, names the key like every other message.

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, line_column};

/// `error`, raised while reading the document `text` into its raw form, as a
/// [`ConfigError`] naming the file, the place and the key.
pub fn deserialize_error(text: &str, origin: &Path, error: &toml::de::Error) -> ConfigError {
    let span = error.span();
    let location = span.as_ref().map(|s| line_column(text, s.start));
    let key = span.and_then(|s| key_at(text, s.start)).unwrap_or_default();
    let message = error.message().to_string();
    if let Some(expected) = unknown_field(&message) {
        return ConfigError::UnknownKey {
            path: origin.to_path_buf(),
            location,
            key,
            expected,
        };
    }
    ConfigError::Invalid {
        path: origin.to_path_buf(),
        location,
        key,
        message,
    }
}

/// The keys serde lists after refusing an unknown one ("unknown field `x`,
/// expected one of `a`, `b`"), or `None` for any other refusal.
fn unknown_field(message: &str) -> Option<Vec<String>> {
    let rest = message.strip_prefix("unknown field `")?;
    let (_, listed) = rest.split_once("`, expected ")?;
    Some(
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// The path of the innermost key (`listen[1].address`) whose name or value
/// covers byte `offset` of `text`.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    let root = DeTable::parse(text).ok()?;
    find_in_table(root.get_ref(), offset, "")
}

fn covers(span: Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn find_in_table(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if let Some(inner) = find_in_value(value.get_ref(), offset, &path) {
            return Some(inner);
        }
        if covers(key.span(), offset) || covers(value.span(), offset) {
            return Some(path);
        }
    }
    None
}

fn find_in_value(value: &DeValue<'_>, offset: usize, path: &str) -> Option<String> {
    match value {
        DeValue::Table(table) => find_in_table(table, offset, path),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let path = format!("{path}[{i}]");
            find_in_value(item.get_ref(), offset, &path)
                .or_else(|| covers(item.span(), offset).then_some(path))
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_place() {
        let text = "command = [\"/bin/app\", 3]\n[limits]\nmax_keys = 3\n[[listen]]\nnetwork = \"tcp\"\n[[listen]]\naddress = \":80\"\n";
        let at = |needle: &str| key_at(text, text.find(needle).unwrap());
        assert_eq!(at("3]").as_deref(), Some("command[1]"));
        assert_eq!(at("max_keys").as_deref(), Some("limits.max_keys"));
        assert_eq!(at("\"tcp\"").as_deref(), Some("listen[0].network"));
        assert_eq!(at("address").as_deref(), Some("listen[1].address"));
    }

    #[test]
    fn serde_lists_the_known_keys() {
        assert_eq!(
            unknown_field("unknown field `adress`, expected one of `network`, `address`"),
            Some(vec!["network".to_string(), "address".to_string()])
        );
        assert_eq!(
            unknown_field("unknown field `x`, expected `a` or `b`"),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(unknown_field("expected a string, found integer 3"), None);
    }
}
