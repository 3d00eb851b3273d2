//! SQL text with its placeholders' values, built together so that a value
//! can never end up in the text: fragments are constants of this codebase,
//! and every value is a bind.

/// A bound value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Str(String),
    Int(i64),
    /// An array of strings (ClickHouse `Array(String)`).
    Strs(Vec<String>),
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

    /// Appends another statement piece with its values.
    pub fn append(&mut self, other: Sql) -> &mut Sql {
        self.text.push_str(&other.text);
        self.binds.extend(other.binds);
        self
    }

    /// `pieces` joined by `separator`, each with its values.
    pub fn join(pieces: impl IntoIterator<Item = Sql>, separator: &str) -> Sql {
        let mut out = Sql::default();
        for (n, piece) in pieces.into_iter().enumerate() {
            if n > 0 {
                out.text.push_str(separator);
            }
            out.append(piece);
        }
        out
    }

    /// The statement with values inlined as literals (ClickHouse's string
    /// escapes), for the compatibility check only: `?fields` becomes `fields`.
    pub fn render(&self, fields: &str) -> String {
        let mut out = String::new();
        let mut binds = self.binds.iter();
        let text = self.text.replace("?fields", fields);
        let mut rest = text.as_str();
        while let Some(at) = rest.find('?') {
            out.push_str(&rest[..at]);
            match binds.next() {
                Some(Value::Str(s)) => out.push_str(&quote(s)),
                Some(Value::Int(n)) => out.push_str(&n.to_string()),
                Some(Value::Strs(list)) => out.push_str(&format!("[{}]", list.iter().map(|s| quote(s)).collect::<Vec<_>>().join(","))),
                None => out.push('?'),
            }
            rest = &rest[at + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// A string literal with ClickHouse's escapes.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A string value.
pub fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

/// An integer value.
pub fn i(v: i64) -> Value {
    Value::Int(v)
}

/// `n` copies of `piece` joined by `separator`, each with its own values
/// from `binds` (one call per copy).
pub fn repeat<T>(items: impl IntoIterator<Item = T>, separator: &str, piece: &str, binds: impl Fn(T) -> Vec<Value>) -> Sql {
    Sql::join(
        items.into_iter().map(|item| {
            let mut sql = Sql::new(piece);
            sql.binds = binds(item);
            sql
        }),
        separator,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_and_quotes() {
        let mut sql = Sql::new("a = ? AND b IN (?, ?) AND c = ");
        sql.binds.extend([s("x'y"), i(1), i(-2)]);
        sql.push("?", [Value::Strs(vec!["p".into(), "q\\".into()])]);
        assert_eq!(sql.render(""), "a = 'x\\'y' AND b IN (1, -2) AND c = ['p','q\\\\']");
    }

    #[test]
    fn repeated_pieces_carry_their_own_values() {
        let sql = repeat([(3, 4), (5, 6)], " OR ", "(p = ? AND o = ?)", |(p, o)| vec![i(p), i(o)]);
        assert_eq!(sql.text, "(p = ? AND o = ?) OR (p = ? AND o = ?)");
        assert_eq!(sql.binds, vec![i(3), i(4), i(5), i(6)]);
    }
}
