//! Which client address rule applies to a login: the first rule whose connection type,
//! database, user and address all match, as in PostgreSQL. No match, or a `reject` rule,
//! refuses the login with 28000 worded as PostgreSQL words it.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::hba::{AddressMatch, ConnType, HbaMethod, HbaRule, NameMatch, in_net};
use crate::error::{ClientError, Side, sqlstate};

/// What a client asks for, as far as the rules care.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    pub ip: IpAddr,
    pub tls: bool,
    pub user: &'a str,
    pub database: &'a str,
}

impl LoginRequest<'_> {
    /// The end of PostgreSQL's messages: `host "…", user "…", database "…", SSL encryption`.
    fn described(&self) -> String {
        format!(
            "host \"{}\", user \"{}\", database \"{}\", {}",
            self.ip,
            self.user,
            self.database,
            if self.tls { "SSL encryption" } else { "no encryption" }
        )
    }
}

/// The rules in force, from `hba_file` or `hba`.
#[derive(Debug, Clone)]
pub struct HbaRules {
    /// Where they came from, for logs: the file's path or `server.hba`.
    pub source: String,
    pub rules: Arc<Vec<HbaRule>>,
}

impl HbaRules {
    /// The method the first matching rule asks for; an error for `reject` or no match.
    pub fn method_for(&self, request: &LoginRequest<'_>) -> Result<(HbaMethod, usize), ClientError> {
        let ip = canonical(request.ip);
        let Some(rule) = self.rules.iter().find(|rule| matches(rule, ip, request)) else {
            return Err(ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                format!("no pg_hba.conf entry for {}", request.described()),
            ));
        };
        if rule.method == HbaMethod::Reject {
            return Err(ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                format!("pg_hba.conf rejects connection for {}", request.described()),
            ));
        }
        Ok((rule.method, rule.line))
    }
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:a.b.c.d`) matches IPv4 rules.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn matches(rule: &HbaRule, ip: IpAddr, request: &LoginRequest<'_>) -> bool {
    let conn = match rule.conn {
        // pgrelay listens on TCP only.
        ConnType::Local => false,
        ConnType::Host => true,
        ConnType::HostSsl => request.tls,
        ConnType::HostNoSsl => !request.tls,
    };
    conn && rule.databases.iter().any(|name| match name {
        NameMatch::All => true,
        NameMatch::SameUser => request.database == request.user,
        // pgrelay refuses replication connections before any rule is read.
        NameMatch::Replication => false,
        NameMatch::Name(name) => name == request.database,
    }) && rule.users.iter().any(|name| match name {
        NameMatch::All => true,
        NameMatch::Name(name) => name == request.user,
        NameMatch::SameUser | NameMatch::Replication => false,
    }) && match rule.address {
        Some(AddressMatch::All) => true,
        Some(AddressMatch::Net { addr, prefix }) => in_net(ip, addr, prefix),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hba::parse;

    fn rules(text: &str) -> HbaRules {
        HbaRules {
            source: "test".to_owned(),
            rules: Arc::new(parse(text, None).unwrap()),
        }
    }

    fn check(rules: &HbaRules, ip: &str, tls: bool, user: &str, database: &str) -> Result<(HbaMethod, usize), String> {
        rules
            .method_for(&LoginRequest {
                ip: ip.parse().unwrap(),
                tls,
                user,
                database,
            })
            .map_err(|error| format!("{} {}", error.sqlstate, error.message))
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = rules(
            "\
local   all  all                 trust
hostssl all  all   0.0.0.0/0     scram-sha-256
host    app  app   127.0.0.1/32  md5
host    all  evil  127.0.0.0/8   reject
host    sameuser all 127.0.0.0/8 password
host    all  all   ::1/128       trust
host    \"pgrelay\" admin 127.0.0.0/8 trust
",
        );
        assert_eq!(
            check(&rules, "127.0.0.1", true, "app", "app"),
            Ok((HbaMethod::ScramSha256, 2))
        );
        assert_eq!(check(&rules, "127.0.0.1", false, "app", "app"), Ok((HbaMethod::Md5, 3)));
        assert_eq!(
            check(&rules, "127.0.0.2", false, "app", "other"),
            Err(
                "28000 no pg_hba.conf entry for host \"127.0.0.2\", user \"app\", database \"other\", no encryption"
                    .into()
            )
        );
        assert_eq!(
            check(&rules, "127.0.0.2", false, "app", "app"),
            Ok((HbaMethod::Password, 5))
        );
        assert_eq!(
            check(&rules, "127.0.0.9", false, "evil", "x"),
            Err("28000 pg_hba.conf rejects connection for host \"127.0.0.9\", user \"evil\", database \"x\", no encryption".into())
        );
        assert_eq!(
            check(&rules, "127.0.0.9", false, "bob", "bob"),
            Ok((HbaMethod::Password, 5))
        );
        assert_eq!(check(&rules, "::1", false, "bob", "x"), Ok((HbaMethod::Trust, 6)));
        assert_eq!(
            check(&rules, "::ffff:127.0.0.1", false, "app", "app"),
            Ok((HbaMethod::Md5, 3))
        );
        assert_eq!(
            check(&rules, "127.0.0.3", false, "admin", "pgrelay"),
            Ok((HbaMethod::Trust, 7))
        );
        assert!(check(&rules, "10.0.0.1", false, "admin", "pgrelay").is_err());
        assert_eq!(
            check(&rules, "10.0.0.1", true, "x", "y").map(|(method, _)| method),
            Ok(HbaMethod::ScramSha256)
        );
    }

    #[test]
    fn hostnossl_and_replication() {
        let rules = rules("host replication all all trust\nhostnossl all all all md5\n");
        assert_eq!(check(&rules, "10.0.0.1", false, "a", "b"), Ok((HbaMethod::Md5, 2)));
        assert_eq!(
            check(&rules, "10.0.0.1", true, "a", "b"),
            Err("28000 no pg_hba.conf entry for host \"10.0.0.1\", user \"a\", database \"b\", SSL encryption".into())
        );
    }
}
