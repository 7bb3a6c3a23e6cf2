//! LISTEN / NOTIFY without pinning (`listen_notify = "fanout"`): one listener connection
//! per database LISTENs to the union of its clients' channels, and each notification is
//! fanned out to the bounded inboxes of the clients listening to its channel. The session
//! answers a client's LISTEN and UNLISTEN itself and delivers from its inbox while the
//! client is between transactions. See docs/notifications.md.
//!
//! Depends on `upstream` (the listener's connection), `protocol` and `metrics`; knows
//! nothing of sessions or the runtime: the session hands it a [`Target`].

mod hub;
mod inbox;
mod listener;

pub use hub::{Hub, Hubs, MARKER_CHANNEL, Subscription, Target};
pub use inbox::{Inbox, MAX_QUEUED, MAX_QUEUED_BYTES};
pub use listener::LISTENER_APPLICATION_NAME;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes); longer ones are truncated.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A channel name as PostgreSQL stores it: `name` is the identifier's value (unquoted
/// ones already lower-cased by the classifier), cut to 63 bytes at a character boundary
/// as the server does (with a NOTICE that pgrelay does not repeat).
pub fn channel_name(name: &str) -> String {
    if name.len() <= MAX_IDENTIFIER_BYTES {
        return name.to_owned();
    }
    let mut end = MAX_IDENTIFIER_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_channel_names_are_cut_as_postgresql_cuts_them() {
        assert_eq!(channel_name("orders"), "orders");
        let long = "x".repeat(70);
        assert_eq!(channel_name(&long), "x".repeat(63));
        // A two-byte character across the limit goes whole.
        let multibyte = format!("{}é", "y".repeat(62));
        assert_eq!(channel_name(&multibyte), "y".repeat(62));
    }
}
