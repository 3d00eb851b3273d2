//! Exact decimal money: parses decimal text into integer nano-units and prints it back.
//!
//! Every amount Meterline handles (USD cost, USD revenue, credits, prices) is an
//! integer count of billionths (`10^-9`) of its unit from the moment it is parsed.
//! Nothing is ever rounded on input: text with more than nine fractional digits
//! is rejected, so `0.1 + 0.2` is exactly `0.3` and a bill adds up to the nano.

use std::fmt;

/// Billionths per unit: amounts are held as integer nano-units.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// Fractional digits an amount may carry.
pub const MAX_SCALE: u32 = 9;

/// A non-negative or negative amount in nano-units (nano-USD or nano-credits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub i64);

/// Why a decimal text is not an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("is not a decimal number")]
    Syntax,
    #[error("has more than 9 digits after the decimal point")]
    TooPrecise,
    #[error("is too large")]
    Overflow,
    #[error("must not be negative")]
    Negative,
}

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    /// Parses a plain decimal (`12`, `0.000125`, `-3.5`) or a JSON number with
    /// an exponent (`1.25e-4`) into exact nano-units.
    pub fn parse(text: &str) -> Result<Nanos, MoneyError> {
        let bytes = text.as_bytes();
        let (negative, rest) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let (mantissa, exponent) = match rest.iter().position(|b| *b == b'e' || *b == b'E') {
            Some(at) => (&rest[..at], parse_exponent(&rest[at + 1..])?),
            None => (rest, 0i32),
        };
        let (int_part, frac_part) = match mantissa.iter().position(|b| *b == b'.') {
            Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
            None => (mantissa, &mantissa[mantissa.len()..]),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(MoneyError::Syntax);
        }
        if mantissa.contains(&b'.') && (int_part.is_empty() || frac_part.is_empty()) {
            // `.5` and `5.` are not JSON numbers; refusing them keeps strings and
            // numbers to one grammar.
            return Err(MoneyError::Syntax);
        }
        if !int_part.iter().chain(frac_part).all(u8::is_ascii_digit) {
            return Err(MoneyError::Syntax);
        }
        // value = digits * 10^(exponent - frac_len); we want value * 10^9.
        let digits = int_part.iter().chain(frac_part).map(|d| d - b'0');
        let shift = i64::from(exponent) - frac_part.len() as i64 + i64::from(MAX_SCALE);
        let mut acc: i128 = 0;
        let mut dropped_nonzero = false;
        let mut kept = 0usize;
        let total_digits = int_part.len() + frac_part.len();
        // Digits past `total_digits + shift` fall below one nano.
        let keep = (total_digits as i64 + shift).max(0) as usize;
        for d in digits {
            if kept < keep {
                acc = acc
                    .checked_mul(10)
                    .and_then(|a| a.checked_add(i128::from(d)))
                    .ok_or(MoneyError::Overflow)?;
                if acc > MAX_MAGNITUDE {
                    return Err(MoneyError::Overflow);
                }
                kept += 1;
            } else if d != 0 {
                dropped_nonzero = true;
            }
        }
        if dropped_nonzero {
            return Err(MoneyError::TooPrecise);
        }
        if shift > 0 {
            for _ in 0..shift {
                acc = acc.checked_mul(10).ok_or(MoneyError::Overflow)?;
                if acc > MAX_MAGNITUDE {
                    return Err(MoneyError::Overflow);
                }
            }
        }
        let signed = if negative { -acc } else { acc };
        i64::try_from(signed).map(Nanos).map_err(|_| MoneyError::Overflow)
    }

    /// Like [`Nanos::parse`], refusing any text with a minus sign.
    pub fn parse_non_negative(text: &str) -> Result<Nanos, MoneyError> {
        let value = Self::parse(text)?;
        if text.starts_with('-') {
            return Err(MoneyError::Negative);
        }
        Ok(value)
    }

    pub fn checked_add(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_add(other.0).map(Nanos)
    }
}

/// |i64::MIN|: the largest magnitude any sign can take.
const MAX_MAGNITUDE: i128 = i64::MAX as i128 + 1;

fn parse_exponent(text: &[u8]) -> Result<i32, MoneyError> {
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        // Four digits is far beyond any amount that fits in i64 nanos; longer
        // exponents are refused rather than risk overflow in the arithmetic.
        return Err(if digits.iter().all(u8::is_ascii_digit) && !digits.is_empty() {
            if negative { MoneyError::TooPrecise } else { MoneyError::Overflow }
        } else {
            MoneyError::Syntax
        });
    }
    let value: i32 = digits.iter().fold(0, |acc, d| acc * 10 + i32::from(d - b'0'));
    Ok(if negative { -value } else { value })
}

impl fmt::Display for Nanos {
    /// Canonical decimal text: no exponent, no trailing fractional zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let unit = NANOS_PER_UNIT as u64;
        let (int, frac) = (abs / unit, abs % unit);
        if frac == 0 {
            return write!(f, "{sign}{int}");
        }
        let frac = format!("{frac:09}");
        write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(Nanos::parse("0.1").unwrap().0 + Nanos::parse("0.2").unwrap().0, Nanos::parse("0.3").unwrap().0);
        assert_eq!(Nanos::parse("12").unwrap(), Nanos(12_000_000_000));
        assert_eq!(Nanos::parse("0.000000001").unwrap(), Nanos(1));
        assert_eq!(Nanos::parse("1.25e-4").unwrap(), Nanos(125_000));
        assert_eq!(Nanos::parse("1E3").unwrap(), Nanos(1_000 * NANOS_PER_UNIT));
        assert_eq!(Nanos::parse("0.5000000000000").unwrap(), Nanos(500_000_000));
        assert_eq!(Nanos::parse("-3.5").unwrap(), Nanos(-3_500_000_000));
        assert_eq!(Nanos::parse("0e0").unwrap(), Nanos(0));
        assert_eq!(Nanos::parse("123e-11").unwrap_err(), MoneyError::TooPrecise);
    }

    #[test]
    fn refuses_what_it_cannot_hold_exactly() {
        assert_eq!(Nanos::parse("0.0000000001").unwrap_err(), MoneyError::TooPrecise);
        assert_eq!(Nanos::parse("1e-10").unwrap_err(), MoneyError::TooPrecise);
        assert_eq!(Nanos::parse("10000000000").unwrap_err(), MoneyError::Overflow);
        assert_eq!(Nanos::parse("1e99999").unwrap_err(), MoneyError::Overflow);
        for bad in ["", ".", ".5", "5.", "1..2", "abc", "1e", "e5", "0x10", "1_000", " 1", "NaN", "--1"] {
            assert_eq!(Nanos::parse(bad).unwrap_err(), MoneyError::Syntax, "{bad:?}");
        }
        assert_eq!(Nanos::parse_non_negative("-0.01").unwrap_err(), MoneyError::Negative);
        assert_eq!(Nanos::parse_non_negative("-0").unwrap_err(), MoneyError::Negative);
        assert_eq!(Nanos::parse("+1").unwrap_err(), MoneyError::Syntax);
    }

    #[test]
    fn displays_canonically() {
        assert_eq!(Nanos(12_000_000_000).to_string(), "12");
        assert_eq!(Nanos(125_000).to_string(), "0.000125");
        assert_eq!(Nanos(-3_500_000_000).to_string(), "-3.5");
        assert_eq!(Nanos(i64::MIN).to_string(), "-9223372036.854775808");
    }

    proptest::proptest! {
        #[test]
        fn display_round_trips(v in proptest::num::i64::ANY) {
            proptest::prop_assert_eq!(Nanos::parse(&Nanos(v).to_string()), Ok(Nanos(v)));
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = Nanos::parse(&s);
        }
    }
}
