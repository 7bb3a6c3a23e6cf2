//! Where a client's next batch of statements runs: reading the batch waiting in the
//! client's input (up to its Sync, or one simple query), asking the router, and
//! checking out a connection from the chosen server, falling back from a replica that
//! refuses connections to the next one and finally to the primary.

use super::local::LocalTx;
use super::prepared::ClientStatements;
use crate::cluster::BAN_DURATION;
use crate::pool::{Checkout, PoolError};
use crate::protocol::views::{BindView, ParseView, query_text};
use crate::protocol::{FrontendTag, HEADER_LEN, Header};
use crate::route::Classifier;
use crate::router::{Batch, Decision, Target};
use crate::runtime::{DatabaseEntry, UserPools};

/// Reads the batch at the front of the client's input without consuming it.
pub(super) fn plan_batch(inbuf: &[u8], statements: &ClientStatements, classifier: &Classifier, tx: &LocalTx) -> Batch {
    let mut batch = Batch::new();
    if let LocalTx::DeferredBegin { sql } = tx {
        batch.add(&classifier.classify(sql));
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
                    Ok(sql) => batch.add(&classifier.classify(sql)),
                    Err(_) => batch.add_unknown(),
                }
                return batch;
            }
            Some(FrontendTag::Parse) => match ParseView::read(body) {
                Ok(parse) => {
                    unnamed_parsed |= parse.name.is_empty();
                    batch.add(&classifier.classify(parse.query));
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

/// A server connection for a routing decision: a replica in load-balancing order, with
/// a replica that cannot be reached set aside and the next one tried, then the primary.
/// Returns the connection and whether it is a replica.
pub(super) async fn checkout_for(
    decision: Decision,
    database: &DatabaseEntry,
    pools: &UserPools,
) -> Result<(Checkout, Target), PoolError> {
    if decision.target == Target::Replica {
        for index in database.replicas_to_try(pools) {
            match pools.replicas[index].checkout().await {
                Ok(checkout) => return Ok((checkout, Target::Replica)),
                Err(PoolError::Connect(error)) => {
                    tracing::warn!(database = %database.name, replica = %pools.replicas[index].addr(), %error,
                        "replica refused a connection: set aside, reads go elsewhere");
                    database.replica_health[index].ban(BAN_DURATION);
                }
                Err(PoolError::ConnectTimeout) => {
                    tracing::warn!(database = %database.name, replica = %pools.replicas[index].addr(),
                        "replica did not answer within server_connect_timeout: set aside, reads go elsewhere");
                    database.replica_health[index].ban(BAN_DURATION);
                }
                Err(other) => return Err(other),
            }
        }
    }
    pools
        .primary
        .checkout()
        .await
        .map(|checkout| (checkout, Target::Primary))
}
