//! Desired-versus-actual diffing for the BPF maps: only keys whose value
//! changed are written, only keys no longer wanted are deleted, so a periodic
//! full resync costs nothing when nothing changed and never opens a window in
//! which an entry is briefly missing.

use std::collections::BTreeMap;

/// What to do to turn `current` into `want`.
#[derive(Debug, PartialEq, Eq)]
pub struct Diff<K, V> {
    /// Keys to write, with their new value (new keys and changed values).
    pub upsert: Vec<(K, V)>,
    /// Keys to delete.
    pub remove: Vec<K>,
}

impl<K, V> Diff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Computes the changes from `current` to `want`.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Diff<K, V> {
    let upsert = want
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let remove = current
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    Diff { upsert, remove }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(u8, u32)]) -> BTreeMap<u8, u32> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn identical_is_empty() {
        let a = m(&[(1, 10), (2, 20)]);
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn adds_changes_and_removes() {
        let cur = m(&[(1, 10), (2, 20), (3, 30)]);
        let want = m(&[(1, 10), (2, 21), (4, 40)]);
        let d = diff(&cur, &want);
        assert_eq!(d.upsert, vec![(2, 21), (4, 40)]);
        assert_eq!(d.remove, vec![3]);
    }

    #[test]
    fn from_and_to_empty() {
        let full = m(&[(1, 10), (2, 20)]);
        let empty = m(&[]);
        let d = diff(&empty, &full);
        assert_eq!(d.upsert.len(), 2);
        assert!(d.remove.is_empty());
        let d = diff(&full, &empty);
        assert!(d.upsert.is_empty());
        assert_eq!(d.remove, vec![1, 2]);
    }
}
