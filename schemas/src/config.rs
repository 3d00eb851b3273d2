//! Configuration plumbing shared by the services: TOML files with env overrides.
//!
//! A variable `METERLINE_KAFKA__BROKERS=host:9092` overrides `kafka.brokers`:
//! the prefix is dropped, `__` separates levels, names are lowercased. A value
//! is read as a TOML literal when it is one (`8`, `true`, `["a","b"]`) and as a
//! string otherwise. The environment is passed in, so this module does no I/O.

use crate::SchemaError;

/// The prefix of every override variable.
pub const ENV_PREFIX: &str = "METERLINE_";

/// Parses `text` as TOML and applies overrides from `vars` (name, value).
/// Variables not starting with [`ENV_PREFIX`] are ignored.
pub fn load_toml_with_env<T: serde::de::DeserializeOwned>(
    text: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SchemaError> {
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| SchemaError::config("(file)", e.to_string()))?;
    let mut overrides: Vec<(String, String)> =
        vars.into_iter().filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|rest| (rest.to_lowercase(), v))).collect();
    // Deterministic order, so two variables addressing one key resolve the same way every time.
    overrides.sort();
    for (path, value) in overrides {
        let parts: Vec<&str> = path.split("__").collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(SchemaError::config(format!("{ENV_PREFIX}{}", path.to_uppercase()), "has an empty path segment"));
        }
        set_path(&mut doc, &parts, literal(&value))
            .map_err(|message| SchemaError::config(parts.join("."), message))?;
    }
    toml::Value::Table(doc).try_into().map_err(|e: toml::de::Error| SchemaError::config("(config)", e.message().to_owned()))
}

fn literal(value: &str) -> toml::Value {
    match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.to_owned())),
        Err(_) => toml::Value::String(value.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, parts: &[&str], value: toml::Value) -> Result<(), String> {
    match parts {
        [] => Ok(()),
        [last] => {
            table.insert((*last).to_owned(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table.entry((*first).to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => set_path(inner, rest, value),
                _ => Err(format!("cannot set a sub-key of {first}, which is not a table")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        kafka: Kafka,
        #[serde(default)]
        port: u16,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        brokers: String,
        #[serde(default)]
        partitions: u32,
    }

    #[test]
    fn env_overrides_file() {
        let vars = [
            ("METERLINE_KAFKA__BROKERS".to_owned(), "h:1".to_owned()),
            ("METERLINE_KAFKA__PARTITIONS".to_owned(), "8".to_owned()),
            ("METERLINE_PORT".to_owned(), "99".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let s: Sample = load_toml_with_env("[kafka]\nbrokers = \"x:2\"\n", vars).unwrap();
        assert_eq!((s.kafka.brokers.as_str(), s.kafka.partitions, s.port), ("h:1", 8, 99));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\nbrokerz = 1\n", []).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\n", [("METERLINE_KAFKA__TYPO".into(), "1".into())]);
        assert!(err.unwrap_err().to_string().contains("typo"));
    }
}
