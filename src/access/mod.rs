//! Who may log in, how often and how many: the client address rules (`hba.rs`), the login
//! rate limiter with its failure delays and bans (`rate.rs`, over `bucket.rs`), and the
//! client counts per user and per address (`counts.rs`).
//!
//! Everything here is decided before authentication, except the per-user count, which
//! needs to know who logged in: a client that cannot authenticate cannot take a user's
//! places. The state that outlives reloads (counts, buckets, bans) is [`Access`], held by
//! `runtime::Shared`; the settings are read from the snapshot at each login.

mod bucket;
mod counts;
pub mod hba;
mod rate;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use counts::{ClientCounts, Counted};
pub use hba::{HbaRules, LoginRequest};
pub use rate::{Attempt, LOG_INTERVAL, LoginRate, Refused};

use crate::config::LoginRateConfig;
use crate::config::hba::HbaMethod;
use crate::error::{ClientError, Side, sqlstate};

/// Why a login was refused, as counted in `pgrelay_login_refusals_total{reason}`.
pub use crate::metrics::LoginRefusal as Refusal;

/// What outlives a reload: counts of connected clients, and the login-rate state.
#[derive(Debug, Default)]
pub struct Access {
    pub counts: Arc<ClientCounts>,
    pub rate: LoginRate,
}

/// The access settings of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// `None`: everyone may try to log in.
    pub hba: Option<HbaRules>,
    pub login_rate: LoginRateConfig,
    pub max_client_conn_per_user: Option<usize>,
    pub max_client_conn_per_address: Option<usize>,
}

/// Longest an attempt waits for a login-rate token before it is refused. Waiting rather
/// than refusing at once lets an application that opens many connections at once in (their
/// tokens come back as each logs in), while a flood of failing attempts still gets no more
/// than the rate; a waiting attempt costs a timer, not a thread.
const MAX_RATE_WAIT: Duration = Duration::from_secs(2);

/// One login on its way through the checks.
#[derive(Debug)]
pub struct Gate {
    access: Arc<Access>,
    login_rate: LoginRateConfig,
    per_user: Option<usize>,
    /// The method the matching address rule asks for; `None` without rules.
    pub method: Option<(HbaMethod, usize)>,
    attempt: Option<Attempt>,
    user_slot: Option<Counted>,
    /// Set when the gate itself refused the login.
    pub refused: Option<Refusal>,
}

impl Gate {
    /// The checks before authentication, cheapest first: address rules, ban, rate buckets.
    /// An empty bucket is waited for (an async sleep) up to [`MAX_RATE_WAIT`].
    pub async fn open(
        access: &Arc<Access>,
        settings: &AccessSettings,
        request: &LoginRequest<'_>,
    ) -> Result<Gate, (Refusal, ClientError)> {
        let method = match &settings.hba {
            Some(rules) => Some(rules.method_for(request).map_err(|error| (Refusal::Hba, error))?),
            None => None,
        };
        let started = Instant::now();
        let attempt = loop {
            match access
                .rate
                .admit(&settings.login_rate, request.ip, request.user, Instant::now())
            {
                Ok(attempt) => break attempt,
                Err(Refused::AddressRate(next) | Refused::UserRate(next))
                    if started.elapsed() + next <= MAX_RATE_WAIT =>
                {
                    // At least a millisecond: a token given back meanwhile is taken then.
                    tokio::time::sleep(next.max(Duration::from_millis(1))).await;
                }
                Err(refused) => return Err(refusal(&settings.login_rate, request, refused)),
            }
        };
        Ok(Gate {
            access: access.clone(),
            login_rate: settings.login_rate.clone(),
            per_user: settings.max_client_conn_per_user,
            method,
            attempt: Some(attempt),
            user_slot: None,
            refused: None,
        })
    }

    /// The client proved it is `user`: its tokens go back, and it takes a place in the
    /// user's count (refused at max_client_conn_per_user).
    pub fn authenticated(&mut self, user: &str) -> Result<(), ClientError> {
        if let Some(attempt) = self.attempt.take() {
            self.access.rate.succeeded(&self.login_rate, attempt);
        }
        match self.access.counts.take_user(user, self.per_user) {
            Ok(slot) => {
                self.user_slot = Some(slot);
                Ok(())
            }
            Err(count) => {
                self.refused = Some(Refusal::Limit);
                Err(ClientError::new(
                    Side::Pgrelay,
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "too many connections for user \"{user}\" (max_client_conn_per_user = {})",
                        self.per_user.unwrap_or(count)
                    ),
                ))
            }
        }
    }

    /// The user's place, to be held for the session.
    pub fn take_user_slot(&mut self) -> Option<Counted> {
        self.user_slot.take()
    }
}

fn refusal(config: &LoginRateConfig, request: &LoginRequest<'_>, refused: Refused) -> (Refusal, ClientError) {
    let rate = format!(
        "server.login_rate: {} per second, burst {}",
        config.attempts_per_second, config.burst
    );
    match refused {
        Refused::AddressRate(_) => (
            Refusal::Rate,
            ClientError::new(
                Side::Client,
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many login attempts from address \"{}\" ({rate}); try again later",
                    request.ip
                ),
            ),
        ),
        Refused::UserRate(_) => (
            Refusal::Rate,
            ClientError::new(
                Side::Client,
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many login attempts for user \"{}\" ({rate}); try again later",
                    request.user
                ),
            ),
        ),
        Refused::Banned(left) => (
            Refusal::Ban,
            ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                format!(
                    "address \"{}\" is banned for {}s after {} failed logins (server.login_rate.ban_after)",
                    request.ip,
                    left.as_secs().max(1),
                    config.ban_after
                ),
            ),
        ),
    }
}

/// The refusal of a connection over `max_client_conn_per_address`.
pub fn too_many_from_address(ip: IpAddr, limit: usize) -> ClientError {
    ClientError::new(
        Side::Pgrelay,
        sqlstate::TOO_MANY_CONNECTIONS,
        format!("too many connections from address \"{ip}\" (max_client_conn_per_address = {limit})"),
    )
}

impl Access {
    /// A wrong password from `ip`: how long to wait before saying so.
    pub fn failed_password(&self, settings: &AccessSettings, ip: IpAddr) -> Duration {
        self.rate.failed(&settings.login_rate, ip, Instant::now())
    }

    /// Whether a refusal of `ip` may be logged now (see [`LoginRate::may_log`]).
    pub fn may_log(&self, settings: &AccessSettings, ip: IpAddr) -> Option<u32> {
        self.rate.may_log(&settings.login_rate, ip, Instant::now())
    }
}
