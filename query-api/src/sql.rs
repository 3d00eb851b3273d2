//! Every query the API sends, built from whitelisted SQL fragments with `?`
//! placeholders; values are only ever bound, never formatted into the text.

use clickhouse::Client;
use clickhouse::query::Query;

/// A bound value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// SQL text with its placeholders' values, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sql {
    pub text: String,
    pub binds: Vec<Value>,
}

impl Sql {
    pub fn new(text: impl Into<String>) -> Sql {
        Sql { text: text.into(), binds: Vec::new() }
    }

    /// Appends SQL text (constant fragments only) and its values.
    pub fn push(&mut self, text: &str, binds: impl IntoIterator<Item = Value>) -> &mut Sql {
        self.text.push_str(text);
        self.binds.extend(binds);
        self
    }

    /// The query with every value bound.
    pub fn query(&self, client: &Client) -> Query {
        let mut q = client.query(&self.text);
        for b in &self.binds {
            q = match b {
                Value::Str(s) => q.bind(s.as_str()),
                Value::Int(n) => q.bind(*n),
            };
        }
        q
    }

    /// The statement with values inlined, for the compatibility check only.
    pub fn render(&self, fields: &str) -> String {
        let mut out = String::new();
        let mut binds = self.binds.iter();
        let text = self.text.replace("?fields", fields);
        let mut rest = text.as_str();
        while let Some(at) = rest.find('?') {
            out.push_str(&rest[..at]);
            match binds.next() {
                Some(Value::Str(s)) => out.push_str(&format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))),
                Some(Value::Int(n)) => out.push_str(&n.to_string()),
                None => out.push('?'),
            }
            rest = &rest[at + 1..];
        }
        out.push_str(rest);
        out
    }
}

pub fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

pub fn i(v: i64) -> Value {
    Value::Int(v)
}
