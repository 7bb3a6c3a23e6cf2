//! Client address rules in pg_hba.conf syntax (PgBouncer's `auth_hba_file` subset), from
//! `[server] hba_file` or inline `[server] hba = ["…", …]`: parsed into typed rules, every
//! mistake reported with its line. Matching a client against them is `access::hba`.
//!
//! Accepted: connection types `local`, `host`, `hostssl`, `hostnossl`; database and user
//! lists (comma-separated, `"quoted"` names, `all`, `sameuser`, `replication`, `@file`);
//! addresses as CIDR, as address plus mask, or `all`; methods `trust`, `reject`, `md5`,
//! `scram-sha-256`, `password`, `cert`. Anything else PostgreSQL knows (host names,
//! `samehost`, `+group`, `ident`, options such as `clientcert=`…) is an error rather than
//! silently ignored: a rule that does not mean what it says is worse than none.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Where the rules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HbaSource {
    /// `hba_file`: read (and read again at each reload) when the running state is built.
    File(PathBuf),
    /// `hba = [...]`, parsed with the rest of the config.
    Inline(Vec<HbaRule>),
}

/// Which connections a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnType {
    /// Unix-domain sockets: pgrelay listens on TCP only, so such a rule matches nothing.
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

/// One entry of a database or user list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMatch {
    All,
    /// Databases only: the database named like the user.
    SameUser,
    /// Databases only: replication connections, which pgrelay refuses anyway.
    Replication,
    Name(String),
}

/// The client addresses a host rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMatch {
    All,
    /// `addr/prefix`, host bits cleared.
    Net {
        addr: IpAddr,
        prefix: u8,
    },
}

/// What the client must do once a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaMethod {
    Trust,
    Reject,
    Md5,
    ScramSha256,
    Password,
    Cert,
}

impl HbaMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HbaMethod::Trust => "trust",
            HbaMethod::Reject => "reject",
            HbaMethod::Md5 => "md5",
            HbaMethod::ScramSha256 => "scram-sha-256",
            HbaMethod::Password => "password",
            HbaMethod::Cert => "cert",
        }
    }
}

/// One rule, with the line it came from (for logs and SHOW).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRule {
    pub line: usize,
    pub conn: ConnType,
    pub databases: Vec<NameMatch>,
    pub users: Vec<NameMatch>,
    /// `None` for `local`.
    pub address: Option<AddressMatch>,
    pub method: HbaMethod,
}

/// A mistake in the rules: the line (1-based, of the file or of the inline list) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for HbaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Reads and parses an hba file; `@file` names in it are relative to its directory.
pub fn read_file(path: &Path) -> Result<Vec<HbaRule>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: cannot read: {error}", path.display()))?;
    parse(&text, path.parent()).map_err(|errors| {
        errors
            .iter()
            .map(|error| format!("{}: {error}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Parses hba text; every bad line is reported. `base` is where `@file` names are looked
/// up (`None`: the working directory).
pub fn parse(text: &str, base: Option<&Path>) -> Result<Vec<HbaRule>, Vec<HbaError>> {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for (line, content) in logical_lines(text) {
        match tokenize(&content).and_then(|fields| rule(line, fields, base)) {
            Ok(Some(rule)) => rules.push(rule),
            Ok(None) => {}
            Err(message) => errors.push(HbaError { line, message }),
        }
    }
    if errors.is_empty() { Ok(rules) } else { Err(errors) }
}

/// Lines joined where one ends in a backslash, each with the number of its first line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        match raw.strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(raw);
                out.push((start, joined));
            }
        }
    }
    out.extend(pending);
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    quoted: bool,
}

/// Splits a line into fields (separated by whitespace) of tokens (separated by commas,
/// whitespace allowed after a comma); `#` outside quotes starts a comment.
fn tokenize(line: &str) -> Result<Vec<Vec<Token>>, String> {
    let mut fields: Vec<Vec<Token>> = Vec::new();
    let mut chars = line.chars().peekable();
    let mut field: Vec<Token> = Vec::new();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            Some(_) => {}
        }
        let mut token = Token {
            text: String::new(),
            quoted: false,
        };
        let mut in_quote = false;
        let mut comma = false;
        while let Some(&c) = chars.peek() {
            if in_quote {
                chars.next();
                if c == '"' {
                    // "" inside quotes is a quote character.
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        token.text.push('"');
                    } else {
                        in_quote = false;
                    }
                } else {
                    token.text.push(c);
                }
                continue;
            }
            if c.is_whitespace() || c == '#' {
                break;
            }
            chars.next();
            match c {
                '"' => {
                    in_quote = true;
                    token.quoted = true;
                }
                ',' => {
                    comma = true;
                    break;
                }
                c => token.text.push(c),
            }
        }
        if in_quote {
            return Err("unterminated quoted string".to_owned());
        }
        if token.text.is_empty() && !token.quoted {
            return Err("empty entry in a comma-separated list".to_owned());
        }
        field.push(token);
        if !comma {
            fields.push(std::mem::take(&mut field));
        }
    }
    if !field.is_empty() {
        return Err("a comma-separated list ends with a comma".to_owned());
    }
    Ok(fields)
}

fn rule(line: usize, fields: Vec<Vec<Token>>, base: Option<&Path>) -> Result<Option<HbaRule>, String> {
    let mut fields = fields.into_iter();
    let Some(conn) = fields.next() else { return Ok(None) };
    let conn = match single(conn, "connection type")?.as_str() {
        "local" => ConnType::Local,
        "host" => ConnType::Host,
        "hostssl" => ConnType::HostSsl,
        "hostnossl" => ConnType::HostNoSsl,
        other @ ("hostgssenc" | "hostnogssenc") => {
            return Err(format!(
                "connection type \"{other}\" is not supported: pgrelay does not offer GSSAPI encryption"
            ));
        }
        other => return Err(format!("invalid connection type \"{other}\"")),
    };
    let databases = names(
        fields.next().ok_or("end-of-line before database specification")?,
        true,
        base,
    )?;
    let users = names(
        fields.next().ok_or("end-of-line before role specification")?,
        false,
        base,
    )?;
    let address = match conn {
        ConnType::Local => None,
        _ => Some(address(
            fields.next().ok_or("end-of-line before IP address specification")?,
            &mut fields,
        )?),
    };
    let method = method(single(
        fields.next().ok_or("end-of-line before authentication method")?,
        "authentication method",
    )?)?;
    if let Some(option) = fields.next() {
        let shown: Vec<&str> = option.iter().map(|token| token.text.as_str()).collect();
        return Err(format!(
            "authentication options are not supported (\"{}\")",
            shown.join(",")
        ));
    }
    Ok(Some(HbaRule {
        line,
        conn,
        databases,
        users,
        address,
        method,
    }))
}

fn single(field: Vec<Token>, what: &str) -> Result<String, String> {
    match <[Token; 1]>::try_from(field) {
        Ok([token]) => Ok(token.text),
        Err(_) => Err(format!("multiple values in {what}")),
    }
}

fn names(field: Vec<Token>, database: bool, base: Option<&Path>) -> Result<Vec<NameMatch>, String> {
    let mut out = Vec::new();
    for token in field {
        if token.quoted {
            out.push(NameMatch::Name(token.text));
            continue;
        }
        match token.text.as_str() {
            "all" => out.push(NameMatch::All),
            "sameuser" if database => out.push(NameMatch::SameUser),
            "replication" if database => out.push(NameMatch::Replication),
            "samerole" | "samegroup" if database => {
                return Err(format!(
                    "\"{}\" is not supported (role membership is not known to pgrelay)",
                    token.text
                ));
            }
            name if name.starts_with('+') => {
                return Err(format!(
                    "group membership (\"{name}\") is not supported: list the user names"
                ));
            }
            name => match name.strip_prefix('@') {
                Some(file) => out.extend(included_names(file, base)?),
                None => out.push(NameMatch::Name(name.to_owned())),
            },
        }
    }
    Ok(out)
}

/// The names in an `@file`: whitespace- or comma-separated, `#` comments; all taken as
/// plain names (PostgreSQL gives keywords in them no special meaning either).
fn included_names(file: &str, base: Option<&Path>) -> Result<Vec<NameMatch>, String> {
    if file.is_empty() {
        return Err("\"@\" without a file name".to_owned());
    }
    let path = match base {
        Some(base) if Path::new(file).is_relative() => base.join(file),
        _ => PathBuf::from(file),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("cannot read included file {}: {error}", path.display()))?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ','))
        .filter(|name| !name.is_empty())
        .map(|name| NameMatch::Name(name.trim_matches('"').to_owned()))
        .collect())
}

fn address(field: Vec<Token>, rest: &mut impl Iterator<Item = Vec<Token>>) -> Result<AddressMatch, String> {
    let text = single(field, "IP address")?;
    match text.as_str() {
        "all" => return Ok(AddressMatch::All),
        "samehost" | "samenet" => {
            return Err(format!(
                "\"{text}\" is not supported: give the addresses in CIDR notation"
            ));
        }
        _ => {}
    }
    if let Some((addr, prefix)) = text.split_once('/') {
        let addr: IpAddr = addr.parse().map_err(|_| format!("invalid IP address \"{addr}\""))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| *prefix <= max_prefix(addr))
            .ok_or_else(|| format!("invalid CIDR mask in address \"{text}\""))?;
        return Ok(AddressMatch::Net {
            addr: masked(addr, prefix),
            prefix,
        });
    }
    let addr: IpAddr = text.parse().map_err(|_| {
        format!("invalid IP address \"{text}\": host names are not supported, use an address or CIDR range")
    })?;
    let mask = rest
        .next()
        .ok_or("specify an address range in CIDR notation, or provide a separate netmask")?;
    let mask_text = single(mask, "IP mask")?;
    let Ok(mask) = mask_text.parse::<IpAddr>() else {
        // Most likely the method, right after a lone address.
        return Err("specify an address range in CIDR notation, or provide a separate netmask".to_owned());
    };
    let prefix = prefix_of(addr, mask).ok_or_else(|| format!("invalid IP mask \"{mask_text}\""))?;
    Ok(AddressMatch::Net {
        addr: masked(addr, prefix),
        prefix,
    })
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The network mask of `prefix` bits for an address of `addr`'s family, as bits.
pub(crate) fn mask_bits(addr: IpAddr, prefix: u8) -> u128 {
    let width = u32::from(max_prefix(addr));
    let all = if width == 128 { u128::MAX } else { (1u128 << width) - 1 };
    let host_bits = width - u32::from(prefix);
    if host_bits >= 128 {
        0
    } else {
        all & !((1u128 << host_bits) - 1)
    }
}

/// Whether `addr` lies in `net/prefix` (the same family only).
pub(crate) fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    addr.is_ipv4() == net.is_ipv4() && bits(addr) & mask_bits(net, prefix) == bits(net)
}

fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    let kept = bits(addr) & mask_bits(addr, prefix);
    match addr {
        IpAddr::V4(_) => IpAddr::V4((u32::try_from(kept).unwrap_or(0)).into()),
        IpAddr::V6(_) => IpAddr::V6(kept.into()),
    }
}

/// The prefix length a netmask stands for; `None` for a mask of the other family or one
/// whose bits are not contiguous.
fn prefix_of(addr: IpAddr, mask: IpAddr) -> Option<u8> {
    if addr.is_ipv4() != mask.is_ipv4() {
        return None;
    }
    let width = max_prefix(addr);
    let bits = bits(mask) << (128 - u32::from(width));
    let prefix = u8::try_from(bits.leading_ones()).ok()?;
    (bits.checked_shl(u32::from(prefix)).unwrap_or(0) == 0).then_some(prefix)
}

fn method(text: String) -> Result<HbaMethod, String> {
    Ok(match text.as_str() {
        "trust" => HbaMethod::Trust,
        "reject" => HbaMethod::Reject,
        "md5" => HbaMethod::Md5,
        "scram-sha-256" => HbaMethod::ScramSha256,
        "password" => HbaMethod::Password,
        "cert" => HbaMethod::Cert,
        "peer" | "ident" | "gss" | "sspi" | "ldap" | "radius" | "pam" | "bsd" | "oauth" => {
            return Err(format!("authentication method \"{text}\" is not supported by pgrelay"));
        }
        other => return Err(format!("invalid authentication method \"{other}\"")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> AddressMatch {
        let (addr, prefix) = text.split_once('/').unwrap();
        AddressMatch::Net {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text, None).unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_typical_file() {
        let text = "\
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    app,\"All\"       app, \"bob smith\" 10.1.2.3/8              scram-sha-256
hostssl all             all             192.168.0.0 255.255.0.0 md5   # office
hostnossl sameuser,replication all     ::1/128                 password

host    all             all             all                     reject
host    all             all             0.0.0.0/0 \\
        cert
";
        let rules = parse(text, None).unwrap();
        assert_eq!(rules.len(), 6);
        assert_eq!(
            rules[0],
            HbaRule {
                line: 2,
                conn: ConnType::Local,
                databases: vec![NameMatch::All],
                users: vec![NameMatch::All],
                address: None,
                method: HbaMethod::Trust,
            }
        );
        assert_eq!(rules[1].line, 3);
        assert_eq!(
            rules[1].databases,
            [NameMatch::Name("app".into()), NameMatch::Name("All".into())]
        );
        assert_eq!(
            rules[1].users,
            [NameMatch::Name("app".into()), NameMatch::Name("bob smith".into())]
        );
        assert_eq!(rules[1].address, Some(net("10.0.0.0/8")), "host bits are cleared");
        assert_eq!(rules[2].conn, ConnType::HostSsl);
        assert_eq!(rules[2].address, Some(net("192.168.0.0/16")));
        assert_eq!(rules[2].method, HbaMethod::Md5);
        assert_eq!(rules[3].databases, [NameMatch::SameUser, NameMatch::Replication]);
        assert_eq!(rules[3].address, Some(net("::1/128")));
        assert_eq!(rules[3].method, HbaMethod::Password);
        assert_eq!(rules[4].address, Some(AddressMatch::All));
        assert_eq!((rules[5].line, rules[5].method), (8, HbaMethod::Cert), "continued line");
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let text = "\
host all all 10.0.0.0/8 md5
hots all all 10.0.0.0/8 md5
host all all 10.0.0.0/33 md5
host all all 10.0.0.1 md5
host all all db.example.com/32 md5
host all all 10.0.0.0 255.0.255.0 md5
host all all 10.0.0.0/8 ident
host all all 10.0.0.0/8 md5 clientcert=verify-full
host all
host all +admins 10.0.0.0/8 md5
host \"unterminated all 10.0.0.0/8 md5
host a,,b all 10.0.0.0/8 md5
host all all samenet md5
hostgssenc all all 10.0.0.0/8 md5
host all all 10.0.0.0/8 md5,trust
host all all 10.0.0.0/8 foo
";
        assert_eq!(
            errors(text),
            [
                "line 2: invalid connection type \"hots\"",
                "line 3: invalid CIDR mask in address \"10.0.0.0/33\"",
                "line 4: specify an address range in CIDR notation, or provide a separate netmask",
                "line 5: invalid IP address \"db.example.com\"",
                "line 6: invalid IP mask \"255.0.255.0\"",
                "line 7: authentication method \"ident\" is not supported by pgrelay",
                "line 8: authentication options are not supported (\"clientcert=verify-full\")",
                "line 9: end-of-line before role specification",
                "line 10: group membership (\"+admins\") is not supported: list the user names",
                "line 11: unterminated quoted string",
                "line 12: empty entry in a comma-separated list",
                "line 13: \"samenet\" is not supported: give the addresses in CIDR notation",
                "line 14: connection type \"hostgssenc\" is not supported: pgrelay does not offer GSSAPI encryption",
                "line 15: multiple values in authentication method",
                "line 16: invalid authentication method \"foo\"",
            ]
        );
    }

    #[test]
    fn included_names_are_read_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admins.txt"), "alice, bob # the two\ncarol\n").unwrap();
        std::fs::write(
            dir.path().join("pgrelay_hba.conf"),
            "host all @admins.txt 0.0.0.0/0 trust\n",
        )
        .unwrap();
        let rules = read_file(&dir.path().join("pgrelay_hba.conf")).unwrap();
        assert_eq!(
            rules[0].users,
            ["alice", "bob", "carol"].map(|name| NameMatch::Name(name.into()))
        );
        let missing = parse("host all @nope.txt all trust\n", Some(dir.path())).unwrap_err();
        assert!(
            missing[0].message.starts_with("cannot read included file"),
            "{missing:?}"
        );
        let unreadable = read_file(&dir.path().join("absent.conf")).unwrap_err();
        assert!(unreadable.contains("absent.conf: cannot read"), "{unreadable}");
    }

    #[test]
    fn networks_and_masks() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(in_net(ip("10.1.2.3"), ip("10.0.0.0"), 8));
        assert!(!in_net(ip("11.1.2.3"), ip("10.0.0.0"), 8));
        assert!(in_net(ip("127.0.0.2"), ip("127.0.0.2"), 32));
        assert!(!in_net(ip("127.0.0.1"), ip("127.0.0.2"), 32));
        assert!(in_net(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(!in_net(ip("::1"), ip("0.0.0.0"), 0), "families differ");
        assert!(in_net(ip("fe80::1"), ip("fe80::"), 10));
        assert!(in_net(ip("::1"), ip("::"), 0));
        assert_eq!(prefix_of(ip("10.0.0.0"), ip("255.255.255.0")), Some(24));
        assert_eq!(prefix_of(ip("10.0.0.0"), ip("0.0.0.0")), Some(0));
        assert_eq!(prefix_of(ip("10.0.0.0"), ip("255.255.255.255")), Some(32));
        assert_eq!(prefix_of(ip("::"), ip("ffff:ffff::")), Some(32));
        assert_eq!(prefix_of(ip("10.0.0.0"), ip("::")), None);
    }
}
