//! The fixed label values of docs/metrics.md as enums, so no caller can invent a new series by typo
//! and handles can live in arrays indexed by the enum instead of maps keyed by strings.

/// `role` label: which side of a database a server connection or a statement went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Primary, Role::Replica];

    pub fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Role::Primary => 0,
            Role::Replica => 1,
        }
    }
}

/// `state` label of `pgrelay_clients`: what a logged-in client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientState {
    /// Linked to a server connection (inside a transaction, or for the whole session in
    /// session mode).
    Active,
    /// Wants a server connection and is queued for one.
    Waiting,
    /// Logged in, holds no server connection and wants none.
    Idle,
}

impl ClientState {
    pub const ALL: [ClientState; 3] = [ClientState::Active, ClientState::Waiting, ClientState::Idle];

    pub fn label(self) -> &'static str {
        match self {
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
            ClientState::Idle => "idle",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            ClientState::Active => 0,
            ClientState::Waiting => 1,
            ClientState::Idle => 2,
        }
    }
}

/// `state` label of `pgrelay_servers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ServerState {
    Active,
    Idle,
    Login,
}

impl ServerState {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ServerState::Active => "active",
            ServerState::Idle => "idle",
            ServerState::Login => "login",
        }
    }
}

/// `reason` label of `pgrelay_pinned_sessions`: session state that cannot follow a client to
/// another server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    TempTable,
    AdvisoryLock,
    Listen,
    HoldCursor,
    /// SQL-level `PREPARE` (protocol-level statements are mapped, not pinned).
    SqlPrepare,
    /// State docs/metrics.md has no label for: LOAD, SET ROLE, SET SESSION AUTHORIZATION, a
    /// set_config() whose arguments are not literals.
    Other,
}

impl PinReason {
    pub const ALL: [PinReason; 6] = [
        PinReason::TempTable,
        PinReason::AdvisoryLock,
        PinReason::Listen,
        PinReason::HoldCursor,
        PinReason::SqlPrepare,
        PinReason::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PinReason::TempTable => "temp_table",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Listen => "listen",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            PinReason::TempTable => 0,
            PinReason::AdvisoryLock => 1,
            PinReason::Listen => 2,
            PinReason::HoldCursor => 3,
            PinReason::SqlPrepare => 4,
            PinReason::Other => 5,
        }
    }
}

/// `reason` label of `pgrelay_routing_decisions_total`: why a statement or transaction went
/// where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteReason {
    /// A write (or anything not known to be read-only): primary.
    Write,
    /// Known read-only: a replica, or the primary when splitting is off.
    Read,
    /// Follows the explicit transaction it is part of (`BEGIN READ ONLY`, `first_statement`).
    Transaction,
    /// A `/* pgrelay: primary|replica */` comment, or a `target = …` alias.
    Hint,
    /// The classifier could not read it: primary.
    Unparsed,
    /// It calls a function the catalog marks `VOLATILE` (and nothing else made it a write): primary.
    VolatileFunction,
    /// A replica refused it as a write before answering: run again on the primary.
    ReplicaRefused,
    /// A read sent to the primary because every replica lags more than `max_replica_lag`.
    Lag,
    /// A read sent to the primary because no replica has replayed what the client must see
    /// (`session` / `causal` consistency).
    Consistency,
    /// A read sent to the primary because no replica is configured or healthy.
    NoReplica,
}

impl RouteReason {
    pub const ALL: [RouteReason; 10] = [
        RouteReason::Write,
        RouteReason::Read,
        RouteReason::Transaction,
        RouteReason::Hint,
        RouteReason::Unparsed,
        RouteReason::Lag,
        RouteReason::Consistency,
        RouteReason::NoReplica,
        RouteReason::VolatileFunction,
        RouteReason::ReplicaRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RouteReason::Write => "write",
            RouteReason::Read => "read",
            RouteReason::Transaction => "transaction",
            RouteReason::Hint => "hint",
            RouteReason::Unparsed => "unparsed",
            RouteReason::Lag => "lag",
            RouteReason::Consistency => "consistency",
            RouteReason::NoReplica => "no_replica",
            RouteReason::VolatileFunction => "volatile_function",
            RouteReason::ReplicaRefused => "replica_refused",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            RouteReason::Write => 0,
            RouteReason::Read => 1,
            RouteReason::Transaction => 2,
            RouteReason::Hint => 3,
            RouteReason::Unparsed => 4,
            RouteReason::Lag => 5,
            RouteReason::Consistency => 6,
            RouteReason::NoReplica => 7,
            RouteReason::VolatileFunction => 8,
            RouteReason::ReplicaRefused => 9,
        }
    }
}

/// `result` label of `pgrelay_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadOutcome {
    /// The new file was valid and is now in force.
    Ok,
    /// The file was unreadable or invalid; the running configuration did not change.
    Error,
}

impl ReloadOutcome {
    pub const ALL: [ReloadOutcome; 2] = [ReloadOutcome::Ok, ReloadOutcome::Error];

    pub fn label(self) -> &'static str {
        match self {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Error => "error",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            ReloadOutcome::Ok => 0,
            ReloadOutcome::Error => 1,
        }
    }
}

/// `reason` label of `pgrelay_login_refusals_total`: why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoginRefusal {
    /// A login-rate bucket (of the address or of the user name) was empty.
    Rate,
    /// The address is banned after too many failed passwords.
    Ban,
    /// No client address rule let it in, or one rejected it.
    Hba,
    /// max_client_conn, max_client_conn_per_user or max_client_conn_per_address.
    Limit,
    /// Wrong password, or a user pgrelay does not know.
    Password,
}

impl LoginRefusal {
    pub const ALL: [LoginRefusal; 5] = [
        LoginRefusal::Rate,
        LoginRefusal::Ban,
        LoginRefusal::Hba,
        LoginRefusal::Limit,
        LoginRefusal::Password,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LoginRefusal::Rate => "rate",
            LoginRefusal::Ban => "ban",
            LoginRefusal::Hba => "hba",
            LoginRefusal::Limit => "limit",
            LoginRefusal::Password => "password",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            LoginRefusal::Rate => 0,
            LoginRefusal::Ban => 1,
            LoginRefusal::Hba => 2,
            LoginRefusal::Limit => 3,
            LoginRefusal::Password => 4,
        }
    }
}

/// `result` label of `pgrelay_cancel_requests_total`: what became of a CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelResult {
    /// From a client, for a client of this instance: applied here.
    Local,
    /// From a peer, for a client of this instance: applied here.
    Received,
    /// From a client, for another instance's key: sent on to the peers.
    Forwarded,
    /// From a client, naming this instance, but no client here holds the key (it has
    /// left, or the key is wrong): dropped.
    Unknown,
    /// From a peer, and no client here holds the key: dropped. Every forwarded cancel is
    /// counted so on each peer but its owner.
    PeerUnknown,
    /// For another instance's key, but the forwarding rate or in-flight limit was reached:
    /// dropped.
    Limited,
    /// For another instance's key, but there was no peer to send it to (none configured,
    /// or the name resolved to nothing but this instance): dropped.
    NoPeers,
}

impl CancelResult {
    pub const ALL: [CancelResult; 7] = [
        CancelResult::Local,
        CancelResult::Received,
        CancelResult::Forwarded,
        CancelResult::Unknown,
        CancelResult::PeerUnknown,
        CancelResult::Limited,
        CancelResult::NoPeers,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CancelResult::Local => "local",
            CancelResult::Received => "received",
            CancelResult::Forwarded => "forwarded",
            CancelResult::Unknown => "unknown",
            CancelResult::PeerUnknown => "peer_unknown",
            CancelResult::Limited => "limited",
            CancelResult::NoPeers => "no_peers",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            CancelResult::Local => 0,
            CancelResult::Received => 1,
            CancelResult::Forwarded => 2,
            CancelResult::Unknown => 3,
            CancelResult::PeerUnknown => 4,
            CancelResult::Limited => 5,
            CancelResult::NoPeers => 6,
        }
    }
}

/// The SQLSTATEs of the client errors docs/metrics.md lists. Their series exist (at 0) as soon as a
/// database is known, so `increase()` sees the first error instead of a series appearing at 1.
pub(crate) const KNOWN_SQLSTATES: [&str; 6] = ["28P01", "3D000", "53300", "08006", "08P01", "42501"];

/// The label value for a SQLSTATE that is not five digits or upper-case letters. pgrelay only
/// passes its own constants, so this guards the label set rather than reporting anything.
pub(crate) const INVALID_SQLSTATE: &str = "other";

/// `sqlstate` as a label value: itself when it is a well-formed SQLSTATE, else [`INVALID_SQLSTATE`].
pub(crate) fn sqlstate_label(sqlstate: &str) -> &str {
    let well_formed = sqlstate.len() == 5
        && sqlstate
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte.is_ascii_uppercase());
    if well_formed { sqlstate } else { INVALID_SQLSTATE }
}

/// The `database` label of client errors sent before the client named a database that
/// pgrelay serves (bad startup packet, unknown database, too many clients). A fixed value,
/// not the name the client sent: clients must not be able to create series.
pub const NO_DATABASE: &str = "";

/// `result` label of `pgrelay_takeover_clients_total`: what became of a client at a socket
/// takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TakeoverResult {
    /// Old process: the client's socket and session were sent to the new process.
    HandedOver,
    /// New process: a client sent by the old process goes on here.
    Received,
    /// Old process: the client could not move (in a transaction until the end, pinned,
    /// TLS, session mode, a fan-out listener...) and finished here.
    Kept,
    /// New process: a client sent by the old process could not be adopted here (its
    /// database or user is not in this configuration, a client limit, a damaged message):
    /// it was closed with 57P01.
    Failed,
}

impl TakeoverResult {
    pub const ALL: [TakeoverResult; 4] = [
        TakeoverResult::HandedOver,
        TakeoverResult::Received,
        TakeoverResult::Kept,
        TakeoverResult::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TakeoverResult::HandedOver => "handed_over",
            TakeoverResult::Received => "received",
            TakeoverResult::Kept => "kept",
            TakeoverResult::Failed => "failed",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            TakeoverResult::HandedOver => 0,
            TakeoverResult::Received => 1,
            TakeoverResult::Kept => 2,
            TakeoverResult::Failed => 3,
        }
    }
}
