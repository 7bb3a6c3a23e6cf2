//! What to do with a CancelRequest: apply it here, or send it on to the peers when it names
//! another instance (`[server] peers` / `peers_dns`), bounded so that a flood of bogus
//! cancels cannot become a flood of connections.
//!
//! Which peer holds instance N is not known: a forwarded cancel goes to every peer, each
//! applies it if one of its clients holds the key, and the others drop it. What keeps this
//! from looping is a mark, not the id: a forwarded request has bit 31 of its process id set
//! ([`key_layout::FORWARDED`]), which no key given out has, and an instance never forwards a
//! marked request. A request therefore travels at most one hop, also when a peer list or a
//! DNS name includes the forwarding instance itself.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{CancelRegistry, key_layout, send_cancel};
use crate::config::Peers;
use crate::metrics::{CancelResult, Metrics};
use crate::protocol::startup::CancelKey;

/// Forwarded cancels per second, and the burst allowed after a quiet time. Legitimate
/// cancels are one per cancelled statement; more than this is a storm or someone guessing.
const RATE_PER_SECOND: f64 = 1000.0;
const BURST: f64 = 1000.0;
/// Forwarded cancels being sent at once. Each may wait for a slow peer up to
/// [`FORWARD_TIMEOUT`], so this also bounds the connections open towards peers (times the
/// number of peers).
const MAX_IN_FLIGHT: usize = 256;
/// One peer: name resolution, and each connection attempt.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The whole forward, until every peer has closed its connection (it does so once it has
/// delivered the cancel to its server, or found the key not to be its own).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed peers are logged at most once per this interval (with the count left unlogged).
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The limits and log throttle of forwarding, shared by every cancel of a running pgrelay.
#[derive(Debug)]
pub struct Forwarder {
    bucket: Mutex<Bucket>,
    in_flight: Semaphore,
    log: Mutex<LogThrottle>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                refilled: Instant::now(),
            }),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            log: Mutex::new(LogThrottle::default()),
        }
    }
}

/// Where a CancelRequest arrived, and where this instance's peers are.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub peers: &'a Peers,
    /// Addresses of this instance (the one the request arrived on first): a resolved peer
    /// address among them is skipped.
    pub own: &'a [SocketAddr],
    /// The process this one took over from, while it drains: its clients' keys are known
    /// there only.
    pub predecessor: Option<&'a crate::takeover::Predecessor>,
}

/// Handles one CancelRequest, returning once it has been applied, forwarded and answered
/// by every peer, or given up on. Nothing is ever said to the sender: unknown keys are
/// dropped silently, as PostgreSQL does.
pub async fn handle(
    registry: &CancelRegistry,
    forwarder: &Forwarder,
    metrics: &Metrics,
    context: Context<'_>,
    key: &CancelKey,
) -> CancelResult {
    let from_peer = key.process_id & key_layout::FORWARDED != 0;
    let local = CancelKey {
        process_id: key.process_id & !key_layout::FORWARDED,
        secret: key.secret.clone(),
    };
    // Keys are looked up here first, whatever id they carry: a key this instance gave out
    // is found even if it names another id (one handed over by an older process, say).
    let found = registry.cancel(&local).await
        || match context.predecessor {
            Some(predecessor) => predecessor.cancel(&local).await,
            None => false,
        };
    let result = if found {
        if from_peer {
            CancelResult::Received
        } else {
            CancelResult::Local
        }
    } else if from_peer {
        CancelResult::PeerUnknown
    } else if key_layout::instance_of(local.process_id) == registry.instance_id() {
        CancelResult::Unknown
    } else {
        forwarder.forward(metrics, context, &local).await
    };
    metrics.cancel_request(result);
    result
}

impl Forwarder {
    async fn forward(&self, metrics: &Metrics, context: Context<'_>, key: &CancelKey) -> CancelResult {
        if context.peers.is_none() {
            return CancelResult::NoPeers;
        }
        // Both limits before any work: a refused cancel costs no lookup and no connection.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return CancelResult::Limited;
        };
        if !self.take_token() {
            return CancelResult::Limited;
        }
        let targets = self.targets(metrics, context).await;
        if targets.is_empty() {
            return CancelResult::NoPeers;
        }
        let process_id = key.process_id | key_layout::FORWARDED;
        let mut sends = JoinSet::new();
        for candidates in targets {
            let secret = key.secret.clone();
            sends.spawn(async move {
                let mut last = None;
                // The addresses of one peer, in order, until one takes the connection.
                for addr in candidates {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                        Ok(Ok(stream)) => return send_cancel(stream, process_id, &secret).await.map_err(|e| (addr, e)),
                        Ok(Err(error)) => last = Some((addr, error)),
                        Err(_) => last = Some((addr, std::io::ErrorKind::TimedOut.into())),
                    }
                }
                match last {
                    Some(failure) => Err(failure),
                    None => Ok(()),
                }
            });
        }
        let all = async {
            while let Some(done) = sends.join_next().await {
                if let Ok(Err((addr, error))) = done {
                    metrics.cancel_forward_failure();
                    self.log_failure(&addr.to_string(), &error.to_string());
                }
            }
        };
        if tokio::time::timeout(FORWARD_TIMEOUT, all).await.is_err() {
            for _ in 0..sends.len() {
                metrics.cancel_forward_failure();
            }
            self.log_failure("some peers", "did not close the connection in time");
        }
        CancelResult::Forwarded
    }

    /// The peers to send a cancel to, each as the addresses to try in order; this
    /// instance's own addresses are left out. Names are resolved now, so that a peer that
    /// changed its address (a pod that was replaced) is found.
    async fn targets(&self, metrics: &Metrics, context: Context<'_>) -> Vec<Vec<SocketAddr>> {
        let family = context.own.first().map(|own| own.ip().to_canonical().is_ipv4());
        let is_own = |addr: &SocketAddr| {
            context
                .own
                .iter()
                .any(|own| own.port() == addr.port() && own.ip().to_canonical() == addr.ip().to_canonical())
        };
        let mut targets = Vec::new();
        match context.peers {
            Peers::None => {}
            // Each entry is one instance: its addresses are alternatives.
            Peers::List(list) => {
                for peer in list {
                    match resolve(peer).await {
                        Ok(addrs) => {
                            let mut addrs = preferred_family(addrs, family);
                            if addrs.iter().any(is_own) {
                                continue;
                            }
                            addrs.dedup();
                            if !addrs.is_empty() {
                                targets.push(addrs);
                            }
                        }
                        Err(error) => {
                            metrics.cancel_forward_failure();
                            self.log_failure(peer, &error);
                        }
                    }
                }
            }
            // Each address is one instance. A dual-stack name gives each instance an address
            // of both families: one family only, or an instance would get the cancel twice.
            Peers::Dns(name) => match resolve(name).await {
                Ok(addrs) => {
                    let mut addrs = preferred_family(addrs, family);
                    addrs.sort();
                    addrs.dedup();
                    targets.extend(addrs.into_iter().filter(|addr| !is_own(addr)).map(|addr| vec![addr]));
                }
                Err(error) => {
                    metrics.cancel_forward_failure();
                    self.log_failure(name, &error);
                }
            },
        }
        targets
    }

    fn take_token(&self) -> bool {
        let Ok(mut bucket) = self.bucket.lock() else {
            return false;
        };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * RATE_PER_SECOND).min(BURST);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn log_failure(&self, peer: &str, error: &str) {
        let Ok(mut log) = self.log.lock() else {
            return;
        };
        let now = Instant::now();
        if log
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < LOG_INTERVAL)
        {
            log.unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut log.unlogged);
        log.last = Some(now);
        tracing::warn!(peer, error, unlogged, "could not forward a cancel request to a peer");
    }
}

/// `host:port` to its addresses, within [`RESOLVE_TIMEOUT`].
async fn resolve(peer: &str) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(peer)).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(error)) => Err(format!("cannot resolve: {error}")),
        Err(_) => Err("name resolution timed out".to_owned()),
    }
}

/// The addresses of the family `ipv4` says (the family the request arrived on), if there
/// are any; else all of them.
fn preferred_family(addrs: Vec<SocketAddr>, ipv4: Option<bool>) -> Vec<SocketAddr> {
    let Some(ipv4) = ipv4 else {
        return addrs;
    };
    let same: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|addr| addr.ip().to_canonical().is_ipv4() == ipv4)
        .collect();
    if same.is_empty() { addrs } else { same }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| panic!("{text}"))
    }

    #[test]
    fn one_family_when_a_name_has_both() {
        let both = vec![addr("10.0.0.1:6432"), addr("[fd00::1]:6432")];
        assert_eq!(preferred_family(both.clone(), Some(true)), [addr("10.0.0.1:6432")]);
        assert_eq!(preferred_family(both.clone(), Some(false)), [addr("[fd00::1]:6432")]);
        assert_eq!(preferred_family(both.clone(), None), both);
        let v6 = vec![addr("[fd00::1]:6432")];
        assert_eq!(
            preferred_family(v6.clone(), Some(true)),
            v6,
            "nothing of the family: all"
        );
    }

    #[test]
    fn the_bucket_refuses_past_the_burst_and_refills() {
        let forwarder = Forwarder::default();
        let taken = (0..(BURST as usize + 10)).filter(|_| forwarder.take_token()).count();
        assert!(
            (BURST as usize..=BURST as usize + 1).contains(&taken),
            "{taken} tokens taken at once"
        );
        if let Ok(mut bucket) = forwarder.bucket.lock() {
            bucket.refilled -= Duration::from_millis(10);
        }
        assert!(forwarder.take_token(), "10 ms refill 10 tokens");
    }

    #[tokio::test]
    async fn own_addresses_are_skipped_and_names_resolved() {
        let forwarder = Forwarder::default();
        let metrics = Metrics::new().unwrap_or_else(|error| panic!("{error}"));
        let peers = Peers::List(vec![
            "127.0.0.1:7001".to_owned(),
            "localhost:7002".to_owned(),
            "127.0.0.1:7001".to_owned(),
        ]);
        let own = [addr("127.0.0.1:7002")];
        let targets = forwarder
            .targets(
                &metrics,
                Context {
                    predecessor: None,
                    peers: &peers,
                    own: &own,
                },
            )
            .await;
        assert_eq!(targets, [vec![addr("127.0.0.1:7001")], vec![addr("127.0.0.1:7001")]]);
        let peers = Peers::Dns("localhost:7002".to_owned());
        let targets = forwarder
            .targets(
                &metrics,
                Context {
                    predecessor: None,
                    peers: &peers,
                    own: &own,
                },
            )
            .await;
        assert!(targets.is_empty(), "{targets:?}");
        let own = [addr("[::ffff:127.0.0.1]:7002")];
        let targets = forwarder
            .targets(
                &metrics,
                Context {
                    predecessor: None,
                    peers: &peers,
                    own: &own,
                },
            )
            .await;
        assert!(targets.is_empty(), "a v4-mapped own address is the same: {targets:?}");
    }
}
