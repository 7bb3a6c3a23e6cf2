//! Durations (`"250ms"`, `"30s"`, `"0"`) and byte sizes (`"64MB"`, `1024`) as written in the config file.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Why a duration or size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a duration: expected a whole number and a unit (us, ms, s, m, h, d), e.g. \"30s\", or \"0\"")]
    Duration(String),
    #[error("{0:?} needs a unit (us, ms, s, m, h, d), e.g. \"{0}s\"; only \"0\" may go without one")]
    DurationUnit(String),
    #[error(
        "{0:?} is not a size: expected a whole number of bytes, optionally with a unit (B, kB, MB, GB), e.g. \"64MB\""
    )]
    Size(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

const DURATION_UNITS: &[(&str, u128)] = &[
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("min", 60 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("d", 86_400 * NANOS_PER_SEC),
];

const NANOS_PER_SEC: u128 = 1_000_000_000;

// Powers of 1024 because these limit buffers, where nobody means 10^6.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mb", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gb", 1 << 30),
    ("gib", 1 << 30),
];

/// Splits `"250 ms"` into `(250, "ms")`; `None` when there is no leading number.
fn split_number(text: &str) -> Option<Result<(u64, &str), ()>> {
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    if end == 0 {
        return None;
    }
    let (digits, rest) = text.split_at(end);
    Some(digits.parse::<u64>().map(|n| (n, rest.trim())).map_err(|_| ()))
}

/// Parses `"0"`, `"1500us"`, `"250ms"`, `"30s"`, `"10m"`, `"1h"`, `"2d"` (whitespace before the
/// unit is allowed). A zero with any unit is zero.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let trimmed = text.trim();
    let (number, unit) = match split_number(trimmed) {
        None => return Err(UnitError::Duration(text.to_owned())),
        Some(Err(())) => return Err(UnitError::Overflow(text.to_owned())),
        Some(Ok(parts)) => parts,
    };
    if unit.is_empty() {
        return if number == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(UnitError::DurationUnit(trimmed.to_owned()))
        };
    }
    let scale = DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| UnitError::Duration(text.to_owned()))?;
    let nanos = u128::from(number) * scale;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| UnitError::Overflow(text.to_owned()))?;
    // The remainder of a division by 10^9 always fits.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Ok(Duration::new(secs, subsec))
}

/// Parses `"64MB"`, `"512 kB"`, `"1GiB"`, `"100B"` or `"4096"` into bytes (units are powers of 1024,
/// case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let (number, unit) = match split_number(text.trim()) {
        None => return Err(UnitError::Size(text.to_owned())),
        Some(Err(())) => return Err(UnitError::Overflow(text.to_owned())),
        Some(Ok(parts)) => parts,
    };
    let unit = unit.to_ascii_lowercase();
    let scale = SIZE_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| UnitError::Size(text.to_owned()))?;
    number
        .checked_mul(scale)
        .ok_or_else(|| UnitError::Overflow(text.to_owned()))
}

/// Formats a duration the way the config file spells it: the largest unit that divides it
/// exactly, `"0"` for zero.
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0".to_owned();
    }
    let micros = duration.as_micros();
    for (name, scale) in [
        ("d", 86_400_000_000u128),
        ("h", 3_600_000_000),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
    ] {
        if micros.is_multiple_of(scale) {
            return format!("{}{name}", micros / scale);
        }
    }
    format!("{micros}us")
}

/// Formats an optional limit, where `None` ("no limit") is written `"0"`.
pub fn format_limit(limit: Option<Duration>) -> String {
    limit.map_or_else(|| "0".to_owned(), format_duration)
}

/// Formats a byte count with the largest unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    for (name, scale) in [("GB", 1u64 << 30), ("MB", 1 << 20), ("kB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(scale) {
            return format!("{}{name}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// A duration setting as written in the file; `"0"` stays zero here, and the caller decides
/// whether zero means "no limit" or is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"30s\" or \"0\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }

            // A bare `0` is unambiguous, so it is accepted; any other bare number lacks a unit.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                if v == 0 {
                    Ok(DurationValue(Duration::ZERO))
                } else {
                    Err(E::custom(UnitError::DurationUnit(v.to_string())))
                }
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

/// A byte size as written in the file: a string with a unit, or a bare integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64MB\" or a number of bytes")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ByteSize(v))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration(" 5 s "), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn bad_durations() {
        assert_eq!(parse_duration("30"), Err(UnitError::DurationUnit("30".into())));
        for bad in ["", "s", "1.5s", "-1s", "10x", "10 seconds", "1h30m", "ms10"] {
            assert!(matches!(parse_duration(bad), Err(UnitError::Duration(_))), "{bad:?}");
        }
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615d"),
            Err(UnitError::Overflow(_))
        ));
        assert_eq!(parse_duration("5000000000us"), Ok(Duration::from_secs(5000)));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("1kB"), Ok(1024));
        assert_eq!(parse_size("1KB"), Ok(1024));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("64 mb"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "MB", "1.5MB", "-1", "10TB", "10 bytes"] {
            assert!(matches!(parse_size(bad), Err(UnitError::Size(_))), "{bad:?}");
        }
        assert!(matches!(parse_size("99999999999GB"), Err(UnitError::Overflow(_))));
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["0", "1500us", "250ms", "30s", "10m", "1h", "2d", "90s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
        assert_eq!(format_limit(None), "0");
        assert_eq!(format_limit(Some(Duration::from_secs(5))), "5s");
        assert_eq!(format_size(64 << 20), "64MB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(1 << 30), "1GB");
        assert_eq!(format_size(2048), "2kB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
    }

    #[derive(serde::Deserialize)]
    struct Sample {
        timeout: DurationValue,
        size: ByteSize,
    }

    fn sample(text: &str) -> Result<Sample, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn deserializers() {
        let s = sample("timeout = \"250ms\"\nsize = \"64MB\"").unwrap();
        assert_eq!(s.timeout, DurationValue(Duration::from_millis(250)));
        assert_eq!(s.size, ByteSize(64 << 20));

        let s = sample("timeout = 0\nsize = 1024").unwrap();
        assert_eq!(s.timeout, DurationValue(Duration::ZERO));
        assert_eq!(s.size, ByteSize(1024));

        let err = sample("timeout = 30\nsize = 1").err().unwrap();
        assert!(err.message().contains("needs a unit"), "{err}");
        let err = sample("timeout = true\nsize = 1").err().unwrap();
        assert!(err.message().contains("expected a duration string"), "{err}");
        let err = sample("timeout = \"1s\"\nsize = -5").err().unwrap();
        assert!(err.message().contains("expected a size"), "{err}");
    }
}
