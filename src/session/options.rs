//! The `options` startup parameter (`-c name=value`, `--name=value`), as libpq passes
//! PGOPTIONS: turned into session settings.

/// Splits `options` into settings. Backslash escapes the next character (so values may
/// contain spaces); any switch other than `-c`/`--` is refused, since it could only
/// mean something to a postmaster.
pub(super) fn parse_startup_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(options);
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words
                .next()
                .ok_or_else(|| "startup option -c needs name=value".to_owned())?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(format!(
                "unsupported startup option \"{word}\": only -c name=value is accepted"
            ));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("startup option \"{assignment}\" is not name=value"))?;
        if name.is_empty() {
            return Err(format!("startup option \"{assignment}\" has no name"));
        }
        // PostgreSQL accepts dashes for underscores in option names.
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    current.push(escaped);
                }
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_libpq_sends() {
        assert_eq!(
            parse_startup_options("-c geqo=off --statement-timeout=5s -csearch_path=a,b -c application_name=my\\ app")
                .unwrap(),
            vec![
                ("geqo".to_owned(), "off".to_owned()),
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("search_path".to_owned(), "a,b".to_owned()),
                ("application_name".to_owned(), "my app".to_owned()),
            ]
        );
    }

    #[test]
    fn refuses_other_switches() {
        assert!(parse_startup_options("-D /tmp").is_err());
        assert!(parse_startup_options("-c").is_err());
        assert!(parse_startup_options("-c novalue").is_err());
    }
}
