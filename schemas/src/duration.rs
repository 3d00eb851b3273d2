//! Times in configuration: a key named `*_ms` or `*_secs` takes a whole
//! number in that unit (as it always has) or a string with its own unit
//! (`"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"`), converted once, at load, to the
//! key's unit; a string that is not a whole number of it is refused there.

use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Number(u64),
    Unit(String),
}

/// `text` as a duration: digits followed by `ms`, `s`, `m`, `h` or `d`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration; write e.g. \"500ms\", \"5s\", \"2m\", \"1h\""))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => return Err(format!("{text:?}: unknown unit {other:?}; use ms, s, m, h or d")),
    };
    ms.map(Duration::from_millis).ok_or_else(|| format!("{text:?} is too long"))
}

fn read<'de, D: serde::Deserializer<'de>, T: TryFrom<u64>>(d: D, unit: Duration) -> Result<T, D::Error> {
    let n = match Text::deserialize(d)? {
        Text::Number(n) => n,
        Text::Unit(s) => {
            let d = parse(&s).map_err(serde::de::Error::custom)?;
            if d.as_nanos() % unit.as_nanos() != 0 {
                return Err(serde::de::Error::custom(format!("{s:?} is not a whole number of {}", if unit.as_secs() == 1 { "seconds" } else { "milliseconds" })));
            }
            u64::try_from(d.as_nanos() / unit.as_nanos()).map_err(|_| serde::de::Error::custom(format!("{s:?} is too long")))?
        }
    };
    T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
}

/// For `deserialize_with` on a `*_ms` key: a number of milliseconds, or a
/// string with a unit, read as milliseconds.
pub fn millis<'de, D: serde::Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    read(d, Duration::from_millis(1))
}

/// For `deserialize_with` on a `*_secs` key: a number of seconds, or a
/// string with a unit, read as whole seconds.
pub fn secs<'de, D: serde::Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    read(d, Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct C {
        #[serde(deserialize_with = "millis")]
        a_ms: u64,
        #[serde(deserialize_with = "secs")]
        b_secs: u32,
    }

    #[test]
    fn numbers_take_the_keys_unit_and_strings_their_own() {
        let c: C = toml::from_str("a_ms = 250\nb_secs = 3").unwrap();
        assert_eq!((c.a_ms, c.b_secs), (250, 3));
        let c: C = toml::from_str("a_ms = \"2s\"\nb_secs = \"2m\"").unwrap();
        assert_eq!((c.a_ms, c.b_secs), (2_000, 120));
        let e = toml::from_str::<C>("a_ms = 1\nb_secs = \"1500ms\"").unwrap_err().to_string();
        assert!(e.contains("whole number of seconds") && e.contains("b_secs"), "{e}");
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        let e = toml::from_str::<C>("a_ms = \"5 parsecs\"\nb_secs = 1").unwrap_err().to_string();
        assert!(e.contains("unknown unit") && e.contains("a_ms"), "{e}");
        assert!(toml::from_str::<C>("a_ms = -1\nb_secs = 1").is_err());
        assert!(parse("s").is_err());
    }
}
