//! WAL positions (PostgreSQL's `pg_lsn`): a byte offset into the write-ahead log, written
//! `X/Y` (two hexadecimal numbers of at most 8 digits: the high and low 32 bits).

use std::fmt;
use std::str::FromStr;

use tokio_postgres::types::PgLsn;

use super::error::ClusterError;

/// A position in the write-ahead log. Later positions compare greater, so "replica replayed
/// the commit" is `replay_lsn >= commit_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, which PostgreSQL uses as "invalid".
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes of WAL from `earlier` to `self` (0 when `earlier` is not earlier).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// At most this many hex digits on each side of the `/`, as in PostgreSQL's `pg_lsn_in`.
const MAX_COMPONENT_DIGITS: usize = 8;

fn parse_component(part: &str) -> Option<u64> {
    // `from_str_radix` alone would also take a leading `+`; PostgreSQL takes only hex digits.
    if part.is_empty() || part.len() > MAX_COMPONENT_DIGITS || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(part, 16).ok()
}

impl FromStr for Lsn {
    type Err = ClusterError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ClusterError::BadLsn(text.chars().take(40).collect());
        let (high, low) = text.split_once('/').ok_or_else(bad)?;
        let high = parse_component(high).ok_or_else(bad)?;
        let low = parse_component(low).ok_or_else(bad)?;
        Ok(Lsn((high << 32) | low))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl From<PgLsn> for Lsn {
    fn from(lsn: PgLsn) -> Self {
        Lsn(u64::from(lsn))
    }
}

impl From<Lsn> for PgLsn {
    fn from(lsn: Lsn) -> Self {
        PgLsn::from(lsn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_postgres_text_form() {
        for (text, value) in [
            ("0/0", 0),
            ("0/16B3748", 0x16B_3748),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
            ("1/0", 1 << 32),
        ] {
            let lsn: Lsn = text.parse().expect(text);
            assert_eq!(lsn, Lsn(value), "{text}");
            assert_eq!(lsn.to_string(), text);
        }
        // Lower case and leading zeros are accepted; output is PostgreSQL's canonical form.
        let lsn: Lsn = "000a/00ff".parse().expect("lower case");
        assert_eq!(lsn, Lsn(0xA_0000_00FF));
        assert_eq!(lsn.to_string(), "A/FF");
    }

    #[test]
    fn rejects_what_postgres_rejects() {
        for text in [
            "",
            "/",
            "0",
            "0/",
            "/0",
            "1/2/3",
            "+1/0",
            "0/-1",
            " 0/0",
            "0/0 ",
            "g/0",
            "123456789/0",
            "0/123456789",
            "0x1/0",
        ] {
            assert!(text.parse::<Lsn>().is_err(), "{text:?} should not parse");
        }
        let err = "nonsense".parse::<Lsn>().expect_err("bad");
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn orders_by_position() {
        let a: Lsn = "0/FFFFFFFF".parse().expect("a");
        let b: Lsn = "1/0".parse().expect("b");
        assert!(a < b);
        assert_eq!(b.bytes_since(a), 1);
        assert_eq!(a.bytes_since(b), 0);
        assert_eq!(Lsn::from(PgLsn::from(b)), b);
    }
}
