//! The server's lease bookkeeping: which publications are held, which is current, and how
//! many leases each has. Pure logic, no I/O.
//!
//! The one rule: a version is freed exactly when it is not the current one and no lease on it
//! is left. Publishing makes a new version current (the old one is freed at once when nobody
//! holds it, else when its last lease ends); a new lease always gets the current version;
//! retiring (the server closing) leaves no version current, so each is freed with its last
//! lease. What is freed is handed back to the caller, who drops it outside any lock.

use std::collections::BTreeMap;

/// Publications keyed by their sequence number, with their lease counts.
#[derive(Debug)]
pub(crate) struct Book<T> {
    versions: BTreeMap<u64, Entry<T>>,
    current: Option<u64>,
    next: u64,
}

#[derive(Debug)]
struct Entry<T> {
    payload: T,
    leases: usize,
}

impl<T> Default for Book<T> {
    fn default() -> Self {
        Self { versions: BTreeMap::new(), current: None, next: 1 }
    }
}

impl<T: Clone> Book<T> {
    /// The sequence number the next publication gets.
    pub(crate) fn next_sequence(&self) -> u64 {
        self.next
    }

    /// Makes `payload` the current version; returns its sequence number and what is freed
    /// (the previous current version, when no lease holds it).
    pub(crate) fn publish(&mut self, payload: T) -> (u64, Vec<T>) {
        let sequence = self.next;
        self.next += 1;
        self.versions.insert(sequence, Entry { payload, leases: 0 });
        let old = self.current.replace(sequence);
        (sequence, old.and_then(|v| self.free_if_unheld(v)).into_iter().collect())
    }

    /// A lease on the current version: its sequence number and payload; `None` when nothing
    /// is published.
    pub(crate) fn acquire(&mut self) -> Option<(u64, T)> {
        let v = self.current?;
        let entry = self.versions.get_mut(&v)?;
        entry.leases += 1;
        Some((v, entry.payload.clone()))
    }

    /// Ends one lease on version `v`; returns it when that freed it. Ending a lease that was
    /// never taken is a bug in the caller and changes nothing.
    pub(crate) fn release(&mut self, v: u64) -> Option<T> {
        match self.versions.get_mut(&v) {
            Some(entry) if entry.leases > 0 => entry.leases -= 1,
            _ => {
                debug_assert!(false, "release of version {v} without a lease");
                return None;
            }
        }
        self.free_if_unheld(v)
    }

    /// No version current any more (the server closes): returns what nobody holds.
    pub(crate) fn retire(&mut self) -> Vec<T> {
        self.current.take().and_then(|v| self.free_if_unheld(v)).into_iter().collect()
    }

    /// The current version's sequence number and payload.
    pub(crate) fn current(&self) -> Option<(u64, &T)> {
        let v = self.current?;
        Some((v, &self.versions.get(&v)?.payload))
    }

    /// The versions held (current, or leased), with their lease counts, oldest first.
    #[cfg(test)]
    pub(crate) fn held(&self) -> Vec<(u64, usize)> {
        self.entries().map(|(v, _, leases)| (v, leases)).collect()
    }

    /// The versions held, with their payloads and lease counts, oldest first.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, &T, usize)> {
        self.versions.iter().map(|(&v, e)| (v, &e.payload, e.leases))
    }

    fn free_if_unheld(&mut self, v: u64) -> Option<T> {
        let unheld = self.current != Some(v) && self.versions.get(&v)?.leases == 0;
        unheld.then(|| self.versions.remove(&v)).flatten().map(|e| e.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Publish,
        Acquire,
        /// Release the n-th lease outstanding (modulo their count).
        Release(usize),
        Retire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Publish),
            Just(Op::Acquire),
            any::<usize>().prop_map(Op::Release),
            Just(Op::Retire)
        ]
    }

    proptest! {
        /// Against a model that only lists events: after every step, the versions the book
        /// holds are exactly those current or leased, each freed version was handed back once,
        /// at the step where it stopped being either.
        #[test]
        fn a_version_is_freed_exactly_when_not_current_and_unleased(
            ops in proptest::collection::vec(op(), 0..200)
        ) {
            let mut book = Book::<u64>::default();
            let mut leases: Vec<u64> = Vec::new(); // the model: outstanding leases
            let mut current: Option<u64> = None;
            let mut published: Vec<u64> = Vec::new();
            let mut freed: Vec<u64> = Vec::new();
            for op in ops {
                let got: Vec<u64> = match op {
                    Op::Publish => {
                        let payload = book.next_sequence();
                        let (v, freed) = book.publish(payload);
                        prop_assert_eq!(v, payload);
                        published.push(v);
                        current = Some(v);
                        freed
                    }
                    Op::Acquire => {
                        match book.acquire() {
                            Some((v, payload)) => {
                                prop_assert_eq!(Some(v), current);
                                prop_assert_eq!(payload, v);
                                leases.push(v);
                            }
                            None => prop_assert_eq!(current, None),
                        }
                        Vec::new()
                    }
                    Op::Release(n) if !leases.is_empty() => {
                        let v = leases.remove(n % leases.len());
                        book.release(v).into_iter().collect()
                    }
                    Op::Release(_) => Vec::new(),
                    Op::Retire => {
                        current = None;
                        book.retire()
                    }
                };
                for v in &got {
                    prop_assert!(!freed.contains(v), "version {} freed twice", v);
                    prop_assert!(Some(*v) != current && !leases.contains(v), "version {} freed while held", v);
                }
                freed.extend(got);
                let mut expected: Vec<u64> = published
                    .iter()
                    .copied()
                    .filter(|v| Some(*v) == current || leases.contains(v))
                    .collect();
                expected.sort_unstable();
                let held: Vec<u64> = book.held().iter().map(|&(v, _)| v).collect();
                prop_assert_eq!(&held, &expected);
                for (v, count) in book.held() {
                    prop_assert_eq!(count, leases.iter().filter(|&&l| l == v).count());
                }
                let mut all: Vec<u64> = freed.iter().chain(&held).copied().collect();
                all.sort_unstable();
                prop_assert_eq!(all, published.clone(), "every version held or freed, once");
            }
        }
    }
}
