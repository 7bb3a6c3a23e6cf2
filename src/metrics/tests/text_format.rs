//! A strict parser of the Prometheus text exposition format 0.0.4, for the tests: it rejects
//! what a lenient scraper would let through (samples outside their family, a family declared
//! twice, bad escapes, duplicate series, histograms whose buckets do not add up), so a test
//! that parses `/metrics` proves the output is well-formed, not merely readable.

use std::collections::{BTreeMap, HashSet};

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`…_bucket`, `…_sum`, `…_count` for histograms).
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub help: String,
    pub kind: String,
    pub samples: Vec<Sample>,
}

impl Family {
    /// The value of the sample named `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: Labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }
}

pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut seen = HashSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("output does not end with a newline".into());
    }
    for (number, line) in text.lines().enumerate() {
        let at = |message: String| format!("line {}: {message}: {line:?}", number + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or_else(|| at("HELP without text".into()))?;
            check_name(name).map_err(at)?;
            let family = declare(&mut families, &mut current, name).map_err(at)?;
            if !family.help.is_empty() {
                return Err(at("second HELP".into()));
            }
            family.help = unescape(help, false).map_err(at)?;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without a type".into()))?;
            check_name(name).map_err(at)?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            let family = declare(&mut families, &mut current, name).map_err(at)?;
            if !family.kind.is_empty() {
                return Err(at("second TYPE".into()));
            }
            if !family.samples.is_empty() {
                return Err(at("TYPE after samples".into()));
            }
            family.kind = kind.to_owned();
        } else if line.starts_with('#') {
            continue;
        } else {
            let sample = parse_sample(line).map_err(at)?;
            let name = current.clone().ok_or_else(|| at("sample before any family".into()))?;
            let family = families.get_mut(&name).ok_or_else(|| at("no family".into()))?;
            if !belongs(&name, &family.kind, &sample) {
                return Err(at(format!("sample does not belong to family {name} ({})", family.kind)));
            }
            if !seen.insert((sample.name.clone(), sample.labels.clone())) {
                return Err(at("duplicate series".into()));
            }
            family.samples.push(sample);
        }
    }
    for (name, family) in &families {
        if family.kind.is_empty() {
            return Err(format!("{name}: no TYPE"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(families)
}

/// Opens `name` as the current family; a family may not be reopened after another began.
fn declare<'a>(
    families: &'a mut BTreeMap<String, Family>,
    current: &mut Option<String>,
    name: &str,
) -> Result<&'a mut Family, String> {
    if current.as_deref() != Some(name) {
        if families.contains_key(name) {
            return Err(format!("family {name} declared again after another family"));
        }
        *current = Some(name.to_owned());
    }
    Ok(families.entry(name.to_owned()).or_insert_with(|| Family {
        help: String::new(),
        kind: String::new(),
        samples: Vec::new(),
    }))
}

fn belongs(family: &str, kind: &str, sample: &Sample) -> bool {
    match kind {
        "histogram" => {
            (sample.name == format!("{family}_bucket") && sample.labels.contains_key("le"))
                || sample.name == format!("{family}_sum")
                || sample.name == format!("{family}_count")
        }
        "summary" => {
            sample.name == family || sample.name == format!("{family}_sum") || sample.name == format!("{family}_count")
        }
        _ => sample.name == family,
    }
}

fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<Labels, f64> = BTreeMap::new();
    for sample in &family.samples {
        let mut labels = sample.labels.clone();
        if sample.name.ends_with("_bucket") {
            let le = labels.remove("le").unwrap_or_default();
            let bound = parse_value(&le).map_err(|e| format!("{name}: le {e}"))?;
            series.entry(labels).or_default().push((bound, sample.value));
        } else if sample.name.ends_with("_count") {
            counts.insert(labels, sample.value);
        }
    }
    for (labels, buckets) in &series {
        let increasing = buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        if !increasing {
            return Err(format!("{name}{labels:?}: buckets not cumulative"));
        }
        let last = buckets.last().ok_or_else(|| format!("{name}: no buckets"))?;
        if last.0 != f64::INFINITY || Some(&last.1) != counts.get(labels) {
            return Err(format!("{name}{labels:?}: +Inf bucket missing or not equal to _count"));
        }
    }
    if series.len() != counts.len() {
        return Err(format!("{name}: _count without buckets"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut labels = Labels::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest.split_once("=\"").ok_or("label without =\"")?;
            if label.is_empty()
                || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || label.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("invalid label name {label:?}"));
            }
            let (value, after) = take_quoted(after)?;
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            rest = after.strip_prefix(',').unwrap_or(after);
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| "bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads a label value up to its closing quote; returns it unescaped and the rest.
fn take_quoted(text: &str) -> Result<(String, &str), String> {
    let mut escaped = false;
    for (index, c) in text.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Ok((unescape(&text[..index], true)?, &text[index + 1..])),
            (false, '\n') => return Err("newline in label value".into()),
            (false, _) => {}
        }
    }
    Err("unterminated label value".into())
}

/// HELP allows `\\` and `\n`; label values also `\"`.
fn unescape(text: &str, label: bool) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if label => out.push('"'),
            other => return Err(format!("bad escape \\{other:?}")),
        }
    }
    Ok(out)
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse::<f64>().map_err(|_| format!("bad value {text:?}")),
    }
}

#[test]
fn the_parser_rejects_malformed_output() {
    let good = "# HELP a_total Help.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(parse(good).is_ok());
    for bad in [
        "a_total 1\n",                                                                    // no family
        "# TYPE a counter\nb 1\n",                                                        // wrong family
        "# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n",                                   // duplicate
        "# TYPE a gauge\na{x=\"\\t\"} 1\n",                                               // bad escape
        "# TYPE a gauge\na{x=\"1} 1\n",                                                   // unterminated
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n",                     // reopened
        "# TYPE a gauge\na one\n",                                                        // bad value
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // not cumulative
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n",                          // no +Inf
        "# TYPE a gauge\na 1",                                                            // no final newline
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
