//! Configuration plumbing shared by the services: TOML files with env overrides.
//!
//! A variable `METERLINE_KAFKA__BROKERS=host:9092` overrides `kafka.brokers`:
//! the prefix is dropped, `__` separates levels, names are lowercased. Only
//! variables naming one of the config's sections apply, so that other
//! `METERLINE_*` variables (the test stack's, `METERLINE_CONFIG`) are left
//! alone; below a section, an unknown key is an error like one in the file.
//! A value is read as a TOML literal when it is one (`8`, `true`, `["a","b"]`)
//! and as a string otherwise. The environment is passed in: no I/O here.

use crate::SchemaError;

/// The prefix of every override variable.
pub const ENV_PREFIX: &str = "METERLINE_";

/// Parses `text` as TOML and applies overrides from `vars` (name, value) that
/// address one of `sections` as `METERLINE_<SECTION>__<KEY>`.
pub fn load_toml_with_env<T: serde::de::DeserializeOwned>(
    text: &str,
    sections: &[&str],
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SchemaError> {
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| SchemaError::ConfigFile(e.to_string().trim_end().to_owned()))?;
    let mut overrides: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|rest| (rest.to_lowercase(), v)))
        .filter(|(path, _)| sections.iter().any(|s| path.strip_prefix(s).is_some_and(|rest| rest.starts_with("__"))))
        .collect();
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
    // Re-read as text rather than converting the table: only errors from text
    // carry a position, and the quoted line shows the offending key.
    let merged = toml::to_string(&doc).map_err(|e| SchemaError::ConfigFile(e.to_string()))?;
    let de = toml::Deserializer::parse(&merged).map_err(|e| SchemaError::ConfigFile(e.to_string().trim_end().to_owned()))?;
    // The position alone can point at a nested key (`zz = 1` under a table
    // given where a word belongs); the path names the key the schema has.
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string().trim_end().to_owned();
        SchemaError::ConfigFile(if path == "." { message } else { format!("at `{path}`: {message}") })
    })
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
        server: Server,
    }
    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    struct Server {
        port: u16,
        #[serde(default)]
        mode: Mode,
    }
    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        #[default]
        Allow,
        Deny,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        brokers: String,
        #[serde(default)]
        partitions: u32,
    }

    const SECTIONS: &[&str] = &["kafka", "server"];

    #[test]
    fn env_overrides_file() {
        let vars = [
            ("METERLINE_KAFKA__BROKERS".to_owned(), "h:1".to_owned()),
            ("METERLINE_KAFKA__PARTITIONS".to_owned(), "8".to_owned()),
            ("METERLINE_SERVER__PORT".to_owned(), "99".to_owned()),
            ("METERLINE_PROMTOOL".to_owned(), "/usr/bin/promtool".to_owned()),
            ("METERLINE_KAFKAESQUE__X".to_owned(), "ignored".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let s: Sample = load_toml_with_env("[kafka]\nbrokers = \"x:2\"\n", SECTIONS, vars).unwrap();
        assert_eq!((s.kafka.brokers.as_str(), s.kafka.partitions, s.server.port), ("h:1", 8, 99));
        assert!(matches!(s.server.mode, Mode::Allow), "the default when unset");
        let vars = [("METERLINE_SERVER__PORT".to_owned(), "1".to_owned()), ("METERLINE_SERVER__MODE".to_owned(), "deny".to_owned())];
        let s: Sample = load_toml_with_env("[kafka]\nbrokers = \"x\"\n", SECTIONS, vars).unwrap();
        assert!(matches!(s.server.mode, Mode::Deny));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\nbrokerz = 1\n", SECTIONS, []).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\n", SECTIONS, [("METERLINE_KAFKA__TYPO".into(), "1".into())]);
        assert!(err.unwrap_err().to_string().contains("typo"));
    }

    #[test]
    fn a_wrong_shape_names_its_key() {
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\n[server]\nport = 1\n[server.mode]\nzz_nested = 1\n", SECTIONS, []).unwrap_err();
        assert!(err.to_string().contains("server.mode"), "{err}");
        let vars = [("METERLINE_SERVER__MODE__ZZ".to_owned(), "1".to_owned())];
        let err = load_toml_with_env::<Sample>("[kafka]\nbrokers = \"x\"\n[server]\nport = 1\n", SECTIONS, vars).unwrap_err();
        assert!(err.to_string().contains("server.mode"), "{err}");
    }
}
