//! The classification cache: exact statement text → shared classification, bounded in entries
//! (quick_cache's CLOCK-Pro keeps the statements an application repeats and lets one-off texts
//! fall out). Texts over [`MAX_CACHED_LEN`] are not cached: they are rarely repeated and would
//! make the bound in entries meaningless as a bound in bytes.

use std::sync::Arc;

use quick_cache::sync::Cache;

use crate::route::{Classification, MAX_CACHED_LEN};

pub(crate) struct ClassCache {
    inner: Option<Cache<Box<str>, Arc<Classification>>>,
}

impl ClassCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ClassCache {
            inner: (capacity > 0).then(|| Cache::new(capacity)),
        }
    }

    pub(crate) fn get(&self, sql: &str) -> Option<Arc<Classification>> {
        if sql.len() > MAX_CACHED_LEN {
            return None;
        }
        self.inner.as_ref()?.get(sql)
    }

    pub(crate) fn insert(&self, sql: &str, class: &Arc<Classification>) {
        if let Some(cache) = self.inner.as_ref().filter(|_| sql.len() <= MAX_CACHED_LEN) {
            cache.insert(sql.into(), Arc::clone(class));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, Cache::len)
    }
}
