//! Pure rules of hitless key rotation (see "Key rotation" in the engine's
//! module docs): which session slot carries outgoing traffic, when a retiring
//! slot may go, when a peer entry with a new key is the same node, and when to
//! push a handshake with the new key. No locks, sockets or clocks of its own:
//! the engine passes ages and instants in, so everything here is unit-tested.

use ipnet::IpNet;
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

/// Reject-After-Time from the WireGuard whitepaper §6.1: a session older than
/// this can no longer carry data, whatever boringtun still holds.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

/// REKEY_TIMEOUT from the whitepaper §6.1: the least time between two
/// handshake initiations we push for the same slot.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a slot made obsolete by a peer's new key keeps decrypting after the
/// new session is up, so datagrams already in flight under the old session (or
/// reordered behind the first new ones) are not lost.
pub const PEER_REKEY_OVERLAP: Duration = Duration::from_secs(10);

/// Retiring slots kept per peer at most; beyond this one goes (see
/// [`evict`]). Each is one `Tunn` (a few KiB). One rotation leaves one or two
/// (our previous key and the peer's previous key), but back-to-back rotations
/// on both sides (`veilctl keys rotate --all` three times within a second)
/// stack one slot per key change on either side before any new handshake has
/// completed: three rounds make six, plus one slot per round answering for
/// our previous key towards the peer's new key: nine, measured in
/// `rotate_all_three_times_under_load`, so some room above that.
pub const MAX_RETIRING: usize = 12;

/// Whether a session of this age (`None`: no session) can encrypt now.
pub fn usable(age: Option<Duration>) -> bool {
    age.is_some_and(|a| a < REJECT_AFTER_TIME)
}

/// Which slot encrypts an outgoing packet. `ages[0]` is the current slot (our
/// current key, the peer's configured key); the others are retiring.
///
/// The current slot wins as soon as it has a session. Until then the youngest
/// usable retiring session carries the traffic, which is what makes rotation
/// hitless: the old session keeps flowing while the new handshake is pending
/// (for instance because the peer has not seen our new key yet). With no usable
/// session anywhere the current slot is used, so boringtun queues the packet
/// and starts a handshake with the current keys.
pub fn send_slot(ages: impl IntoIterator<Item = Option<Duration>>) -> usize {
    let mut best: Option<(usize, Duration)> = None;
    for (i, age) in ages.into_iter().enumerate() {
        if !usable(age) {
            continue;
        }
        let Some(age) = age else { continue };
        if i == 0 {
            return 0;
        }
        if best.is_none_or(|(_, b)| age < b) {
            best = Some((i, age));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Which retiring slot to drop when there are too many: `ages` are the
/// retiring slots' session ages, newest slot first. The oldest slot without a
/// usable session goes first; only if every one has a session does the one
/// with the oldest session go. Dropping simply the oldest slot lost traffic:
/// after rapid rotations the oldest slot is often the only one whose
/// handshake has completed, i.e. the one carrying every packet
/// ([`send_slot`]) until a new session is up.
pub fn evict(ages: &[Option<Duration>]) -> Option<usize> {
    if let Some(i) = ages.iter().rposition(|a| !usable(*a)) {
        return Some(i);
    }
    ages.iter()
        .enumerate()
        .max_by_key(|(_, a)| a.unwrap_or_default())
        .map(|(i, _)| i)
}

/// Whether a retiring slot can be dropped: not before `retire_at`, and then
/// only once the current slot carries traffic or the retiring one has nothing
/// left to carry. So traffic never depends on a slot we removed.
pub fn should_retire(
    now: Instant,
    retire_at: Instant,
    slot_usable: bool,
    current_usable: bool,
) -> bool {
    now >= retire_at && (current_usable || !slot_usable)
}

/// Whether our previous key still answers handshake initiations.
pub fn answering(now: Instant, until: Instant) -> bool {
    now < until
}

/// Whether a peer entry with a new public key is the same node as an existing
/// entry: identical, non-empty AllowedIPs (as sets). A node's pod CIDRs do not
/// change when it rotates its key, and AllowedIPs are unique per peer, so this
/// is what lets us keep the old session while the new one comes up.
pub fn same_node(old: &[IpNet], new: &[IpNet]) -> bool {
    if old.is_empty() || new.is_empty() {
        return false;
    }
    let a: BTreeSet<IpNet> = old.iter().map(|n| n.trunc()).collect();
    let b: BTreeSet<IpNet> = new.iter().map(|n| n.trunc()).collect();
    a == b
}

/// Converts a wall-clock deadline (as persisted by the agent) to a monotonic
/// one; `None` if it has passed. Monotonic time is what the engine compares
/// against, so a later clock step does not stretch or cut the grace period.
pub fn deadline(until: SystemTime, now_wall: SystemTime, now: Instant) -> Option<Instant> {
    let left = until.duration_since(now_wall).ok()?;
    if left.is_zero() {
        return None;
    }
    now.checked_add(left)
}

/// Whether to push a handshake initiation for the current slot from the timer:
/// only while an old session is standing in for it (otherwise boringtun's own
/// timers are enough) and at most every [`REKEY_TIMEOUT`]. boringtun gives up
/// on a handshake after REKEY_ATTEMPT_TIME, and since the old session carries
/// the packets, nothing would otherwise start a new one.
pub fn should_push_handshake(
    has_retiring: bool,
    current_usable: bool,
    last_pushed: Option<Instant>,
    now: Instant,
) -> bool {
    has_retiring
        && !current_usable
        && last_pushed.is_none_or(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT)
}

/// Whether a WireGuard message is a handshake initiation (message type 1, a
/// little-endian u32 as in the whitepaper §5.4.2). Retiring slots must not
/// start handshakes: they would only prolong a key that is going away.
pub fn is_initiation(datagram: &[u8]) -> bool {
    datagram.get(..4) == Some(&[1, 0, 0, 0])
}

/// How long a handshake initiation from a key that is not (yet) a configured
/// peer is held: less than REKEY_TIMEOUT, because after that the initiator has
/// sent a new initiation and forgotten the state an answer to this one needs.
pub const HELD_INITIATION_TTL: Duration = Duration::from_secs(3);

/// Held initiations at most, engine-wide. Each is one datagram (148 bytes) plus
/// its source. One per initiator key is enough: the initiator only accepts an
/// answer to its latest initiation.
pub const MAX_HELD_INITIATIONS: usize = 32;

/// Initiations from static keys that are not configured peers yet, kept for
/// [`HELD_INITIATION_TTL`] so they can be answered as soon as the key is
/// configured (see "Key rotation" in the engine's module docs).
///
/// A rotating node starts handshakes with its new key at once, but its peers
/// configure that key only after they read and verify its new announcement,
/// a few hundred milliseconds later. Dropping the initiation made the
/// initiator wait REKEY_TIMEOUT (5 s) before trying again.
///
/// Holding is not accepting: nothing is decrypted or answered for a key until
/// the caller has configured it as a peer (the agent does so only for a
/// verified announcement), and an answer only completes a handshake; data
/// from that key still needs the peer entry. Memory is bounded by
/// [`MAX_HELD_INITIATIONS`] whatever arrives: a flood of keys evicts the
/// oldest entries, a flood from one key replaces its own entry.
#[derive(Debug)]
pub struct HeldInitiations<T> {
    /// Oldest first.
    entries: Vec<(Instant, [u8; 32], T)>,
}

impl<T> Default for HeldInitiations<T> {
    fn default() -> Self {
        HeldInitiations {
            entries: Vec::new(),
        }
    }
}

impl<T> HeldInitiations<T> {
    /// Holds `item`, the latest initiation from `key`, received at `now`.
    /// Returns how many entries were evicted to make room (0 or 1).
    pub fn hold(&mut self, key: [u8; 32], item: T, now: Instant) -> usize {
        self.expire(now);
        self.entries.retain(|(_, k, _)| *k != key);
        let mut evicted = 0;
        while self.entries.len() >= MAX_HELD_INITIATIONS {
            self.entries.remove(0);
            evicted += 1;
        }
        self.entries.push((now, key, item));
        evicted
    }

    /// Takes the initiations, oldest first, whose key `configured` now
    /// accepts; expired ones are dropped.
    pub fn take(&mut self, configured: impl Fn(&[u8; 32]) -> bool, now: Instant) -> Vec<T> {
        self.expire(now);
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|(_, k, _)| configured(k));
        self.entries = keep;
        ready.into_iter().map(|(_, _, item)| item).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        self.entries
            .retain(|(at, _, _)| now.saturating_duration_since(*at) < HELD_INITIATION_TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Option<Duration> = |s| Some(Duration::from_secs(s));

    #[test]
    fn eviction_keeps_the_slots_that_carry_traffic() {
        // The oldest slot is the only one with a session: a dead one goes.
        assert_eq!(evict(&[None, None, S(30)]), Some(1));
        // Expired sessions count as dead.
        assert_eq!(evict(&[S(1), S(200), S(30)]), Some(1));
        // All alive: the oldest session goes, never the youngest (the one
        // `send_slot` would pick).
        assert_eq!(evict(&[S(5), S(90), S(30)]), Some(1));
        let ages = [S(5), S(90), S(30)];
        let chosen = evict(&ages).unwrap();
        assert_ne!(send_slot([None, ages[0], ages[1], ages[2]]), chosen + 1);
        assert_eq!(evict(&[]), None);
    }

    #[test]
    fn current_slot_wins_once_it_has_a_session() {
        assert_eq!(send_slot([S(100), S(1)]), 0);
        assert_eq!(send_slot([S(0)]), 0);
    }

    #[test]
    fn old_session_stands_in_for_a_pending_handshake() {
        assert_eq!(send_slot([None, S(50)]), 1);
        // The youngest usable retiring session, skipping dead ones.
        assert_eq!(send_slot([None, S(50), S(3), S(200)]), 2);
        assert_eq!(send_slot([S(180), S(7)]), 1, "an expired current session");
    }

    #[test]
    fn no_session_anywhere_uses_the_current_slot() {
        assert_eq!(send_slot([None, None]), 0);
        assert_eq!(send_slot([None, S(180), S(999)]), 0);
        assert_eq!(send_slot(std::iter::empty()), 0);
    }

    #[test]
    fn usable_respects_reject_after_time() {
        assert!(!usable(None));
        assert!(usable(S(0)));
        assert!(usable(Some(REJECT_AFTER_TIME - Duration::from_millis(1))));
        assert!(!usable(Some(REJECT_AFTER_TIME)));
    }

    #[test]
    fn retiring_slots_wait_for_deadline_and_replacement() {
        let t = Instant::now();
        let later = t + Duration::from_secs(5);
        // Before the deadline: always kept.
        assert!(!should_retire(t, later, true, true));
        assert!(!should_retire(t, later, false, false));
        // After: kept only while it is the sole carrier of traffic.
        assert!(!should_retire(later, later, true, false));
        assert!(should_retire(later, later, true, true));
        assert!(should_retire(later, later, false, false));
        assert!(should_retire(later, later, false, true));
    }

    #[test]
    fn previous_key_answers_until_the_deadline_only() {
        let t = Instant::now();
        let until = t + Duration::from_secs(1);
        assert!(answering(t, until));
        assert!(!answering(until, until));
        assert!(!answering(until + Duration::from_secs(1), until));
    }

    #[test]
    fn same_node_compares_allowed_ips_as_sets() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let a = [n("10.244.1.0/24"), n("fd00:1::/64")];
        let b = [n("fd00:1::/64"), n("10.244.1.0/24")];
        assert!(same_node(&a, &b));
        // Host bits do not make a different network.
        assert!(same_node(&[n("10.244.1.7/24")], &[n("10.244.1.0/24")]));
        assert!(!same_node(&a, &a[..1]));
        assert!(!same_node(&[n("10.244.1.0/24")], &[n("10.244.2.0/24")]));
        assert!(!same_node(&[], &[]), "no AllowedIPs identify no node");
    }

    #[test]
    fn wall_clock_deadlines_become_monotonic() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now = Instant::now();
        assert_eq!(
            deadline(wall + Duration::from_secs(30), wall, now),
            Some(now + Duration::from_secs(30))
        );
        assert_eq!(deadline(wall, wall, now), None);
        assert_eq!(deadline(wall - Duration::from_secs(1), wall, now), None);
    }

    #[test]
    fn handshakes_are_pushed_only_while_standing_in_and_not_too_often() {
        let t = Instant::now();
        assert!(should_push_handshake(true, false, None, t));
        assert!(!should_push_handshake(false, false, None, t));
        assert!(!should_push_handshake(true, true, None, t));
        let soon = t + Duration::from_secs(1);
        assert!(!should_push_handshake(true, false, Some(t), soon));
        assert!(should_push_handshake(
            true,
            false,
            Some(t),
            t + REKEY_TIMEOUT
        ));
    }

    #[test]
    fn initiations_are_recognised_by_type() {
        assert!(is_initiation(&[1, 0, 0, 0, 9, 9]));
        assert!(!is_initiation(&[2, 0, 0, 0]));
        assert!(!is_initiation(&[4, 0, 0, 0]));
        assert!(!is_initiation(&[1, 0, 0]));
        assert!(!is_initiation(&[]));
    }

    #[test]
    fn held_initiations_are_taken_once_their_key_is_configured() {
        let t = Instant::now();
        let mut h = HeldInitiations::default();
        assert_eq!(h.hold([1; 32], "a1", t), 0);
        assert_eq!(h.hold([2; 32], "b", t), 0);
        // A newer initiation from the same key replaces the older one.
        assert_eq!(h.hold([1; 32], "a2", t + Duration::from_millis(10)), 0);
        assert_eq!(h.len(), 2);
        assert!(h.take(|_| false, t).is_empty(), "nothing configured yet");
        assert_eq!(h.take(|k| *k == [1; 32], t), vec!["a2"]);
        assert_eq!(
            h.take(|k| *k == [1; 32], t),
            Vec::<&str>::new(),
            "taken once"
        );
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn held_initiations_expire() {
        let t = Instant::now();
        let mut h = HeldInitiations::default();
        h.hold([1; 32], 1, t);
        assert!(h.take(|_| true, t + HELD_INITIATION_TTL).is_empty());
        assert!(h.is_empty());
        h.hold([1; 32], 2, t);
        let just_in_time = t + HELD_INITIATION_TTL - Duration::from_millis(1);
        assert_eq!(h.take(|_| true, just_in_time), vec![2]);
    }

    #[test]
    fn a_flood_of_unknown_keys_stays_bounded() {
        let t = Instant::now();
        let mut h = HeldInitiations::default();
        let mut evicted = 0;
        for i in 0..10_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            evicted += h.hold(key, i, t);
            assert!(h.len() <= MAX_HELD_INITIATIONS);
        }
        assert_eq!(h.len(), MAX_HELD_INITIATIONS);
        assert_eq!(evicted, 10_000 - MAX_HELD_INITIATIONS);
        // The newest survive, oldest first.
        let all = h.take(|_| true, t);
        let first = 10_000 - MAX_HELD_INITIATIONS as u32;
        assert_eq!(all, (first..10_000).collect::<Vec<_>>());
        // One key repeating itself holds one entry.
        for _ in 0..100 {
            h.hold([9; 32], 0, t);
        }
        assert_eq!(h.len(), 1);
    }
}
