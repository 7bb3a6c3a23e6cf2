//! What a client's session carries from one server connection to the next: the
//! settings it wants, its prepared statements, and the state that pins it to its
//! server.

use std::collections::HashSet;

use super::prepared::ClientStatements;
use crate::route::{ClientEncoding, PinReason, SessionEffect};
use crate::upstream::SessionParams;

#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// Settings the client wants on whatever server it uses.
    pub wanted: SessionParams,
    /// The settings of its startup packet: what RESET and DISCARD ALL return to.
    pub startup: SessionParams,
    /// Its protocol-level prepared statements (transaction and statement mode).
    pub statements: ClientStatements,
    /// Server-side state that cannot move to another server.
    pub pins: Pins,
    /// The WAL position of this client's last committed write: its reads go to a
    /// replica only once that replica has replayed it.
    pub write_fence: Option<crate::cluster::Lsn>,
    /// A write of this client may have committed without its position being learnt (its
    /// server failed first): its reads stay on the primary until a later write's
    /// position is known.
    pub fence_lost: bool,
    /// The client_encoding of a session whose settings name none: the database's, as the
    /// server reported it at login.
    pub default_encoding: ClientEncoding,
    /// listen_notify = "fanout": the channels the client listens to through its
    /// database's hub (not on any server).
    pub fanout_channels: std::collections::BTreeSet<String>,
    /// `fanout_channels` changed since the hub last heard of them.
    pub fanout_dirty: bool,
    /// LISTEN statements, portals and in-transaction changes pgrelay answered while a
    /// server was attached.
    pub listen_tx: super::listen_tx::ListenTx,
}

impl Carried {
    /// The encoding the client's text is in on whichever server it gets next: the one its
    /// settings name, which pgrelay applies there before anything of the client's. Any
    /// spelling of a SET (`'latin9'`, `ISO-8859-15`) and the server's own report
    /// (`LATIN9`) name it alike.
    pub fn client_encoding(&self) -> ClientEncoding {
        match self.wanted.get("client_encoding") {
            Some(setting) => ClientEncoding::named(setting),
            None => self.default_encoding,
        }
    }

    /// Records the effect of a statement that completed. `server` is the settings
    /// pgrelay knows the attached server to have.
    pub fn apply(&mut self, effect: &SessionEffect, server: &mut SessionParams) {
        match effect {
            SessionEffect::Set { local: true, .. } => {}
            SessionEffect::Set { name, value, .. } if value.eq_ignore_ascii_case("default") => {
                self.wanted.reset_to(name, &self.startup);
                server.remove(name);
            }
            SessionEffect::Set { name, value, .. } => {
                self.wanted.set_sql(name, value);
                server.set_sql(name, value);
            }
            SessionEffect::Reset { name } => {
                self.wanted.reset_to(name, &self.startup);
                server.remove(name);
            }
            SessionEffect::ResetAll | SessionEffect::DiscardAll => {
                self.wanted = self.startup.clone();
                *server = SessionParams::default();
            }
            _ => {}
        }
        // An UNLISTEN or DISCARD ALL that went to a server ends fan-out listening too, as
        // it would end any LISTEN on a direct connection.
        let unlistened = match effect {
            SessionEffect::Unlisten { channel: Some(channel) } => self.fanout_channels.remove(channel),
            SessionEffect::Unlisten { channel: None } | SessionEffect::DiscardAll => {
                let had = !self.fanout_channels.is_empty();
                self.fanout_channels.clear();
                had
            }
            _ => false,
        };
        self.fanout_dirty |= unlistened;
        if *effect == SessionEffect::DiscardAll {
            self.listen_tx.forget_statements();
        }
        self.pins.apply(effect);
    }
}

/// Why a client keeps its server, with the names that keep each reason alive. Most
/// clients never pin: they pay for one empty pointer.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    held: Option<Box<PinSet>>,
}

#[derive(Debug, Default)]
struct PinSet {
    reasons: HashSet<PinReason>,
    listening: HashSet<String>,
    hold_cursors: HashSet<String>,
    sql_prepared: HashSet<String>,
}

impl Pins {
    pub fn is_pinned(&self) -> bool {
        self.held.as_ref().is_some_and(|held| held.is_pinned())
    }

    pub fn reasons(&self) -> impl Iterator<Item = PinReason> + '_ {
        self.held.iter().flat_map(|held| held.reasons.iter().copied())
    }

    pub fn apply(&mut self, effect: &SessionEffect) {
        // Only an effect that creates pinning state needs the set to exist.
        let creates = matches!(
            effect,
            SessionEffect::Pin(_)
                | SessionEffect::Listen { .. }
                | SessionEffect::DeclareHoldCursor { .. }
                | SessionEffect::Prepare { .. }
        );
        if self.held.is_none() && !creates {
            return;
        }
        let held = self.held.get_or_insert_with(Box::default);
        held.apply(effect);
        if held.is_empty() {
            self.held = None;
        }
    }
}

/// Pins as they travel to another process with the server that holds them: the reasons,
/// and the names behind LISTEN, WITH HOLD cursors and SQL PREPARE.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PinList {
    pub reasons: Vec<PinReason>,
    pub listening: Vec<String>,
    pub hold_cursors: Vec<String>,
    pub sql_prepared: Vec<String>,
}

impl Pins {
    pub fn export(&self) -> PinList {
        let sorted = |set: &HashSet<String>| {
            let mut list: Vec<String> = set.iter().cloned().collect();
            list.sort();
            list
        };
        match &self.held {
            None => PinList::default(),
            Some(held) => PinList {
                reasons: held.reasons.iter().copied().collect(),
                listening: sorted(&held.listening),
                hold_cursors: sorted(&held.hold_cursors),
                sql_prepared: sorted(&held.sql_prepared),
            },
        }
    }

    pub fn import(list: &PinList) -> Pins {
        let held = PinSet {
            reasons: list.reasons.iter().copied().collect(),
            listening: list.listening.iter().cloned().collect(),
            hold_cursors: list.hold_cursors.iter().cloned().collect(),
            sql_prepared: list.sql_prepared.iter().cloned().collect(),
        };
        Pins {
            held: (!held.is_empty()).then(|| Box::new(held)),
        }
    }
}

impl PinSet {
    fn is_empty(&self) -> bool {
        self.reasons.is_empty()
            && self.listening.is_empty()
            && self.hold_cursors.is_empty()
            && self.sql_prepared.is_empty()
    }

    fn is_pinned(&self) -> bool {
        !self.reasons.is_empty()
    }

    fn apply(&mut self, effect: &SessionEffect) {
        match effect {
            SessionEffect::Pin(reason) => {
                self.reasons.insert(*reason);
            }
            SessionEffect::Unpin(reason) => {
                self.reasons.remove(reason);
                match reason {
                    PinReason::Listen => self.listening.clear(),
                    PinReason::HoldCursor => self.hold_cursors.clear(),
                    PinReason::SqlPrepare => self.sql_prepared.clear(),
                    _ => {}
                }
            }
            SessionEffect::Listen { channel } => {
                self.listening.insert(channel.clone());
            }
            SessionEffect::Unlisten { channel: Some(channel) } => {
                forget(&mut self.listening, &mut self.reasons, channel, PinReason::Listen);
            }
            SessionEffect::DeclareHoldCursor { name } => {
                self.hold_cursors.insert(name.clone());
            }
            SessionEffect::CloseCursor { name: Some(name) } => {
                forget(&mut self.hold_cursors, &mut self.reasons, name, PinReason::HoldCursor);
            }
            SessionEffect::Prepare { name } => {
                self.sql_prepared.insert(name.clone());
            }
            SessionEffect::Deallocate { name: Some(name) } => {
                forget(&mut self.sql_prepared, &mut self.reasons, name, PinReason::SqlPrepare);
            }
            SessionEffect::Deallocate { name: None } => {
                self.sql_prepared.clear();
                self.reasons.remove(&PinReason::SqlPrepare);
            }
            SessionEffect::DiscardAll => *self = PinSet::default(),
            _ => {}
        }
    }
}

/// Whether `effect` may change the client's encoding once it runs: a SET or RESET of
/// client_encoding (SET NAMES is one), a reset of everything, or a change pgrelay cannot
/// follow.
pub(crate) fn may_change_encoding(effect: &SessionEffect) -> bool {
    match effect {
        SessionEffect::Set { name, .. } | SessionEffect::Reset { name } => name.eq_ignore_ascii_case("client_encoding"),
        SessionEffect::ResetAll | SessionEffect::DiscardAll | SessionEffect::Pin(PinReason::UntrackableSet) => true,
        _ => false,
    }
}

/// Drops one name; the reason goes with the last one.
fn forget(names: &mut HashSet<String>, reasons: &mut HashSet<PinReason>, name: &str, reason: PinReason) {
    names.remove(name);
    if names.is_empty() {
        reasons.remove(&reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_end_with_the_last_name() {
        let mut pins = Pins::default();
        pins.apply(&SessionEffect::Listen { channel: "a".into() });
        pins.apply(&SessionEffect::Pin(PinReason::Listen));
        pins.apply(&SessionEffect::Listen { channel: "b".into() });
        pins.apply(&SessionEffect::Unlisten {
            channel: Some("a".into()),
        });
        assert!(pins.is_pinned());
        pins.apply(&SessionEffect::Unlisten {
            channel: Some("b".into()),
        });
        assert!(!pins.is_pinned());
        pins.apply(&SessionEffect::Pin(PinReason::TempTable));
        pins.apply(&SessionEffect::DiscardAll);
        assert!(!pins.is_pinned());
    }

    #[test]
    fn the_client_encoding_follows_its_settings() {
        let mut carried = Carried {
            default_encoding: ClientEncoding::UTF8,
            ..Carried::default()
        };
        assert_eq!(
            carried.client_encoding(),
            ClientEncoding::UTF8,
            "none set: the database's"
        );
        carried.startup.set("client_encoding", "euc-jp");
        carried.wanted = carried.startup.clone();
        assert_eq!(carried.client_encoding().name, Some("EUC_JP"));
        let mut server = SessionParams::default();
        let set_names = SessionEffect::Set {
            name: "client_encoding".into(),
            value: "'Shift_JIS'".into(),
            local: false,
        };
        assert!(may_change_encoding(&set_names));
        carried.apply(&set_names, &mut server);
        assert_eq!(carried.client_encoding(), ClientEncoding::named("SJIS"));
        assert_eq!(carried.client_encoding().charset, crate::route::Charset::Opaque);
        let reset = SessionEffect::Reset {
            name: "Client_Encoding".into(),
        };
        assert!(may_change_encoding(&reset));
        carried.apply(&reset, &mut server);
        assert_eq!(carried.client_encoding().name, Some("EUC_JP"));
        assert!(!may_change_encoding(&SessionEffect::Reset {
            name: "search_path".into()
        }));
    }

    #[test]
    fn settings_follow_set_and_reset() {
        let mut carried = Carried::default();
        carried.startup.set("application_name", "app");
        carried.wanted = carried.startup.clone();
        let mut server = SessionParams::default();
        carried.apply(
            &SessionEffect::Set {
                name: "application_name".into(),
                value: "'other'".into(),
                local: false,
            },
            &mut server,
        );
        assert_eq!(carried.wanted.get("application_name"), Some("'other'"));
        carried.apply(
            &SessionEffect::Reset {
                name: "application_name".into(),
            },
            &mut server,
        );
        assert_eq!(carried.wanted.get("application_name"), Some("app"));
        assert!(server.get("application_name").is_none());
    }
}
