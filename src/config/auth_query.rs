//! `auth_user`, `auth_query` and `auth_cache_ttl`: passwords of users not in `[[users]]`, looked
//! up in PostgreSQL. Set in `[server]` as a default for every database, or per database.

use std::time::Duration;

use super::section::key_path;
use super::{Config, PasswordForm, Problem, UserConfig};

/// What runs when `auth_user` is set and `auth_query` is not. It reads `pg_authid`, which only
/// a superuser may; docs/configuration.md shows the `SECURITY DEFINER` function a DBA creates
/// instead. An expired password (`VALID UNTIL` in the past) reads as no password, and a role
/// without LOGIN as no role, as PostgreSQL itself would treat them. Every name is
/// schema-qualified, so the side connection's `search_path` cannot change what runs.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() \
     THEN NULL ELSE rolpassword END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";

/// How long an answer is used before PostgreSQL is asked again.
pub const DEFAULT_AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// The three keys as one section (`[server]` or `[databases.NAME]`) wrote them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthQueryKeys {
    pub auth_user: Option<String>,
    pub auth_query: Option<String>,
    pub auth_cache_ttl: Option<Duration>,
    pub auth_dbname: Option<String>,
}

/// The effective settings of one database: passwords of users not in `[[users]]` come from
/// running `query` as `auth_user` on the database's primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthQueryConfig {
    /// A `[[users]]` entry whose password logs in to PostgreSQL.
    pub auth_user: String,
    /// Takes the login name as `$1`; answers one row of (name, password) or none.
    pub query: String,
    pub cache_ttl: Duration,
    /// The database the query runs in (`auth_dbname`); `None`: the client's database.
    /// Required for `"*"` (see `validate`).
    pub dbname: Option<String>,
}

impl AuthQueryKeys {
    /// This section's keys over `defaults` (the `[server]` section's): `None` when neither
    /// names an `auth_user`.
    pub fn resolve(&self, defaults: &AuthQueryKeys) -> Option<AuthQueryConfig> {
        let auth_user = self.auth_user.as_ref().or(defaults.auth_user.as_ref())?;
        Some(AuthQueryConfig {
            auth_user: auth_user.clone(),
            query: self
                .auth_query
                .as_ref()
                .or(defaults.auth_query.as_ref())
                .map_or_else(|| DEFAULT_AUTH_QUERY.to_owned(), Clone::clone),
            cache_ttl: self
                .auth_cache_ttl
                .or(defaults.auth_cache_ttl)
                .unwrap_or(DEFAULT_AUTH_CACHE_TTL),
            dbname: self.auth_dbname.as_ref().or(defaults.auth_dbname.as_ref()).cloned(),
        })
    }

    fn is_empty(&self) -> bool {
        *self == AuthQueryKeys::default()
    }
}

impl Config {
    /// The auth_query settings of the `[databases]` entry `key`, with `[server]`'s defaults.
    pub fn auth_query(&self, key: &str) -> Option<AuthQueryConfig> {
        let database = self.databases.get(key)?;
        database.auth_query.resolve(&self.server.auth_query)
    }
}

/// Problems with the keys in `[server]` and in each database.
pub(super) fn validate(config: &Config, out: &mut Vec<Problem>) {
    let server = &config.server.auth_query;
    check_section("server", server, None, &config.users, out);
    for (name, database) in &config.databases {
        let path = key_path("databases", name);
        check_section(&path, &database.auth_query, Some(server), &config.users, out);
    }
    // Databases made from "*" are named by clients: running the query in the client's
    // database would let anyone who can create a database (or a schema in one) answer it,
    // and would open a side connection per name. They share one lookup in a fixed database.
    if let Some(settings) = config.auth_query("*")
        && settings.dbname.is_none()
    {
        out.push(Problem::new(
            key_path(&key_path("databases", "*"), "auth_dbname"),
            "required when databases made from \"*\" use auth_query (here or in [server]): \
             the database the query runs in, e.g. \"postgres\"",
        ));
    }
}

fn check_section(
    path: &str,
    keys: &AuthQueryKeys,
    defaults: Option<&AuthQueryKeys>,
    users: &[UserConfig],
    out: &mut Vec<Problem>,
) {
    if keys.is_empty() {
        return;
    }
    let auth_user = keys
        .auth_user
        .as_ref()
        .or_else(|| defaults.and_then(|defaults| defaults.auth_user.as_ref()));
    if auth_user.is_none() {
        let key = if keys.auth_query.is_some() {
            "auth_query"
        } else {
            "auth_cache_ttl"
        };
        out.push(Problem::new(
            key_path(path, key),
            "needs auth_user (here or in [server]), the user that runs the query",
        ));
    }
    if let Some(name) = &keys.auth_user {
        let user_path = key_path(path, "auth_user");
        match users.iter().find(|user| user.name == *name) {
            None => out.push(Problem::new(
                user_path,
                format!("user {name:?} is not defined in [[users]]"),
            )),
            Some(user) if !can_log_in(user) => out.push(Problem::new(
                user_path,
                format!(
                    "user {name:?} has no password pgrelay can log in to PostgreSQL with \
                     (a plaintext password or md5 hash in password or server_password)"
                ),
            )),
            Some(_) => {}
        }
    }
    if let Some(query) = &keys.auth_query {
        let query_path = key_path(path, "auth_query");
        if query.trim().is_empty() {
            out.push(Problem::new(query_path, "must not be empty"));
        } else if !takes_only_first_parameter(query) {
            out.push(Problem::new(query_path, "must take the login name as $1"));
        }
    }
    if keys.auth_cache_ttl.is_some_and(|ttl| ttl.is_zero()) {
        out.push(Problem::new(
            key_path(path, "auth_cache_ttl"),
            "must be more than zero: every login would run the query",
        ));
    }
}

/// Whether `query` refers to `$1` and to no other parameter (`$10` is not `$1`): only the
/// login name is bound.
fn takes_only_first_parameter(query: &str) -> bool {
    let bytes = query.as_bytes();
    let mut first = false;
    for (at, _) in query.match_indices('$') {
        let digits = bytes[at + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        match &query[at + 1..at + 1 + digits] {
            "" => {}
            "1" => first = true,
            _ => return false,
        }
    }
    first
}

/// The auth_user logs in to PostgreSQL before any client has: it needs a secret that works
/// without one (a SCRAM verifier only works for pass-through after its own client login).
fn can_log_in(user: &UserConfig) -> bool {
    user.password_for_server()
        .is_some_and(|password| matches!(PasswordForm::of(password), PasswordForm::Plaintext | PasswordForm::Md5))
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    const BASE: &str = r#"
[[users]]
name = "app"
password = "app"

[[users]]
name = "scram_only"
password = "SCRAM-SHA-256$4096:s7y0Go61+pl2GCGU09+CIg==$XPbNadlJavlZQDs1de6byrscFB4Og2DoJTjchOqRd+c=:T+XuC7QZEAc7PBUGtodF60J9Uja+RQ1Iv+/M4Hym01A="

[databases.app]
primary = "127.0.0.1:5432"
"#;

    fn problems(extra: &str) -> Vec<String> {
        match parse(&format!("{BASE}{extra}")) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let config = parse(&format!("{BASE}auth_user = \"app\"\n")).unwrap();
        assert_eq!(
            config.auth_query("app"),
            Some(AuthQueryConfig {
                auth_user: "app".to_owned(),
                query: DEFAULT_AUTH_QUERY.to_owned(),
                cache_ttl: Duration::from_secs(60),
                dbname: None,
            })
        );
        let text = BASE.replace(
            "[databases.app]",
            "[server]\nauth_user = \"app\"\nauth_cache_ttl = \"5s\"\n\n[databases.app]",
        );
        let config = parse(&format!(
            "{text}auth_query = \"SELECT usename, passwd FROM pgrelay.user_lookup($1)\"\n"
        ))
        .unwrap();
        let resolved = config.auth_query("app").unwrap();
        assert_eq!(resolved.auth_user, "app");
        assert_eq!(resolved.cache_ttl, Duration::from_secs(5));
        assert!(resolved.query.contains("pgrelay.user_lookup"));
        assert_eq!(parse(BASE).unwrap().auth_query("app"), None);
        assert_eq!(parse(BASE).unwrap().auth_query("nope"), None);
    }

    #[test]
    fn rules() {
        assert_eq!(problems("auth_user = \"app\"\n"), Vec::<String>::new());
        assert_eq!(
            problems("auth_user = \"ghost\"\n"),
            ["databases.app.auth_user: user \"ghost\" is not defined in [[users]]"]
        );
        assert!(
            problems("auth_user = \"scram_only\"\n")[0]
                .starts_with("databases.app.auth_user: user \"scram_only\" has no password")
        );
        assert_eq!(
            problems("auth_query = \"SELECT 1, 2 WHERE $1 = ''\"\n"),
            ["databases.app.auth_query: needs auth_user (here or in [server]), the user that runs the query"]
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_query = \"SELECT rolname, rolpassword FROM pg_authid\"\n"),
            ["databases.app.auth_query: must take the login name as $1"]
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_query = \"SELECT $10, $1\"\n"),
            ["databases.app.auth_query: must take the login name as $1"]
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_query = \"SELECT $10 WHERE $$a$$ = $1\"\n"),
            ["databases.app.auth_query: must take the login name as $1"]
        );
        assert!(problems("auth_user = \"app\"\nauth_query = \"SELECT $$x$$, $1\"\n").is_empty());
        let star = "\n[databases.\"*\"]\nprimary = \"127.0.0.1:5432\"\nauth_user = \"app\"\n";
        assert_eq!(
            problems(star),
            [
                "databases.\"*\".auth_dbname: required when databases made from \"*\" use auth_query \
              (here or in [server]): the database the query runs in, e.g. \"postgres\""
            ]
        );
        assert!(problems(&format!("{star}auth_dbname = \"postgres\"\n")).is_empty());
        assert_eq!(
            parse(&format!("{BASE}{star}auth_dbname = \"postgres\"\n"))
                .unwrap()
                .auth_query("*")
                .unwrap()
                .dbname
                .as_deref(),
            Some("postgres")
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_query = \" \"\n"),
            ["databases.app.auth_query: must not be empty"]
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_cache_ttl = \"0\"\n"),
            ["databases.app.auth_cache_ttl: must be more than zero: every login would run the query"]
        );
        assert_eq!(
            problems("auth_user = \"app\"\nauth_cache_ttl = 5\n").len(),
            1,
            "durations are strings"
        );
        assert_eq!(
            problems("auth_usr = \"app\"\n"),
            ["databases.app.auth_usr: unknown key (did you mean \"auth_user\"?)"]
        );
    }
}
