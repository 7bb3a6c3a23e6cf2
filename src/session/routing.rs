//! Where a client's next batch of statements runs: reading the batch waiting in the
//! client's input (up to its Sync, or one simple query), asking the router, and
//! checking out a connection from the chosen server, falling back from a replica that
//! refuses connections to the next one and finally to the primary.

use std::time::{Duration, Instant};

use super::local::LocalTx;
use super::prepared::ClientStatements;
use crate::cluster::BAN_DURATION;
use crate::cluster::Lsn;
use crate::pool::{Checkout, PoolError};
use crate::protocol::views::{BindView, ParseView, query_text};
use crate::protocol::{FrontendTag, HEADER_LEN, Header};
use crate::route::{Charset, Classifier};
use crate::router::{Batch, Decision, Reason, Target};
use crate::runtime::{DatabaseEntry, UserPools};

/// Reads the batch at the front of the client's input without consuming it; its text is
/// in a client encoding read as `charset`.
pub(super) fn plan_batch(
    inbuf: &[u8],
    statements: &ClientStatements,
    classifier: &Classifier,
    charset: Charset,
    tx: &LocalTx,
    track_tables: bool,
) -> Batch {
    let mut batch = if track_tables {
        Batch::new()
    } else {
        Batch::without_tables()
    };
    if let LocalTx::DeferredBegin { sql } = tx {
        batch.add(&classifier.classify_text(sql.as_bytes(), charset));
    }
    let mut offset = 0;
    let mut unnamed_parsed = false;
    loop {
        let Ok(Some(header)) = Header::peek(&inbuf[offset..]) else {
            batch.complete = false;
            return batch;
        };
        let Some(body) = inbuf.get(offset + HEADER_LEN..offset + header.len) else {
            batch.complete = false;
            return batch;
        };
        offset += header.len;
        match FrontendTag::from_byte(header.tag) {
            Some(FrontendTag::Query) => {
                match query_text(body) {
                    Ok(sql) => batch.add(&classifier.classify_text(sql, charset)),
                    Err(_) => batch.add_unknown(),
                }
                return batch;
            }
            Some(FrontendTag::Parse) => match ParseView::read(body) {
                Ok(parse) => {
                    unnamed_parsed |= parse.name.is_empty();
                    batch.add(&classifier.classify_text(parse.query, charset));
                }
                Err(_) => batch.add_unknown(),
            },
            Some(FrontendTag::Bind) => match BindView::read(body) {
                Ok(bind) if bind.statement.is_empty() && unnamed_parsed => {}
                Ok(bind) => match statements.get(bind.statement) {
                    Some(statement) => batch.add(&statement.class),
                    None => batch.add_unknown(),
                },
                Err(_) => batch.add_unknown(),
            },
            Some(FrontendTag::Sync) => return batch,
            Some(FrontendTag::FunctionCall) | None => {
                batch.add_unknown();
                return batch;
            }
            Some(_) => {}
        }
    }
}

/// A copy of the batch at the front of the input, to run it again should its server fail
/// before answering; `None` if the batch holds a message whose effect cannot be undone
/// by a failure (a named Parse or a Close change what the client's names mean) or is
/// not whole.
pub(super) fn batch_copy(inbuf: &[u8]) -> Option<bytes::BytesMut> {
    let mut offset = 0;
    loop {
        let header = Header::peek(&inbuf[offset..]).ok()??;
        let body = inbuf.get(offset + HEADER_LEN..offset + header.len)?;
        offset += header.len;
        match FrontendTag::from_byte(header.tag)? {
            FrontendTag::Query | FrontendTag::Sync => {
                // In a stock buffer, given back after the exchange: no allocation.
                let mut copy = crate::net::buffers::take();
                copy.extend_from_slice(&inbuf[..offset]);
                return Some(copy);
            }
            FrontendTag::Parse if ParseView::read(body).ok()?.name.is_empty() => {}
            FrontendTag::Bind | FrontendTag::Describe | FrontendTag::Execute | FrontendTag::Flush => {}
            _ => return None,
        }
    }
}

/// The SQL texts of a batch [`batch_copy`] made: its Query's, or its unnamed Parses'.
pub(super) fn batch_texts(batch: &[u8]) -> Vec<&[u8]> {
    let mut texts = Vec::new();
    let mut offset = 0;
    while let Ok(Some(header)) = Header::peek(&batch[offset..]) {
        let Some(body) = batch.get(offset + HEADER_LEN..offset + header.len) else {
            break;
        };
        offset += header.len;
        match FrontendTag::from_byte(header.tag) {
            Some(FrontendTag::Query) => {
                if let Ok(sql) = query_text(body) {
                    texts.push(sql);
                }
            }
            Some(FrontendTag::Parse) => {
                if let Ok(parse) = ParseView::read(body) {
                    texts.push(parse.query);
                }
            }
            _ => {}
        }
    }
    texts
}

/// Where a batch ended up: the host, whether it is a replica, and why.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    pub target: Target,
    pub reason: Reason,
}

/// Shortest and longest pause between two tries of a server that cannot be reached.
const RETRY_PAUSE: (Duration, Duration) = (Duration::from_millis(25), Duration::from_millis(250));

/// Like [`checkout_for`], but a server that cannot be reached right now (it refused or
/// reset the login, is starting up or shutting down, or has no slot free) is tried
/// again with a growing pause, for up to `patience` in all: nothing was sent to it, so
/// waiting is safe, and a restart of a few seconds costs the client a delay instead of
/// an error. `on_retry` is called before each new try.
pub(super) async fn checkout_patiently(
    decision: Decision,
    fence: Option<Lsn>,
    database: &DatabaseEntry,
    pools: &UserPools,
    patience: Option<Duration>,
    mut on_retry: impl FnMut(&PoolError),
) -> Result<(Checkout, Placement), PoolError> {
    let deadline = patience.map(|patience| Instant::now() + patience);
    let mut pause = RETRY_PAUSE.0;
    loop {
        let error = match checkout_for(decision, fence, database, pools).await {
            Ok(found) => return Ok(found),
            Err(error) => error,
        };
        let transient = match &error {
            PoolError::Connect(upstream) => upstream.is_transient(),
            PoolError::ConnectTimeout => true,
            // The client's patience is spent.
            PoolError::WaitTimeout
            | PoolError::LoginWaitTimeout
            | PoolError::LimitWaitTimeout { .. }
            | PoolError::Spent(_)
            | PoolError::Closed => false,
        };
        if !transient || deadline.is_some_and(|deadline| Instant::now() + pause >= deadline) {
            return Err(error);
        }
        on_retry(&error);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_PAUSE.1);
    }
}

/// [`checkout_for`] when its first choice has an idle connection now: the common case,
/// without a future. `None`: [`checkout_for`] decides.
pub(super) fn checkout_idle_for(
    decision: Decision,
    fence: Option<Lsn>,
    database: &DatabaseEntry,
    pools: &UserPools,
) -> Option<(Checkout, Placement)> {
    let mut reason = decision.reason;
    if decision.target == Target::Replica {
        match database.read_candidates(pools, fence) {
            Ok(candidates) => {
                let checkout = pools.hosts[*candidates.first()?].checkout_idle()?;
                return Some((
                    checkout,
                    Placement {
                        target: Target::Replica,
                        reason,
                    },
                ));
            }
            Err(why) => reason = why.reason(),
        }
    }
    let checkout = pools.hosts[database.primary_index()].checkout_idle()?;
    Some((
        checkout,
        Placement {
            target: Target::Primary,
            reason,
        },
    ))
}

/// A server connection for a routing decision: a replica that can serve the read
/// (healthy, within max_replica_lag, past `fence`), in load-balancing order, with one
/// that cannot be reached set aside and the next tried; else the primary.
pub(super) async fn checkout_for(
    decision: Decision,
    fence: Option<Lsn>,
    database: &DatabaseEntry,
    pools: &UserPools,
) -> Result<(Checkout, Placement), PoolError> {
    let mut reason = decision.reason;
    if decision.target == Target::Replica {
        match database.read_candidates(pools, fence) {
            Ok(candidates) => {
                for index in candidates {
                    let pool = &pools.hosts[index];
                    match pool.checkout().await {
                        Ok(checkout) => {
                            return Ok((
                                checkout,
                                Placement {
                                    target: Target::Replica,
                                    reason,
                                },
                            ));
                        }
                        Err(PoolError::Connect(error)) => {
                            tracing::warn!(database = %database.name, replica = %pool.addr(), %error,
                                "replica refused a connection: set aside, reads go elsewhere");
                            database.host_health[index].ban(BAN_DURATION);
                        }
                        Err(PoolError::ConnectTimeout | PoolError::LoginWaitTimeout) => {
                            tracing::warn!(database = %database.name, replica = %pool.addr(),
                                "replica did not finish pgrelay's login in time: set aside, reads go elsewhere");
                            database.host_health[index].ban(BAN_DURATION);
                        }
                        Err(other) => return Err(other),
                    }
                }
                reason = Reason::NoReplica;
            }
            Err(why) => reason = why.reason(),
        }
    }
    let checkout = pools.hosts[database.primary_index()].checkout().await?;
    Ok((
        checkout,
        Placement {
            target: Target::Primary,
            reason,
        },
    ))
}
