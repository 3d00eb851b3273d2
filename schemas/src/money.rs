//! Exact decimal money: parses decimal text into integer nano-units and prints it back.
//!
//! Every amount Meterline handles (USD cost, USD revenue, credits, prices) is an
//! integer count of billionths (`10^-9`) of its unit from the moment it is parsed.
//! The contract rounds nothing on input: text with more than nine fractional
//! digits is rejected, so `0.1 + 0.2` is exactly `0.3` and a bill adds up to the
//! nano. Only integrations that print binary floats (the CloudEvents path) read
//! amounts with [`Nanos::parse_rounded_non_negative`]: half to even, counted.

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
        let decimal = Decimal::split(text)?;
        let exponent = decimal.exponent.clone()?;
        let scaled = decimal.scale(exponent)?;
        if scaled.first_dropped != 0 || scaled.rest_nonzero {
            return Err(MoneyError::TooPrecise);
        }
        scaled.finish(decimal.negative, 0)
    }

    /// Like [`Nanos::parse_non_negative`], but rounds text with more than
    /// nine fractional digits half-to-even to the nano instead of refusing
    /// it, reading the digits as written (never through a float). For
    /// integrations that print binary floats (`0.00017250000000000002`,
    /// `2.85e-05`); the native contract keeps refusing over-precise money.
    pub fn parse_rounded_non_negative(text: &str) -> Result<Rounded, MoneyError> {
        let decimal = Decimal::split(text)?;
        if decimal.negative {
            return Err(MoneyError::Negative);
        }
        let scaled = match decimal.exponent.clone() {
            Ok(exponent) => decimal.scale(exponent)?,
            // An exponent too negative to parse puts every digit far below a
            // nano: the value rounds to zero.
            Err(MoneyError::TooPrecise) => Scaled {
                acc: 0,
                first_dropped: 0,
                rest_nonzero: decimal.int_part.iter().chain(decimal.frac_part).any(|d| *d != b'0'),
            },
            Err(e) => return Err(e),
        };
        // Half to even: above half rounds up, below down, an exact half to
        // the even neighbour, so rounding many amounts adds no drift.
        let up = match scaled.first_dropped {
            6..=9 => 1,
            5 if scaled.rest_nonzero || scaled.acc % 2 == 1 => 1,
            _ => 0,
        };
        let rounded = scaled.first_dropped != 0 || scaled.rest_nonzero;
        Ok(Rounded { value: scaled.finish(false, up)?, rounded })
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

/// An amount read with [`Nanos::parse_rounded_non_negative`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounded {
    pub value: Nanos,
    /// True when digits below a nano were dropped (the text was not exact).
    pub rounded: bool,
}

/// A decimal's text split into its parts, digits checked, not yet scaled.
struct Decimal<'a> {
    negative: bool,
    int_part: &'a [u8],
    frac_part: &'a [u8],
    /// The exponent, or why it cannot be read (kept apart: a very negative
    /// exponent is an error when exact, zero when rounding).
    exponent: Result<i32, MoneyError>,
}

/// A decimal scaled to nanos: the whole nanos and what falls below one.
struct Scaled {
    acc: i128,
    /// The first digit below a nano (0 when none, or when every dropped
    /// digit lies further down than the first place below a nano).
    first_dropped: u8,
    /// Any non-zero digit after `first_dropped`.
    rest_nonzero: bool,
}

impl<'a> Decimal<'a> {
    fn split(text: &'a str) -> Result<Decimal<'a>, MoneyError> {
        let bytes = text.as_bytes();
        let (negative, rest) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let (mantissa, exponent) = match rest.iter().position(|b| *b == b'e' || *b == b'E') {
            Some(at) => (&rest[..at], parse_exponent(&rest[at + 1..])),
            None => (rest, Ok(0i32)),
        };
        if exponent == Err(MoneyError::Syntax) {
            return Err(MoneyError::Syntax);
        }
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
        Ok(Decimal { negative, int_part, frac_part, exponent })
    }

    /// value = digits * 10^(exponent - frac_len); scaled = value * 10^9,
    /// split at the nano.
    fn scale(&self, exponent: i32) -> Result<Scaled, MoneyError> {
        let shift = i64::from(exponent) - self.frac_part.len() as i64 + i64::from(MAX_SCALE);
        let total_digits = (self.int_part.len() + self.frac_part.len()) as i64;
        // Digits past index `total_digits + shift` fall below one nano; when
        // that index is negative, even the first digit lies below 10^-10.
        let boundary = total_digits + shift;
        let mut out = Scaled { acc: 0, first_dropped: 0, rest_nonzero: false };
        for (i, d) in self.int_part.iter().chain(self.frac_part).map(|d| d - b'0').enumerate() {
            let i = i as i64;
            if i < boundary {
                out.acc = out.acc.checked_mul(10).and_then(|a| a.checked_add(i128::from(d))).ok_or(MoneyError::Overflow)?;
                if out.acc > MAX_MAGNITUDE {
                    return Err(MoneyError::Overflow);
                }
            } else if i == boundary {
                out.first_dropped = d;
            } else if d != 0 {
                out.rest_nonzero = true;
            }
        }
        for _ in 0..shift.max(0) {
            out.acc = out.acc.checked_mul(10).ok_or(MoneyError::Overflow)?;
            if out.acc > MAX_MAGNITUDE {
                return Err(MoneyError::Overflow);
            }
        }
        Ok(out)
    }
}

impl Scaled {
    fn finish(&self, negative: bool, up: i128) -> Result<Nanos, MoneyError> {
        let magnitude = self.acc + up;
        let signed = if negative { -magnitude } else { magnitude };
        i64::try_from(signed).map(Nanos).map_err(|_| MoneyError::Overflow)
    }
}

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
    fn rounds_half_to_even_from_the_text() {
        let r = |t: &str| Nanos::parse_rounded_non_negative(t).map(|r| (r.value.0, r.rounded));
        // What Python prints for float sums and products.
        assert_eq!(r("0.00017250000000000002"), Ok((172_500, true)));
        assert_eq!(r("2.85e-05"), Ok((28_500, false)));
        assert_eq!(r("1.35e-05"), Ok((13_500, false)));
        assert_eq!(r("0.1"), Ok((100_000_000, false)));
        // Ties go to the even nano; anything past the tie goes up.
        assert_eq!(r("0.0000000005"), Ok((0, true)));
        assert_eq!(r("0.0000000015"), Ok((2, true)));
        assert_eq!(r("0.0000000025"), Ok((2, true)));
        assert_eq!(r("0.00000000250000000000001"), Ok((3, true)));
        assert_eq!(r("0.0000000024999999999999"), Ok((2, true)));
        // Exponents on both sides of the nano.
        assert_eq!(r("15e-10"), Ok((2, true)));
        assert_eq!(r("25E-10"), Ok((2, true)));
        assert_eq!(r("1e-10"), Ok((0, true)));
        assert_eq!(r("6e-11"), Ok((0, true)));
        assert_eq!(r("1e-99999"), Ok((0, true)));
        assert_eq!(r("0e-99999"), Ok((0, false)));
        assert_eq!(r("1.5e3"), Ok((1_500 * NANOS_PER_UNIT, false)));
        // Many digits: the tail only decides the last nano.
        assert_eq!(r("1.999999999500000000000000000000000001"), Ok((2 * NANOS_PER_UNIT, true)));
        assert_eq!(r("0.123456789123456789123456789"), Ok((123_456_789, true)));
        // A carry across the whole value, and the limits.
        assert_eq!(r("9.9999999995"), Ok((10 * NANOS_PER_UNIT, true)));
        assert_eq!(r("9223372036.8547758074"), Ok((i64::MAX, true)));
        // i64::MAX is odd: its tie rounds up, past what a Nanos holds.
        assert_eq!(r("9223372036.8547758075"), Err(MoneyError::Overflow));
        assert_eq!(r("1e99999"), Err(MoneyError::Overflow));
        // Negative amounts are refused before rounding could hide the sign.
        assert_eq!(r("-0.00000000001"), Err(MoneyError::Negative));
        assert_eq!(r("-0"), Err(MoneyError::Negative));
        for bad in ["", ".5", "5.", "abc", "1e", "1e-", "NaN", "Infinity", "0x1", " 1"] {
            assert_eq!(r(bad), Err(MoneyError::Syntax), "{bad:?}");
        }
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
            let _ = Nanos::parse_rounded_non_negative(&s);
        }

        #[test]
        fn rounding_agrees_with_exact_parsing(v in 0i64..=i64::MAX, tail in "[0-9]{0,12}") {
            // An exact amount reads the same either way; extra digits move
            // it by at most one nano.
            let exact = Nanos(v).to_string();
            let r = Nanos::parse_rounded_non_negative(&exact).unwrap();
            proptest::prop_assert_eq!(r, Rounded { value: Nanos(v), rounded: false });
            let unit = NANOS_PER_UNIT;
            let longer = format!("{}.{:09}{tail}", v / unit, v % unit);
            if let Ok(r) = Nanos::parse_rounded_non_negative(&longer) {
                proptest::prop_assert!(r.value.0 - v <= 1);
            }
        }
    }
}
