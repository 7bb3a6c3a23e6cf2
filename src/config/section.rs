//! Deserializes one section of the file while collecting every unknown key and every type
//! error, each with its full key path (`databases.app.routing.load_balance`).
//!
//! serde stops at the first error, so a section is deserialized repeatedly: after each type
//! error the offending key is removed and the section is tried again, until it deserializes.
//! Unknown keys are seen through `serde_ignored` on every pass and reported once.

use std::collections::BTreeSet;

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, Visitor};

use super::Problem;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A deserializable section that can say which keys it accepts, for "did you mean" hints.
pub(super) trait Section: DeserializeOwned {
    /// The keys accepted in the table at `parent` (relative to the section).
    fn keys_at(parent: &[Seg]) -> Vec<&'static str>;
}

/// Deserializes `T` only from a table. A derived struct would also accept an array and fill
/// its fields by position, which in a config file is always a mistake.
#[derive(Debug)]
pub(super) struct TableOf<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TableOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TableVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
            type Value = TableOf<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(TableOf)
            }
        }

        deserializer.deserialize_map(TableVisitor(PhantomData))
    }
}

/// `parent.key`, quoting the key the way TOML would when it is not a bare key (`databases."*"`).
pub(super) fn key_path(parent: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare { key.to_owned() } else { format!("{key:?}") };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(super) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

fn join(base: &str, segs: &[Seg]) -> String {
    segs.iter().fold(base.to_owned(), |path, seg| match seg {
        Seg::Key(key) => key_path(&path, key),
        Seg::Index(index) => index_path(&path, *index),
    })
}

fn ignored_segs(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_segs(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_segs(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            ignored_segs(parent, out)
        }
    }
}

fn error_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Removes the innermost key on `segs` (an array element takes its whole array with it, so
/// that later indices keep their meaning). Returns false when there is no key to remove.
fn remove_at(value: &mut toml::Value, segs: &[Seg]) -> bool {
    let Some(last_key) = segs.iter().rposition(|s| matches!(s, Seg::Key(_))) else {
        return false;
    };
    let mut node = value;
    for seg in &segs[..last_key] {
        let next = match (seg, node) {
            (Seg::Key(key), toml::Value::Table(table)) => table.get_mut(key),
            (Seg::Index(index), toml::Value::Array(array)) => array.get_mut(*index),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (&segs[last_key], node) {
        (Seg::Key(key), toml::Value::Table(table)) => table.remove(key).is_some(),
        _ => false,
    }
}

/// Deserializes `value` (found at `base`) as `T`, pushing every problem found on the way.
/// `None` when the section as a whole has the wrong type.
pub(super) fn deserialize_section<T: Section>(
    mut value: toml::Value,
    base: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut reported_unknown = BTreeSet::new();
    // Each failed pass removes one key, so this ends; the bound only guards against a bug.
    for _ in 0..10_000 {
        let mut ignored = Vec::new();
        let mut on_ignored = |path: serde_ignored::Path<'_>| {
            let mut segs = Vec::new();
            ignored_segs(&path, &mut segs);
            ignored.push(segs);
        };
        let result: Result<TableOf<T>, serde_path_to_error::Error<toml::de::Error>> =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value.clone(), &mut on_ignored));
        for segs in ignored {
            let path = join(base, &segs);
            if reported_unknown.insert(path.clone()) {
                problems.push(Problem::new(path, unknown_key_message::<T>(&segs)));
            }
        }
        match result {
            Ok(TableOf(section)) => return Some(section),
            Err(err) => {
                let segs = error_segs(err.path());
                problems.push(Problem::new(join(base, &segs), toml_words(err.inner().message())));
                if !remove_at(&mut value, &segs) {
                    return None;
                }
            }
        }
    }
    None
}

/// serde speaks of sequences and maps; a TOML file has arrays and tables.
fn toml_words(message: &str) -> String {
    message
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a sequence", "expected an array")
}

pub(super) fn unknown_key_message<T: Section>(segs: &[Seg]) -> String {
    let Some((Seg::Key(key), parent)) = segs.split_last() else {
        return "unknown key".to_owned();
    };
    match suggest(key, &T::keys_at(parent)) {
        Some(known) => format!("unknown key (did you mean {known:?}?)"),
        None => "unknown key".to_owned(),
    }
}

/// The closest known key, if it is close enough to be a likely typo.
pub(super) fn suggest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let unknown = unknown.to_lowercase();
    let len = unknown.chars().count();
    let limit = if len <= 3 { 1 } else { (len / 3).max(2) };
    known
        .iter()
        .map(|k| (edit_distance(&unknown, k), *k))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// Levenshtein distance where swapping two adjacent characters counts as one edit, the most
/// common typo in key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// The field names a derived `Deserialize` struct accepts, taken from the derive itself so
/// that hint lists cannot drift from the structs.
pub(super) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probe only"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The probe always fails by design; only the captured field list matters.
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(expecting = "a table")]
    struct Inner {
        depth: Option<u32>,
    }

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(expecting = "a table")]
    struct Outer {
        size: Option<usize>,
        name: Option<String>,
        list: Option<Vec<String>>,
        inner: Option<TableOf<Inner>>,
    }

    impl Section for Outer {
        fn keys_at(parent: &[Seg]) -> Vec<&'static str> {
            match parent {
                [] => fields_of::<Outer>().to_vec(),
                _ => fields_of::<Inner>().to_vec(),
            }
        }
    }

    fn run(text: &str) -> (Option<Outer>, Vec<String>) {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let out = deserialize_section::<Outer>(toml::Value::Table(table), "sec", &mut problems);
        (out, problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn collects_every_problem() {
        let (out, problems) =
            run("size = \"x\"\nnaem = 1\nlist = [\"a\", 2]\nzzz = 1\n[inner]\ndepht = 3\ndepth = -1\n");
        let out = out.unwrap();
        assert_eq!(out.size, None);
        assert!(out.inner.is_some());
        assert_eq!(
            problems,
            [
                "sec.inner.depht: unknown key (did you mean \"depth\"?)",
                "sec.inner.depth: invalid value: integer `-1`, expected u32",
                "sec.list[1]: invalid type: integer `2`, expected a string",
                "sec.naem: unknown key (did you mean \"name\"?)",
                "sec.size: invalid type: string \"x\", expected usize",
                "sec.zzz: unknown key",
            ]
        );
    }

    #[test]
    fn wrong_section_type() {
        let mut problems = Vec::new();
        let out = deserialize_section::<Outer>(toml::Value::Integer(5), "sec", &mut problems);
        assert!(out.is_none());
        assert_eq!(
            problems[0].to_string(),
            "sec: invalid type: integer `5`, expected a table"
        );
        let (_, problems) = run("inner = [1]\n");
        assert_eq!(problems, ["sec.inner: invalid type: array, expected a table"]);
    }

    #[test]
    fn paths_and_hints() {
        assert_eq!(key_path("databases", "*"), "databases.\"*\"");
        assert_eq!(key_path("databases", "app-ro_1"), "databases.app-ro_1");
        assert_eq!(key_path("", "pool"), "pool");
        assert_eq!(index_path("users", 2), "users[2]");
        assert_eq!(
            suggest("laod_balance", &["load_balance", "target"]),
            Some("load_balance")
        );
        assert_eq!(suggest("xyz", &["load_balance", "target"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("szie", "size"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest("x", &["ca"]), None);
        assert_eq!(fields_of::<Inner>(), ["depth"]);
    }
}
