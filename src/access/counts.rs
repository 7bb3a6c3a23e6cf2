//! Client connections per user name and per client IP address, for
//! `max_client_conn_per_user` and `max_client_conn_per_address`.
//!
//! A count exists only while a connection holds it ([`Counted`] gives it back when
//! dropped), so the maps are never larger than the number of connected clients.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connected clients by user name and by address.
#[derive(Debug, Default)]
pub struct ClientCounts {
    users: Mutex<HashMap<String, usize>>,
    addresses: Mutex<HashMap<IpAddr, usize>>,
}

/// Which count a [`Counted`] holds a place in.
#[derive(Debug)]
enum Key {
    User(String),
    Address(IpAddr),
}

/// One client's place in a count; given back when dropped.
#[derive(Debug)]
pub struct Counted {
    counts: Arc<ClientCounts>,
    key: Key,
}

impl Drop for Counted {
    fn drop(&mut self) {
        match &self.key {
            Key::User(name) => give_back(&self.counts.users, name),
            Key::Address(ip) => give_back(&self.counts.addresses, ip),
        }
    }
}

impl ClientCounts {
    /// Counts a connection from `ip`; `Err` with the count already there when `limit` (if
    /// any) is reached.
    pub fn take_address(self: &Arc<Self>, ip: IpAddr, limit: Option<usize>) -> Result<Counted, usize> {
        take(&self.addresses, ip, limit)?;
        Ok(Counted {
            counts: self.clone(),
            key: Key::Address(ip),
        })
    }

    /// Counts a logged-in client of user `name`, like [`Self::take_address`].
    pub fn take_user(self: &Arc<Self>, name: &str, limit: Option<usize>) -> Result<Counted, usize> {
        take(&self.users, name.to_owned(), limit)?;
        Ok(Counted {
            counts: self.clone(),
            key: Key::User(name.to_owned()),
        })
    }

    /// Clients connected as `name` now.
    pub fn user(&self, name: &str) -> usize {
        self.users
            .lock()
            .map(|users| users.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Distinct addresses connected now.
    pub fn addresses(&self) -> usize {
        self.addresses.lock().map(|addresses| addresses.len()).unwrap_or(0)
    }
}

fn take<K: Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K, limit: Option<usize>) -> Result<(), usize> {
    // Nothing panics while holding the lock; should it be poisoned anyway, the count is
    // still a number worth going on with.
    let mut map = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let count = map.get(&key).copied().unwrap_or(0);
    if limit.is_some_and(|limit| count >= limit) {
        return Err(count);
    }
    map.insert(key, count + 1);
    Ok(())
}

fn give_back<K, Q>(map: &Mutex<HashMap<K, usize>>, key: &Q)
where
    K: Hash + Eq + std::borrow::Borrow<Q>,
    Q: Hash + Eq + ?Sized,
{
    let mut map = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refuse_at_the_limit_and_forget_at_zero() {
        let counts = Arc::new(ClientCounts::default());
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let first = counts.take_address(ip, Some(2)).unwrap();
        let second = counts.take_address(ip, Some(2)).unwrap();
        assert_eq!(counts.take_address(ip, Some(2)).map(|_| ()), Err(2));
        assert!(counts.take_address(ip, None).is_ok(), "no limit");
        drop((first, second));
        assert_eq!(counts.addresses(), 0);
        let user = counts.take_user("app", Some(1)).unwrap();
        assert_eq!(counts.user("app"), 1);
        assert!(counts.take_user("app", Some(1)).is_err());
        drop(user);
        assert_eq!(counts.user("app"), 0);
    }
}
