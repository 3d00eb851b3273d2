//! The `[cloudevents]` section: where in a CloudEvent each usage field is
//! read from, with defaults and per-tenant overrides, validated at load.
//!
//! A path is dotted: its first segment names a CloudEvent attribute
//! (`subject`, `type`, `time`, an extension attribute) or `data`, and the
//! rest walk into `data`'s JSON objects (`data.usage.prompt_tokens`). A key
//! takes one path or a list; the first path present (and not `null`) wins,
//! so one default reads LiteLLM's, OpenMeter's and the native field names.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::SchemaError;

/// The `[cloudevents]` section as written: every key optional; a missing one
/// falls back to the section's value, then to [`Mapping::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudEventsConfig {
    pub user_id: Option<Paths>,
    pub timestamp: Option<Paths>,
    pub feature: Option<Paths>,
    pub model: Option<Paths>,
    pub provider: Option<Paths>,
    pub customer_id: Option<Paths>,
    pub input_tokens: Option<Paths>,
    pub output_tokens: Option<Paths>,
    pub cached_input_tokens: Option<Paths>,
    pub reasoning_tokens: Option<Paths>,
    pub cost_usd: Option<Paths>,
    pub revenue_usd: Option<Paths>,
    /// A token count whose kind is named by `token_type` (OpenMeter's
    /// documented `{"tokens": 123, "type": "output"}`).
    pub tokens: Option<Paths>,
    pub token_type: Option<Paths>,
    /// `[cloudevents.tenants.<id>]`: the same keys, for one tenant.
    #[serde(default)]
    pub tenants: BTreeMap<String, CloudEventsConfig>,
}

/// One or more paths, as a TOML string or array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

impl Paths {
    fn list(&self) -> Vec<&str> {
        match self {
            Paths::One(p) => vec![p.as_str()],
            Paths::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
    }
}

/// A path checked and split into segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    pub text: String,
    pub segments: Vec<String>,
}

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("{text:?} has an empty segment; write dotted keys like \"data.model\""));
        }
        // CloudEvents attribute names are lowercase letters and digits.
        let first = &segments[0];
        if !first.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(format!("{text:?} must start with a CloudEvent attribute (a-z, 0-9) or \"data\""));
        }
        if first != "data" && segments.len() > 1 {
            return Err(format!("{text:?}: only \"data\" has keys below it"));
        }
        Ok(FieldPath { text: text.to_owned(), segments })
    }
}

/// Where each usage field is read from, resolved for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub user_id: Vec<FieldPath>,
    pub timestamp: Vec<FieldPath>,
    pub feature: Vec<FieldPath>,
    pub model: Vec<FieldPath>,
    pub provider: Vec<FieldPath>,
    pub customer_id: Vec<FieldPath>,
    pub input_tokens: Vec<FieldPath>,
    pub output_tokens: Vec<FieldPath>,
    pub cached_input_tokens: Vec<FieldPath>,
    pub reasoning_tokens: Vec<FieldPath>,
    pub cost_usd: Vec<FieldPath>,
    pub revenue_usd: Vec<FieldPath>,
    pub tokens: Vec<FieldPath>,
    pub token_type: Vec<FieldPath>,
}

/// The built-in paths: LiteLLM's `openmeter` callback (`data.model`,
/// `data.cost`, `data.prompt_tokens`, `data.completion_tokens`), OpenMeter's
/// documented LLM events (`data.model`, `data.provider`, `data.tokens` with
/// `data.type`, the LangChain handler's `data.promptTokens` and
/// `data.completionTokens`), and the contract's own names.
const DEFAULTS: &[(&str, &[&str])] = &[
    ("user_id", &["subject"]),
    ("timestamp", &["time"]),
    ("feature", &["type"]),
    ("model", &["data.model"]),
    ("provider", &["data.provider"]),
    ("customer_id", &["data.customer_id"]),
    ("input_tokens", &["data.input_tokens", "data.prompt_tokens", "data.promptTokens", "data.inputTokens"]),
    ("output_tokens", &["data.output_tokens", "data.completion_tokens", "data.completionTokens", "data.outputTokens"]),
    ("cached_input_tokens", &["data.cached_input_tokens"]),
    ("reasoning_tokens", &["data.reasoning_tokens"]),
    ("cost_usd", &["data.cost_usd", "data.cost"]),
    ("revenue_usd", &["data.revenue_usd", "data.revenue"]),
    ("tokens", &["data.tokens"]),
    ("token_type", &["data.type"]),
];

impl Default for Mapping {
    fn default() -> Self {
        let none = CloudEventsConfig::default();
        // The defaults are constants checked by a test; none fails to parse.
        none.resolve_one(&none, "cloudevents").unwrap_or_else(|_| unreachable!("built-in cloudevents paths parse"))
    }
}

/// Every tenant's mapping, resolved once at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mappings {
    pub default: Mapping,
    pub tenants: BTreeMap<String, Mapping>,
}

impl Mappings {
    pub fn for_tenant(&self, tenant: &str) -> &Mapping {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }
}

impl CloudEventsConfig {
    /// Resolves defaults and overrides, naming the key of the first bad path.
    pub fn resolve(&self) -> Result<Mappings, SchemaError> {
        let default = self.resolve_one(&CloudEventsConfig::default(), "cloudevents")?;
        let mut tenants = BTreeMap::new();
        for (id, over) in &self.tenants {
            let prefix = format!("cloudevents.tenants.{id}");
            if !over.tenants.is_empty() {
                return Err(SchemaError::config(format!("{prefix}.tenants"), "tenant overrides do not nest"));
            }
            tenants.insert(id.clone(), over.resolve_one(self, &prefix)?);
        }
        Ok(Mappings { default, tenants })
    }

    /// Checks what serde cannot; every mode serving `/api/v1/events` runs it.
    pub fn validate(&self) -> Result<(), SchemaError> {
        self.resolve().map(|_| ())
    }

    /// This section's paths, else `parent`'s, else the built-in defaults.
    fn resolve_one(&self, parent: &CloudEventsConfig, prefix: &str) -> Result<Mapping, SchemaError> {
        let pick = |key: &str, mine: &Option<Paths>, theirs: &Option<Paths>| -> Result<Vec<FieldPath>, SchemaError> {
            let builtin = DEFAULTS.iter().find(|(k, _)| *k == key).map_or(&[][..], |(_, ps)| *ps);
            let chosen = mine.as_ref().or(theirs.as_ref()).map_or_else(|| builtin.to_vec(), Paths::list);
            if chosen.is_empty() {
                return Err(SchemaError::config(format!("{prefix}.{key}"), "must name at least one path"));
            }
            chosen
                .into_iter()
                .map(|p| FieldPath::parse(p).map_err(|m| SchemaError::config(format!("{prefix}.{key}"), m)))
                .collect()
        };
        Ok(Mapping {
            user_id: pick("user_id", &self.user_id, &parent.user_id)?,
            timestamp: pick("timestamp", &self.timestamp, &parent.timestamp)?,
            feature: pick("feature", &self.feature, &parent.feature)?,
            model: pick("model", &self.model, &parent.model)?,
            provider: pick("provider", &self.provider, &parent.provider)?,
            customer_id: pick("customer_id", &self.customer_id, &parent.customer_id)?,
            input_tokens: pick("input_tokens", &self.input_tokens, &parent.input_tokens)?,
            output_tokens: pick("output_tokens", &self.output_tokens, &parent.output_tokens)?,
            cached_input_tokens: pick("cached_input_tokens", &self.cached_input_tokens, &parent.cached_input_tokens)?,
            reasoning_tokens: pick("reasoning_tokens", &self.reasoning_tokens, &parent.reasoning_tokens)?,
            cost_usd: pick("cost_usd", &self.cost_usd, &parent.cost_usd)?,
            revenue_usd: pick("revenue_usd", &self.revenue_usd, &parent.revenue_usd)?,
            tokens: pick("tokens", &self.tokens, &parent.tokens)?,
            token_type: pick("token_type", &self.token_type, &parent.token_type)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Mappings, SchemaError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            cloudevents: CloudEventsConfig,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| SchemaError::ConfigFile(e.to_string()))?;
        doc.cloudevents.resolve()
    }

    #[test]
    fn defaults_then_section_then_tenant() {
        let m = load("[cloudevents]\nmodel = [\"data.llm.model\", \"data.model\"]\n[cloudevents.tenants.acme]\ncost_usd = \"data.usd\"\n").unwrap();
        let texts = |ps: &[FieldPath]| ps.iter().map(|p| p.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&Mapping::default().cost_usd), ["data.cost_usd", "data.cost"]);
        assert_eq!(texts(&m.for_tenant("globex").model), ["data.llm.model", "data.model"]);
        assert_eq!(texts(&m.for_tenant("globex").cost_usd), ["data.cost_usd", "data.cost"]);
        assert_eq!(texts(&m.for_tenant("acme").model), ["data.llm.model", "data.model"]);
        assert_eq!(texts(&m.for_tenant("acme").cost_usd), ["data.usd"]);
        assert_eq!(m.for_tenant("acme").user_id[0].segments, ["subject"]);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("[cloudevents]\nmodel = \"data..model\"\n", "cloudevents.model"),
            ("[cloudevents]\nuser_id = []\n", "cloudevents.user_id"),
            ("[cloudevents]\nfeature = \"Type\"\n", "cloudevents.feature"),
            ("[cloudevents]\nfeature = \"subject.name\"\n", "cloudevents.feature"),
            ("[cloudevents.tenants.acme]\ncost_usd = \"data.\"\n", "cloudevents.tenants.acme.cost_usd"),
            ("[cloudevents.tenants.acme.tenants.x]\n", "cloudevents.tenants.acme.tenants"),
        ] {
            let err = load(text).expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = load("[cloudevents]\nmodle = \"data.model\"\n").unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }
}
