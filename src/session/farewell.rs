//! The last words to a client refused at login: the refusal counted and logged, a failed
//! password's delay, and the error sent before the connection closes.

use std::sync::Arc;

use crate::access::Refusal;
use crate::error::{ClientError, sqlstate};
use crate::net::ClientConn;
use crate::protocol::compose::{self, Severity};
use crate::runtime::{Shared, Snapshot};

use super::FAREWELL_TIMEOUT;

/// A login that failed, with what telling the client needs.
pub(super) struct Refused {
    /// The configuration the login was refused under.
    pub snapshot: Arc<Snapshot>,
    pub error: ClientError,
    /// Why, when it is one of the counted refusals (a wrong password is recognized by its
    /// SQLSTATE when the login did not say).
    pub reason: Option<Refusal>,
}

impl Refused {
    /// Counts and logs the refusal, waits out a failed password's delay, and sends the
    /// error.
    pub async fn tell(self: Box<Self>, shared: &Shared, client: &mut ClientConn) {
        let Refused {
            snapshot,
            error,
            reason,
        } = *self;
        let peer = client.peer;
        let reason = reason.or((error.sqlstate == sqlstate::INVALID_PASSWORD).then_some(Refusal::Password));
        let settings = &snapshot.access;
        match reason {
            Some(reason) => {
                shared.metrics.login_refusal(reason);
                // Throttled per address: a guesser or a flood must not flood the log
                // too. The message never holds a password.
                if let Some(unlogged) = shared.access.may_log(settings, peer.ip()) {
                    tracing::info!(client = %peer, reason = reason.label(), sqlstate = %error.sqlstate,
                        error = %error.message, unlogged, "login refused");
                }
            }
            None => {
                tracing::info!(client = %peer, sqlstate = %error.sqlstate, error = %error.message, "login refused")
            }
        }
        if reason == Some(Refusal::Password) {
            // The answer waits, growing with the address's failures; an async sleep
            // holds no thread. The connection's places were given back with the failed
            // login: waiting ones are bounded by the login rate (a token per attempt)
            // times the longest delay (10 s), per address.
            let delay = shared.access.failed_password(settings, peer.ip());
            tokio::time::sleep(delay).await;
        }
        shared.metrics.client_error(None, &error.sqlstate);
        compose::error(&mut client.outbuf, Severity::Fatal, &error.sqlstate, &error.message);
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.flush()).await;
    }
}
