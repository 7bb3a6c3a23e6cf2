//! The WAL positions reads must wait for under `consistency = "causal"`: per table, the
//! position of the last write committed through this pgrelay; writes whose tables are
//! unknown fence every table.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cluster::Lsn;
use crate::route::Tables;

/// Tables remembered one by one; beyond this the oldest knowledge is folded into the
/// fence on everything (safe: it only sends more reads to the primary for a while).
const TABLES_LIMIT: usize = 10_000;

#[derive(Debug, Default)]
pub struct Fences {
    tables: Mutex<HashMap<String, u64>>,
    /// A write to unknown tables: every read waits for it.
    everything: AtomicU64,
}

impl Fences {
    /// A transaction that wrote `written` committed at or before `lsn`.
    pub fn record(&self, written: &Tables, lsn: Lsn) {
        match written {
            Tables::Known(names) if names.is_empty() => {}
            Tables::Known(names) => {
                let Ok(mut tables) = self.tables.lock() else { return };
                if tables.len() + names.len() > TABLES_LIMIT {
                    let highest = tables.values().copied().max().unwrap_or_default();
                    self.everything.fetch_max(highest, Ordering::AcqRel);
                    tables.clear();
                }
                for name in names {
                    // A table written before needs no new key (no allocation).
                    match tables.get_mut(unqualified(name)) {
                        Some(position) => *position = (*position).max(lsn.0),
                        None => {
                            tables.insert(unqualified(name).to_owned(), lsn.0);
                        }
                    }
                }
            }
            Tables::Unknown => {
                self.everything.fetch_max(lsn.0, Ordering::AcqRel);
            }
        }
    }

    /// The position a replica must have replayed to serve a read of `read`.
    pub fn fence_for(&self, read: &Tables) -> Option<Lsn> {
        let mut fence = self.everything.load(Ordering::Acquire);
        if let Ok(tables) = self.tables.lock() {
            match read {
                Tables::Known(names) => {
                    for name in names {
                        if let Some(position) = tables.get(unqualified(name)) {
                            fence = fence.max(*position);
                        }
                    }
                }
                Tables::Unknown => fence = fence.max(tables.values().copied().max().unwrap_or_default()),
            }
        }
        (fence > 0).then_some(Lsn(fence))
    }
}

/// Tables are keyed by their name without schema: `public.t` and `t` are the same table
/// under the usual search_path, and a name shared by two schemas only fences more.
fn unqualified(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(names: &[&str]) -> Tables {
        Tables::Known(names.iter().map(|name| (*name).to_owned()).collect())
    }

    #[test]
    fn reads_wait_only_for_the_tables_they_touch() {
        let fences = Fences::default();
        fences.record(&tables(&["t"]), Lsn(100));
        fences.record(&tables(&["u"]), Lsn(50));
        assert_eq!(fences.fence_for(&tables(&["t"])), Some(Lsn(100)));
        assert_eq!(fences.fence_for(&tables(&["public.t"])), Some(Lsn(100)));
        assert_eq!(fences.fence_for(&tables(&["v"])), None);
        assert_eq!(fences.fence_for(&Tables::Unknown), Some(Lsn(100)));
        fences.record(&Tables::Unknown, Lsn(70));
        assert_eq!(fences.fence_for(&tables(&["v"])), Some(Lsn(70)));
        assert_eq!(fences.fence_for(&tables(&["t"])), Some(Lsn(100)));
    }
}
