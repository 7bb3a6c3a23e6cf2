//! The keyword-valued settings (`mode = "transaction"`, `load_balance = "round_robin"`, …).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Defines a keyword enum whose config spelling is given per variant, with `as_str`, `Display`,
/// `from_name` and a `Deserialize` whose error lists the accepted words.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        $name:ident default $default:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order the documentation lists them.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The spelling used in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// Looks a value up by its config-file spelling.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == name)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_str(KeywordVisitor::<Self>::new(
                    Self::ALL,
                    Self::as_str,
                    Self::from_name,
                ))
            }
        }
    };
}

/// Shared visitor so that every keyword setting reports the same kind of message.
struct KeywordVisitor<T: 'static> {
    all: &'static [T],
    name: fn(T) -> &'static str,
    lookup: fn(&str) -> Option<T>,
}

impl<T: Copy> KeywordVisitor<T> {
    fn new(all: &'static [T], name: fn(T) -> &'static str, lookup: fn(&str) -> Option<T>) -> Self {
        Self { all, name, lookup }
    }

    fn choices(&self) -> String {
        let names: Vec<&str> = self.all.iter().map(|v| (self.name)(*v)).collect();
        names.join(" | ")
    }
}

impl<T: Copy> Visitor<'_> for KeywordVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "one of: {}", self.choices())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.lookup)(v).ok_or_else(|| E::custom(format!("unknown value {v:?}, expected one of: {}", self.choices())))
    }
}

keyword_enum! {
    /// When a server connection goes back to the pool.
    PoolMode default Transaction {
        /// When the client disconnects.
        Session = "session",
        /// At the end of each transaction.
        Transaction = "transaction",
        /// After each statement (multi-statement transactions are refused).
        Statement = "statement",
    }
}

keyword_enum! {
    /// How a client's LISTEN is served in transaction and statement mode.
    ListenNotify default Fanout {
        /// pgrelay answers LISTEN/UNLISTEN itself; one listener connection per database
        /// LISTENs to the union of its clients' channels (docs/notifications.md).
        Fanout = "fanout",
        /// LISTEN goes to the client's server, which the client then keeps (pinned).
        Pin = "pin",
    }
}

keyword_enum! {
    /// How reads are spread over the usable replicas.
    LoadBalance default LeastConnections {
        RoundRobin = "round_robin",
        Random = "random",
        LeastConnections = "least_connections",
    }
}

keyword_enum! {
    /// Where an explicit transaction that is not `READ ONLY` goes.
    TransactionRouting default Primary {
        /// Always to the primary.
        Primary = "primary",
        /// Where its first statement would go on its own.
        FirstStatement = "first_statement",
    }
}

keyword_enum! {
    /// How fresh a replica must be to serve a read (see docs/routing.md).
    Consistency default Session {
        /// Any healthy replica within `max_replica_lag`.
        Eventual = "eventual",
        /// A client reads its own committed writes.
        Session = "session",
        /// A read sees every write committed through pgrelay before it began, to the tables it touches.
        Causal = "causal",
    }
}

keyword_enum! {
    /// Where pgrelay learns which function calls make a statement a write.
    FunctionVolatility default Catalog {
        /// Every function the database's catalog marks `VOLATILE`, but a few read-safe built-ins.
        Catalog = "catalog",
        /// Only the built-in rules and `write_functions`.
        Lists = "lists",
    }
}

keyword_enum! {
    /// Per-database override of the read/write routing.
    RoutingTarget default Auto {
        /// Route by statement.
        Auto = "auto",
        /// Everything to the primary.
        Primary = "primary",
        /// Everything to replicas (a read-only alias).
        Replica = "replica",
    }
}

keyword_enum! {
    /// Client-facing TLS policy, used when `[server.tls]` is present.
    ClientTlsMode default Allow {
        /// Answer `SSLRequest` with 'N'.
        Disable = "disable",
        /// TLS when the client asks for it.
        Allow = "allow",
        /// Refuse clients that do not use TLS.
        Require = "require",
    }
}

keyword_enum! {
    /// Whether clients on TLS are offered SCRAM-SHA-256-PLUS (`[server.tls] channel_binding`).
    ChannelBindingMode default Offer {
        /// As PostgreSQL: -PLUS first, bound to pgrelay's certificate.
        Offer = "offer",
        /// SCRAM-SHA-256 only: for clients that reach pgrelay through a proxy that terminates
        /// or adds TLS, whose binding would name the proxy's certificate.
        Disable = "disable",
    }
}

keyword_enum! {
    /// TLS towards the PostgreSQL servers, with libpq's `sslmode` meanings.
    ServerTlsMode default Prefer {
        Disable = "disable",
        Prefer = "prefer",
        Require = "require",
        /// Require TLS and check the certificate chain against `ca` and the host name.
        VerifyFull = "verify-full",
    }
}

keyword_enum! {
    /// How a client must prove who it is.
    AuthMethod default ScramSha256 {
        ScramSha256 = "scram-sha-256",
        Md5 = "md5",
        /// No password is asked.
        Trust = "trust",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Holder {
        mode: PoolMode,
    }

    #[test]
    fn names_round_trip() {
        for mode in ServerTlsMode::ALL {
            assert_eq!(ServerTlsMode::from_name(mode.as_str()), Some(*mode));
        }
        assert_eq!(ServerTlsMode::VerifyFull.to_string(), "verify-full");
        assert_eq!(LoadBalance::default(), LoadBalance::LeastConnections);
        assert_eq!(AuthMethod::from_name("scram-sha-256"), Some(AuthMethod::ScramSha256));
        assert_eq!(PoolMode::from_name("Session"), None);
    }

    #[test]
    fn errors_list_the_choices() {
        let ok: Holder = toml::from_str("mode = \"statement\"").unwrap();
        assert_eq!(ok.mode, PoolMode::Statement);
        let err = toml::from_str::<Holder>("mode = \"sesion\"").unwrap_err();
        assert_eq!(
            err.message(),
            "unknown value \"sesion\", expected one of: session | transaction | statement"
        );
        let err = toml::from_str::<Holder>("mode = 3").unwrap_err();
        assert!(err.message().contains("expected one of: session"), "{err}");
    }
}
