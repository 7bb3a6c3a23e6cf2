//! The classification cache: exact statement bytes, how they were read and the
//! classifier's generation (see `Classifier`) → shared classification, bounded in entries
//! (quick_cache's CLOCK-Pro keeps the statements an application repeats and lets one-off
//! texts fall out). Texts over [`MAX_CACHED_LEN`] are not cached: they are rarely repeated
//! and would make the bound in entries meaningless as a bound in bytes.

use std::sync::Arc;

use quick_cache::Equivalent;
use quick_cache::sync::Cache;

use crate::route::{Classification, MAX_CACHED_LEN};

/// A cached text and how it was read: the same bytes mean different things in different
/// client encodings, so each reading has entries of its own.
#[derive(Debug, Hash, PartialEq, Eq)]
struct Key {
    /// How it was read, and the classifier's generation (see `Classifier::key_tag`).
    reading: u64,
    text: Box<[u8]>,
}

/// A [`Key`] borrowed from the text being classified, for lookups without a copy. Its
/// fields hash exactly as the key's do.
#[derive(Hash)]
struct Lookup<'a> {
    reading: u64,
    text: &'a [u8],
}

impl Equivalent<Key> for Lookup<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.reading == key.reading && *self.text == *key.text
    }
}

pub(crate) struct ClassCache {
    inner: Option<Cache<Key, Arc<Classification>>>,
}

impl ClassCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ClassCache {
            inner: (capacity > 0).then(|| Cache::new(capacity)),
        }
    }

    pub(crate) fn get(&self, reading: u64, text: &[u8]) -> Option<Arc<Classification>> {
        if text.len() > MAX_CACHED_LEN {
            return None;
        }
        self.inner.as_ref()?.get(&Lookup { reading, text })
    }

    pub(crate) fn insert(&self, reading: u64, text: &[u8], class: &Arc<Classification>) {
        if let Some(cache) = self.inner.as_ref().filter(|_| text.len() <= MAX_CACHED_LEN) {
            let key = Key {
                reading,
                text: text.into(),
            };
            cache.insert(key, Arc::clone(class));
        }
    }

    pub(crate) fn clear(&self) {
        if let Some(cache) = &self.inner {
            cache.clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, Cache::len)
    }
}
