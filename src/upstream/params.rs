//! Session settings (GUCs) carried from clients to whichever server they get: the set a
//! client wants, the set pgrelay applied on a server, and the SQL that turns one into
//! the other.

use std::fmt::Write as _;

/// Settings by name, compared case-insensitively as PostgreSQL does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionParams {
    entries: Vec<(String, String, Form)>,
}

/// How a setting's value was given, which decides how it is written in a SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The value itself (startup packet, ParameterStatus): written as a string literal.
    Literal,
    /// SQL text as it followed `TO` in the client's own SET (`'UTC'`, `a, b`, `DEFAULT`).
    Sql,
}

/// Parameters a server reports but that no client can set: never tracked or applied.
const NOT_SETTABLE: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
    "scram_iterations",
];

impl SessionParams {
    /// The value of a setting, however it was given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entry(name).map(|(value, _)| value)
    }

    fn entry(&self, name: &str) -> Option<(&str, Form)> {
        self.entries
            .iter()
            .find(|(known, _, _)| known.eq_ignore_ascii_case(name))
            .map(|(_, value, form)| (value.as_str(), *form))
    }

    /// Records a literal value; false (and nothing recorded) for read-only parameters.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        self.set_as(name, value, Form::Literal)
    }

    /// Records a value given as SQL text after `TO`.
    pub fn set_sql(&mut self, name: &str, value: &str) -> bool {
        self.set_as(name, value, Form::Sql)
    }

    fn set_as(&mut self, name: &str, value: &str, form: Form) -> bool {
        if NOT_SETTABLE.iter().any(|fixed| fixed.eq_ignore_ascii_case(name)) {
            return false;
        }
        match self
            .entries
            .iter_mut()
            .find(|(known, _, _)| known.eq_ignore_ascii_case(name))
        {
            Some((_, known_value, known_form)) => {
                value.clone_into(known_value);
                *known_form = form;
            }
            None => self.entries.push((name.to_owned(), value.to_owned(), form)),
        }
        true
    }

    /// Makes `name` what it is in `defaults`, or absent if `defaults` lacks it.
    pub fn reset_to(&mut self, name: &str, defaults: &SessionParams) {
        match defaults.entry(name) {
            Some((value, form)) => {
                let value = value.to_owned();
                self.set_as(name, &value, form);
            }
            None => self.remove(name),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.entries.retain(|(known, _, _)| !known.eq_ignore_ascii_case(name));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(name, value, _)| (name.as_str(), value.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Each setting with whether it was given as SQL text (`set_sql`) rather than a value.
    pub fn iter_with_form(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.entries
            .iter()
            .map(|(name, value, form)| (name.as_str(), value.as_str(), *form == Form::Sql))
    }
}

/// The statements that make a server's applied settings equal to a client's wanted ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDiff {
    /// The change of client_encoding, to run as a message of its own before `sql`: the
    /// server decodes a whole message in the encoding it has when the message arrives,
    /// so a value with non-ASCII text in the client's encoding must come after it. `None`
    /// when there is no such value (the change, if any, is then in `sql`).
    pub encoding: Option<String>,
    pub sql: String,
}

/// Parameters whose new value is merged with the one in place: `DateStyle = iso` keeps
/// the day order the session had (`ISO, DMY` after `German`). They are reset first, so
/// that the value means what it meant in the client's startup packet or SET, whatever
/// an earlier client left on the server.
const MERGED: &[&str] = &["datestyle"];

impl ParamDiff {
    /// `None` when the server already has exactly what the client wants.
    pub fn between(wanted: &SessionParams, applied: &SessionParams) -> Option<ParamDiff> {
        let mut encoding = String::new();
        let mut sql = String::new();
        for (name, value, form) in &wanted.entries {
            if applied.entry(name) != Some((value.as_str(), *form)) {
                let value = match form {
                    Form::Literal => quote_literal(value),
                    Form::Sql => value.clone(),
                };
                let out = if name.eq_ignore_ascii_case("client_encoding") {
                    &mut encoding
                } else {
                    &mut sql
                };
                if MERGED.iter().any(|merged| merged.eq_ignore_ascii_case(name)) {
                    let _ = write!(out, "RESET {};", quote_name(name));
                }
                let _ = write!(out, "SET {} TO {};", quote_name(name), value);
            }
        }
        for (name, _) in applied.iter() {
            if wanted.entry(name).is_none() {
                let out = if name.eq_ignore_ascii_case("client_encoding") {
                    &mut encoding
                } else {
                    &mut sql
                };
                let _ = write!(out, "RESET {};", quote_name(name));
            }
        }
        if encoding.is_empty() || sql.is_ascii() {
            encoding.push_str(&sql);
            return (!encoding.is_empty()).then_some(ParamDiff {
                encoding: None,
                sql: encoding,
            });
        }
        Some(ParamDiff {
            encoding: Some(encoding),
            sql,
        })
    }

    /// The queries to run, in order.
    pub fn queries(&self) -> impl Iterator<Item = &str> {
        self.encoding
            .as_deref()
            .into_iter()
            .chain(std::iter::once(self.sql.as_str()))
    }
}

/// Quotes each dotted part of a setting name as an identifier.
fn quote_name(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A dollar-quoted literal: it means the same whatever standard_conforming_strings says.
fn quote_literal(value: &str) -> String {
    let mut tag = String::from("pgrelay");
    while value.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    format!("${tag}${value}${tag}$")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> SessionParams {
        let mut params = SessionParams::default();
        for (name, value) in pairs {
            params.set(name, value);
        }
        params
    }

    #[test]
    fn diff_sets_changed_and_resets_dropped_settings() {
        let wanted = params(&[("TimeZone", "UTC"), ("application_name", "it's")]);
        let applied = params(&[("timezone", "UTC"), ("search_path", "x")]);
        let diff = ParamDiff::between(&wanted, &applied).unwrap();
        assert_eq!(
            diff.sql,
            "SET \"application_name\" TO $pgrelay$it's$pgrelay$;RESET \"search_path\";"
        );
        assert_eq!(ParamDiff::between(&wanted, &wanted), None);
    }

    #[test]
    fn a_datestyle_is_set_over_the_default_not_over_an_earlier_clients() {
        let wanted = params(&[("DateStyle", "iso")]);
        let applied = params(&[("DateStyle", "German")]);
        let diff = ParamDiff::between(&wanted, &applied).unwrap();
        assert_eq!(
            diff.sql,
            "RESET \"DateStyle\";SET \"DateStyle\" TO $pgrelay$iso$pgrelay$;"
        );
    }

    #[test]
    fn a_change_of_encoding_goes_first_and_alone_before_text_it_decodes() {
        let mut wanted = params(&[("client_encoding", "UTF8")]);
        wanted.set_sql("app.x", "'café'");
        let applied = params(&[("client_encoding", "LATIN9")]);
        let diff = ParamDiff::between(&wanted, &applied).unwrap();
        assert_eq!(
            diff.queries().collect::<Vec<_>>(),
            [
                "SET \"client_encoding\" TO $pgrelay$UTF8$pgrelay$;",
                "SET \"app\".\"x\" TO 'café';"
            ]
        );
        // Gone from the client's settings: the reset goes first too.
        let diff = ParamDiff::between(&params(&[("application_name", "é")]), &applied).unwrap();
        assert_eq!(
            diff.queries().collect::<Vec<_>>(),
            [
                "RESET \"client_encoding\";",
                "SET \"application_name\" TO $pgrelay$é$pgrelay$;"
            ]
        );
        // ASCII reads alike in every encoding: one message.
        let diff = ParamDiff::between(&params(&[("client_encoding", "UTF8"), ("x.y", "z")]), &applied).unwrap();
        assert_eq!(diff.encoding, None);
        assert_eq!(
            diff.sql,
            "SET \"client_encoding\" TO $pgrelay$UTF8$pgrelay$;SET \"x\".\"y\" TO $pgrelay$z$pgrelay$;"
        );
    }

    #[test]
    fn quoting_survives_hostile_values() {
        assert_eq!(quote_literal("a$pgrelay$b"), "$pgrelayx$a$pgrelay$b$pgrelayx$");
        assert_eq!(quote_name("my.\"odd\""), "\"my\".\"\"\"odd\"\"\"");
    }

    #[test]
    fn sql_values_are_written_as_given() {
        let mut wanted = SessionParams::default();
        wanted.set_sql("search_path", "\"MySchema\", public");
        let diff = ParamDiff::between(&wanted, &SessionParams::default()).unwrap();
        assert_eq!(diff.sql, "SET \"search_path\" TO \"MySchema\", public;");
        let mut literal = SessionParams::default();
        literal.set("search_path", "\"MySchema\", public");
        assert!(ParamDiff::between(&wanted, &literal).is_some());
    }

    #[test]
    fn read_only_parameters_are_not_tracked() {
        let mut p = SessionParams::default();
        assert!(!p.set("server_version", "15"));
        assert!(p.is_empty());
    }
}
