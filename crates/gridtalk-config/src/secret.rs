//! A string that must never be printed: tokens, app secrets, passwords.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret value. `Debug`, `Display` and `Serialize` print `***`; [`Secret::expose`] is the only
/// way to the value, so every use of it is visible in the code.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Numbers and booleans are accepted too, so env overrides like `...__PORT=9093` work.
        let value = toml::Value::deserialize(d)?;
        Ok(Secret(match value {
            toml::Value::String(s) => s,
            other => other.to_string(),
        }))
    }
}
