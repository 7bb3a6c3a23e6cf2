//! Texts a replica refused as writes (`retry_refused_on_primary`): each is cached as a write,
//! and kept in a short list that is put back into the cache at every new generation, so that
//! a new catalog of volatile functions does not send them to a replica again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use crate::route::{Access, Classification, Tables, WriteReason};

/// Refused texts kept for new caches; past it the oldest are forgotten (they are then
/// refused, and retried, once more).
const MAX_REFUSED: usize = 1000;

type Entry = (u8, Box<[u8]>, Arc<Classification>);

#[derive(Default)]
pub(crate) struct Refused {
    texts: Mutex<VecDeque<Entry>>,
}

impl Refused {
    pub(crate) fn add(&self, reading: u8, text: &[u8], class: Arc<Classification>) {
        let mut texts = self.texts.lock().unwrap_or_else(PoisonError::into_inner);
        if texts.iter().any(|(r, t, _)| *r == reading && **t == *text) {
            return;
        }
        if texts.len() >= MAX_REFUSED {
            texts.pop_front();
        }
        texts.push_back((reading, text.into(), class));
    }

    /// Hands every refused text to `insert` (into a new generation of the cache).
    pub(crate) fn replay(&self, mut insert: impl FnMut(u8, &[u8], &Arc<Classification>)) {
        let texts = self.texts.lock().unwrap_or_else(PoisonError::into_inner);
        for (reading, text, class) in texts.iter() {
            insert(*reading, text, class);
        }
    }
}

/// `class` as a write that could have written anything: the replica's refusal says it
/// writes, not what.
pub(crate) fn as_write(class: &Classification) -> Classification {
    let mut class = class.clone();
    if class.is_read() {
        class.access = Access::Write;
        class.write_reason = Some(WriteReason::ReplicaRefused);
        class.written_tables = Tables::Unknown;
    }
    class
}
