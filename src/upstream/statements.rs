//! The prepared statements a server connection holds on behalf of pgrelay's clients:
//! a least-recently-used set of server-side names, bounded by max_prepared_statements.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Server-side name → when it was last used.
    used: HashMap<Arc<str>, u64>,
    clock: u64,
    /// Statements whose cached plan went stale (DDL changed a table they read): they
    /// must be closed on the server before being prepared again.
    stale: Vec<Arc<str>>,
}

impl ServerStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.used.contains_key(name)
    }

    /// Marks a statement as just used.
    pub fn touch(&mut self, name: &Arc<str>) {
        self.clock += 1;
        if let Some(used) = self.used.get_mut(name) {
            *used = self.clock;
        }
    }

    /// Records a newly prepared statement; returns the statement to close to stay
    /// within `limit`, the least recently used one.
    pub fn insert(&mut self, name: Arc<str>, limit: usize) -> Option<Arc<str>> {
        self.clock += 1;
        let evicted = if self.used.len() >= limit.max(1) && !self.used.contains_key(&name) {
            // Only on eviction, over at most `limit` entries: simpler than an ordered
            // structure, and cheap at the sizes max_prepared_statements takes.
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, used)| **used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = &oldest {
                self.used.remove(oldest);
            }
            oldest
        } else {
            None
        };
        self.used.insert(name, self.clock);
        evicted
    }

    /// The server's cached plan of `name` no longer fits: forget it and close it before
    /// it is prepared again.
    pub fn mark_stale(&mut self, name: Arc<str>) {
        if self.used.remove(&name).is_some() {
            self.stale.push(name);
        }
    }

    /// The server skipped pgrelay's Parse or Close of `name`: whether it holds the
    /// statement is not known, so it is closed (harmless if absent) before it is
    /// prepared again.
    pub fn mark_unknown(&mut self, name: Arc<str>) {
        self.used.remove(&name);
        if !self.stale.contains(&name) {
            self.stale.push(name);
        }
    }

    /// Takes the stale statement with this name, if any: it must be closed first.
    pub fn take_stale(&mut self, name: &str) -> Option<Arc<str>> {
        let position = self.stale.iter().position(|stale| &**stale == name)?;
        Some(self.stale.swap_remove(position))
    }

    /// The server-side names of every statement the server holds or may hold, stale ones
    /// included.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.used.keys().chain(self.stale.iter()).map(|name| &**name)
    }

    /// The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.used.clear();
        self.stale.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut statements = ServerStatements::default();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(statements.insert(a.clone(), 2), None);
        assert_eq!(statements.insert(b.clone(), 2), None);
        statements.touch(&a);
        assert_eq!(statements.insert(c.clone(), 2), Some(b.clone()));
        assert!(statements.contains("a") && statements.contains("c") && !statements.contains("b"));
        assert_eq!(statements.len(), 2);
    }

    #[test]
    fn stale_statements_are_closed_before_reuse() {
        let mut statements = ServerStatements::default();
        let a: Arc<str> = "a".into();
        statements.insert(a.clone(), 10);
        statements.mark_stale(a.clone());
        assert!(!statements.contains("a"));
        assert_eq!(statements.take_stale("a"), Some(a));
        assert_eq!(statements.take_stale("a"), None);
    }
}
