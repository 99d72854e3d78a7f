//! What an instance reports about itself with `Report(a{sv})`: its version,
//! commit, the tasks it is still working on and a free-form description.
//!
//! The broker keeps one [`AppReport`] per instance; each call names some keys
//! and replaces only those ([`AppReport::merge`]). Every string is bounded: an
//! instance's report is kept in the broker's memory and sent to every status
//! reader.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::{OwnedVariant, Variant as Value};

use crate::error::Error;

type Result<T> = std::result::Result<T, Error>;

/// The longest `version` or `commit`, in bytes.
pub const MAX_VERSION_BYTES: usize = 256;
/// The longest `description`, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;

/// The keys `Report` takes, with their D-Bus types, for messages.
pub const KEYS: &str = "version (s), commit (s), tasks (u) or description (s)";

const KNOWN: [&str; 4] = ["version", "commit", "tasks", "description"];

/// What one instance reported; a key it never named is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Requests or jobs it is still working on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One reported value, as far as the keys care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    Str(String),
    U32(u32),
    /// Any other D-Bus type, by its signature.
    Other(String),
}

impl AppReport {
    /// Reads the keys of one `Report` call: every key must be known, of its
    /// type and within its bound. The result names only the keys given.
    pub fn parse<'a>(entries: impl IntoIterator<Item = (&'a str, Reported)>) -> Result<AppReport> {
        let mut update = AppReport::default();
        for (key, value) in entries {
            match key {
                "version" => update.version = Some(bounded(key, value, MAX_VERSION_BYTES)?),
                "commit" => update.commit = Some(bounded(key, value, MAX_VERSION_BYTES)?),
                "description" => {
                    update.description = Some(bounded(key, value, MAX_DESCRIPTION_BYTES)?)
                }
                "tasks" => match value {
                    Reported::U32(n) => update.tasks = Some(n),
                    other => return Err(wrong_type(key, "u", &other)),
                },
                other => {
                    return Err(Error::invalid_argument(format!(
                        "unknown report key {other:?}: expected {KEYS}"
                    )));
                }
            }
        }
        Ok(update)
    }

    /// [`parse`](Self::parse) of the dictionary `Report` receives.
    pub fn from_dict(dict: &HashMap<String, OwnedVariant>) -> Result<AppReport> {
        AppReport::parse(
            dict.iter()
                .map(|(key, value)| (key.as_str(), Reported::from_value(value))),
        )
    }

    /// What a broker sent in `InstanceReported`, `Reports` or `Status()`: the
    /// keys this version knows, so that a newer broker may add some.
    pub fn from_broker(dict: &HashMap<String, OwnedVariant>) -> Result<AppReport> {
        AppReport::parse(
            dict.iter()
                .filter(|(key, _)| KNOWN.contains(&key.as_str()))
                .map(|(key, value)| (key.as_str(), Reported::from_value(value))),
        )
    }

    /// Replaces the keys `update` names; returns whether anything changed.
    pub fn merge(&mut self, update: AppReport) -> bool {
        let before = self.clone();
        let AppReport {
            version,
            commit,
            tasks,
            description,
        } = update;
        if version.is_some() {
            self.version = version;
        }
        if commit.is_some() {
            self.commit = commit;
        }
        if tasks.is_some() {
            self.tasks = tasks;
        }
        if description.is_some() {
            self.description = description;
        }
        *self != before
    }

    pub fn is_empty(&self) -> bool {
        *self == AppReport::default()
    }

    /// The keys it holds, as the `a{sv}` of `Report` and `InstanceReported`.
    pub fn to_dict(&self) -> HashMap<String, OwnedVariant> {
        let mut dict = HashMap::new();
        let mut put = |key: &str, value: Value<'_>| {
            if let Ok(value) = value.try_into_owned() {
                dict.insert(key.to_string(), value);
            }
        };
        if let Some(v) = &self.version {
            put("version", Value::from(v.as_str()));
        }
        if let Some(v) = &self.commit {
            put("commit", Value::from(v.as_str()));
        }
        if let Some(n) = self.tasks {
            put("tasks", Value::from(n));
        }
        if let Some(v) = &self.description {
            put("description", Value::from(v.as_str()));
        }
        dict
    }
}

impl Reported {
    pub fn from_value(value: &Value<'_>) -> Reported {
        match value {
            Value::Str(s) => Reported::Str(s.to_string()),
            Value::U32(n) => Reported::U32(*n),
            Value::Variant(inner) => Reported::Other(format!("v ({})", inner.value_signature())),
            other => Reported::Other(other.value_signature().to_string()),
        }
    }
}

fn bounded(key: &str, value: Reported, max: usize) -> Result<String> {
    match value {
        Reported::Str(s) if s.len() > max => Err(Error::limit_exceeded(format!(
            "report key {key:?} is {} bytes long: at most {max} bytes",
            s.len()
        ))),
        Reported::Str(s) => Ok(s),
        other => Err(wrong_type(key, "s", &other)),
    }
}

fn wrong_type(key: &str, expected: &str, got: &Reported) -> Error {
    let got = match got {
        Reported::Str(_) => "s",
        Reported::U32(_) => "u",
        Reported::Other(signature) => signature,
    };
    Error::invalid_argument(format!(
        "report key {key:?} must be of type {expected}, not {got}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn s(v: &str) -> Reported {
        Reported::Str(v.into())
    }

    #[test]
    fn a_call_replaces_only_the_keys_it_names() {
        let mut report = AppReport::default();
        let first = AppReport::parse([
            ("version", s("1.2")),
            ("commit", s("abc")),
            ("tasks", Reported::U32(3)),
        ])
        .unwrap();
        assert!(report.merge(first));
        assert!(report.merge(AppReport::parse([("tasks", Reported::U32(2))]).unwrap()));
        assert_eq!(
            report,
            AppReport {
                version: Some("1.2".into()),
                commit: Some("abc".into()),
                tasks: Some(2),
                description: None,
            }
        );
        assert!(!report.merge(AppReport::parse([("tasks", Reported::U32(2))]).unwrap()));
        assert!(!report.merge(AppReport::default()));
        assert!(report.merge(AppReport::parse([("description", s("warming up"))]).unwrap()));
        assert_eq!(report.description.as_deref(), Some("warming up"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let err = AppReport::parse([("verison", s("1"))]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("\"verison\""), "{err}");
        assert!(err.message().contains("version (s)"), "{err}");

        let err = AppReport::parse([("tasks", s("3"))]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            err.message(),
            "report key \"tasks\" must be of type u, not s"
        );

        let err = AppReport::parse([("version", Reported::U32(1))]).unwrap_err();
        assert_eq!(
            err.message(),
            "report key \"version\" must be of type s, not u"
        );

        let err = AppReport::parse([("commit", Reported::Other("x".into()))]).unwrap_err();
        assert_eq!(
            err.message(),
            "report key \"commit\" must be of type s, not x"
        );
    }

    #[test]
    fn strings_are_bounded() {
        let at_limit = "v".repeat(MAX_VERSION_BYTES);
        assert!(AppReport::parse([("version", s(&at_limit))]).is_ok());
        let err =
            AppReport::parse([("commit", s(&"c".repeat(MAX_VERSION_BYTES + 1)))]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::LimitExceeded);
        assert_eq!(
            err.message(),
            "report key \"commit\" is 257 bytes long: at most 256 bytes"
        );

        // Bytes, not characters.
        let err = AppReport::parse([("description", s(&"é".repeat(513)))]).unwrap_err();
        assert!(
            err.message().contains("1026 bytes long: at most 1024"),
            "{err}"
        );
        assert!(AppReport::parse([("description", s(&"é".repeat(512)))]).is_ok());
    }

    #[test]
    fn the_dictionary_round_trips() {
        let report = AppReport {
            version: Some("2".into()),
            commit: None,
            tasks: Some(0),
            description: Some("".into()),
        };
        let dict = report.to_dict();
        assert_eq!(dict.len(), 3);
        assert_eq!(AppReport::from_dict(&dict).unwrap(), report);

        let mut nested = HashMap::new();
        nested.insert(
            "tasks".to_string(),
            Value::Variant(Box::new(Value::from(3u32)))
                .try_into_owned()
                .unwrap(),
        );
        let err = AppReport::from_dict(&nested).unwrap_err();
        assert_eq!(
            err.message(),
            "report key \"tasks\" must be of type u, not v (u)"
        );
    }
}
