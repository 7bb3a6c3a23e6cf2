//! The TOML configuration: typed settings with the defaults of docs/configuration.md, every problem reported by key path.
//!
//! [`load`] / [`parse`] return an immutable [`Config`] or [`ConfigErrors`] listing every
//! problem found: TOML syntax (with line and column), unknown keys, wrong types, missing
//! required keys and semantic mistakes, each as `key.path: message`.

mod auth_query;
mod database;
pub mod duration;
mod enums;
pub mod hba;
mod pool;
mod raw;
mod secret;
mod section;
mod server;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

pub use auth_query::{AuthQueryConfig, AuthQueryKeys, DEFAULT_AUTH_CACHE_TTL, DEFAULT_AUTH_QUERY};
pub use database::{DatabaseConfig, RoutingConfig, ServerTlsConfig};
pub use duration::{format_duration, format_limit, format_size, parse_duration, parse_size};
pub use enums::{
    AuthMethod, ChannelBindingMode, ClientTlsMode, Consistency, FunctionVolatility, ListenNotify, LoadBalance,
    PoolMode, RoutingTarget, ServerTlsMode, TransactionRouting,
};
pub use pool::{PoolConfig, PoolOverrides};
pub use secret::{PasswordForm, SecretError, check_md5, check_password};
pub use server::{ClientTlsConfig, InstanceIdSetting, LoginRateConfig, Peers, ServerConfig, TcpOptions, UserConfig};
pub use validate::{split_host_port, validate};

/// The database name of the admin console; no `[databases]` entry may use it.
pub const ADMIN_DATABASE: &str = "pgrelay";
/// The `[databases."*"]` key: serves any dbname without an entry of its own.
pub const FALLBACK_DATABASE: &str = "*";

/// The whole configuration. Plain data, so that a reload can compare two of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    /// Defaults for every database; see [`DatabaseConfig::pool`].
    pub pool: PoolConfig,
    pub users: Vec<UserConfig>,
    /// Keyed by the dbname clients connect with; may contain [`FALLBACK_DATABASE`].
    pub databases: BTreeMap<String, DatabaseConfig>,
}

impl Config {
    /// The entry serving a client's `dbname`: its own entry, else the `"*"` entry.
    /// Returns the entry's key too (`"*"` for the fallback).
    pub fn database(&self, dbname: &str) -> Option<(&str, &DatabaseConfig)> {
        self.databases
            .get_key_value(dbname)
            .or_else(|| self.databases.get_key_value(FALLBACK_DATABASE))
            .map(|(key, db)| (key.as_str(), db))
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|user| user.name == name)
    }

    /// The `max_user_connections` in force for `user` (0: no limit): its `[[users]]`
    /// entry's own, else `[pool]`'s (also for users found by auth_query).
    pub fn max_user_connections(&self, user: &str) -> usize {
        self.user(user)
            .and_then(|user| user.max_user_connections)
            .unwrap_or(self.pool.max_user_connections)
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.server.admin_users.iter().any(|name| name == user)
    }

    pub fn is_stats_user(&self, user: &str) -> bool {
        self.server.stats_users.iter().any(|name| name == user)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `databases.app.routing.load_balance` or `users[0].name`; the file's
    /// path or empty for problems with the file as a whole.
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file; never empty. Displays one problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;

    fn into_iter(self) -> Self::IntoIter {
        self.problems.into_iter()
    }
}

/// Reads and parses the file at `path`. Problems with the file as a whole (unreadable, TOML
/// syntax) carry the file's path.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
        problems: vec![Problem::new(shown.clone(), format!("cannot read the file: {err}"))],
    })?;
    parse(&text).map_err(|mut errors| {
        for problem in &mut errors.problems {
            if problem.path.is_empty() {
                problem.path.clone_from(&shown);
            }
        }
        errors
    })
}

/// Parses and validates config text.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let table: toml::Table = toml::from_str(text).map_err(|err| ConfigErrors {
        problems: vec![syntax_problem(text, &err)],
    })?;
    let mut problems = Vec::new();
    let config = raw::build(table, &mut problems);
    // A key already reported as unreadable holds a placeholder; judging it again would only
    // repeat the first report in vaguer words.
    let unreadable: BTreeSet<String> = problems.iter().map(|p| p.path.clone()).collect();
    problems.extend(
        validate(&config)
            .into_iter()
            .filter(|problem| !unreadable.contains(&problem.path)),
    );
    if problems.is_empty() {
        Ok(config)
    } else {
        // Grouped by section in file-layout order, then by key path, so that a database's
        // structural and semantic problems are listed together. Stable: at one path, the
        // structural problem stays first.
        problems.sort_by_cached_key(|problem| problem_order(&problem.path));
        Err(ConfigErrors { problems })
    }
}

fn problem_order(path: &str) -> (u8, usize, String) {
    let section = path.split(['.', '[']).next().unwrap_or_default();
    let rank = match section {
        "server" => 0,
        "pool" => 1,
        "users" => 2,
        "databases" => 3,
        _ => 4,
    };
    // users[10] after users[9], not after users[1].
    let index = path
        .strip_prefix("users[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (rank, index, path.to_owned())
}

fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
    let message = err.message().trim();
    let Some(span) = err.span() else {
        return Problem::new("", format!("TOML syntax error: {message}"));
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, last)| last)
        .chars()
        .count()
        + 1;
    Problem::new(
        "",
        format!("TOML syntax error at line {line}, column {column}: {message}"),
    )
}

#[cfg(test)]
mod tests;
