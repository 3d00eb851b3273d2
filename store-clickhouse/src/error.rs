//! The crate's error type, classified once: retryable or permanent.

/// What can go wrong talking to ClickHouse.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("clickhouse: {0}")]
    Client(#[from] clickhouse::error::Error),
    #[error("clickhouse: {what} timed out after {secs} s")]
    TimedOut { what: &'static str, secs: u64 },
}

/// How a failed statement should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Network, timeouts, an overloaded or restarting server: try again.
    Retryable,
    /// The server refused the data itself: sending it again fails again.
    Permanent,
}

/// A server-side limit that stopped a read: the query itself was too big
/// for the settings the reader sent (or the server was full), not broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_execution_time` (TIMEOUT_EXCEEDED, 159; TOO_SLOW, 160: the
    /// server's estimate that it would run past it).
    Time,
    /// `max_memory_usage` (MEMORY_LIMIT_EXCEEDED, 241).
    Memory,
    /// The server's `max_concurrent_queries` (TOO_MANY_SIMULTANEOUS_QUERIES, 202).
    Concurrency,
}

/// ClickHouse exception codes that mean the rows themselves are bad (they
/// cannot be parsed, converted or stored), not the server or the network.
const BAD_DATA_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
];

impl ClickHouseError {
    /// Retryable unless the server said the data is bad.
    pub fn retry(&self) -> Retry {
        match self {
            ClickHouseError::Client(clickhouse::error::Error::BadResponse(text)) => match exception_code(text) {
                Some(code) if BAD_DATA_CODES.contains(&code) => Retry::Permanent,
                _ => Retry::Retryable,
            },
            _ => Retry::Retryable,
        }
    }

    /// The server-side limit that killed this statement, if one did.
    pub fn limit(&self) -> Option<Limit> {
        let ClickHouseError::Client(clickhouse::error::Error::BadResponse(text)) = self else { return None };
        match exception_code(text)? {
            159 | 160 => Some(Limit::Time),
            241 => Some(Limit::Memory),
            202 => Some(Limit::Concurrency),
            _ => None,
        }
    }
}

/// The code in a ClickHouse exception text: `Code: 27. DB::Exception: ...`.
pub fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_data_is_permanent_and_the_rest_retryable() {
        let refused = ClickHouseError::Client(clickhouse::error::Error::BadResponse(
            "Code: 27. DB::Exception: Cannot parse input: expected '\\t' before: 'x'".into(),
        ));
        assert_eq!(refused.retry(), Retry::Permanent);
        let busy = ClickHouseError::Client(clickhouse::error::Error::BadResponse("Code: 252. DB::Exception: Too many parts".into()));
        assert_eq!(busy.retry(), Retry::Retryable);
        assert_eq!(ClickHouseError::Client(clickhouse::error::Error::TimedOut).retry(), Retry::Retryable);
        assert_eq!(ClickHouseError::TimedOut { what: "rollup insert", secs: 10 }.retry(), Retry::Retryable);
        assert_eq!(exception_code("garbage"), None);
    }

    #[test]
    fn limits_are_named_from_the_codes_18_16_and_current_servers_send() {
        let said = |text: &str| ClickHouseError::Client(clickhouse::error::Error::BadResponse(text.into())).limit();
        // 18.16 writes "Code: N, e.displayText() = ..."; current servers "Code: N. DB::Exception: ...".
        assert_eq!(said("Code: 159, e.displayText() = DB::Exception: Timeout exceeded: elapsed 1.43 seconds, maximum: 1"), Some(Limit::Time));
        assert_eq!(said("Code: 241. DB::Exception: Memory limit (for query) exceeded"), Some(Limit::Memory));
        assert_eq!(said("Code: 202. DB::Exception: Too many simultaneous queries"), Some(Limit::Concurrency));
        assert_eq!(said("Code: 60. DB::Exception: Table default.x doesn't exist"), None);
        assert_eq!(ClickHouseError::TimedOut { what: "rollup insert", secs: 10 }.limit(), None);
    }
}
