//! Routing hints: a leading `/* pgrelay: primary */`, `/* pgrelay: replica */` or
//! `-- pgrelay: replica` comment. Only the very first comment of the text counts (after
//! whitespace), so a hint cannot be smuggled in from the middle of a statement or a literal.

use crate::route::Hint;
use crate::route::lex::comment_end;

/// The hint carried by the first comment of `src`, if any.
pub(crate) fn leading_hint(src: &str) -> Option<Hint> {
    let bytes = src.as_bytes();
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let block = match bytes.get(start..start + 2)? {
        b"/*" => true,
        b"--" => false,
        _ => return None,
    };
    let end = comment_end(bytes, start);
    let body_end = if block && src.get(..end)?.ends_with("*/") && end >= start + 4 {
        end - 2
    } else {
        end
    };
    parse(src.get(start + 2..body_end)?)
}

fn parse(body: &str) -> Option<Hint> {
    let body = body.trim();
    let prefix = body.get(..7)?;
    if !prefix.eq_ignore_ascii_case("pgrelay") {
        return None;
    }
    let rest = body[7..].trim_start().strip_prefix(':')?.trim();
    if rest.eq_ignore_ascii_case("primary") {
        Some(Hint::Primary)
    } else if rest.eq_ignore_ascii_case("replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints() {
        assert_eq!(leading_hint("/* pgrelay: primary */ SELECT 1"), Some(Hint::Primary));
        assert_eq!(leading_hint("  /*pgrelay:replica*/SELECT 1"), Some(Hint::Replica));
        assert_eq!(leading_hint("-- pgrelay: replica\nSELECT 1"), Some(Hint::Replica));
        assert_eq!(leading_hint("-- PGRELAY : Replica"), Some(Hint::Replica));
        assert_eq!(leading_hint("SELECT 1 /* pgrelay: primary */"), None);
        assert_eq!(leading_hint("/* other */ /* pgrelay: primary */ SELECT 1"), None);
        assert_eq!(leading_hint("/* pgrelay: primaryx */ SELECT 1"), None);
        assert_eq!(leading_hint("/* pgrelay: primary"), Some(Hint::Primary));
        assert_eq!(leading_hint("/*/"), None);
        assert_eq!(leading_hint("/* é */"), None);
        assert_eq!(leading_hint(""), None);
    }
}
