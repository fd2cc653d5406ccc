//! The userspace WireGuard engine: a TUN device (`veil0`), UDP sockets on one
//! port (one per packet queue) and a `boringtun::noise::Tunn` per peer.
//! boringtun supplies only the protocol state machine; this module owns all
//! I/O, threads, timers and peer demux.
//!
//! # Threads
//! - **tun->udp**: reads plaintext IP packets from the TUN device (64 KiB buffer,
//!   because eBPF `bpf_redirect` into a TUN skips the MTU check, so packets can
//!   be larger than the device MTU), picks the peer by longest-prefix match of
//!   the destination over all AllowedIPs, encrypts, sends to the endpoint.
//!   With TUN offloads a read is a TCP super-packet, split into segments that
//!   are encrypted under one peer lock and sent with one `UDP_SEGMENT` send
//!   (see [`offload`]).
//! - **udp->tun**: receives datagrams (a `UDP_GRO` run per receive), demuxes
//!   them to a peer (see [`packet::demux`]), decrypts, applies cryptokey
//!   routing on the inner source address, and writes the batch to the TUN
//!   device, coalescing TCP segments into GRO super-packets. Replies the
//!   protocol asks for (handshake responses, cookies, queued packets) go back
//!   out immediately.
//! - **timers**: every [`TIMER_TICK`] calls `Tunn::update_timers` for each peer
//!   (handshake retries, rekeying, keepalives) and resets the shared rate limiter.
//! - **uapi** (optional): serves `wg show` on the standard Unix socket.
//!
//! # Queues: packet work over several cores, each flow in order
//! With [`EngineConfig::queues`] = N > 1 the two packet threads become N
//! pairs, queue `q` owning one TUN queue (`IFF_MULTI_QUEUE`) and one UDP
//! socket of an `SO_REUSEPORT` group on the listen port. The kernel spreads
//! the work and keeps each flow on one queue:
//! - **tun->udp**: the tun driver picks the queue of an outgoing packet by
//!   its flow hash, so each flow is read, encrypted and sent by one thread,
//!   in order, while different flows (to one peer or to many) are encrypted
//!   on different cores. Two threads encrypting for the same peer take its
//!   lock in turn: each takes its nonces (boringtun's counter) and seals
//!   under it, so a flow's packets leave in nonce order.
//! - The driver would also *learn* a flow's queue from the queue that writes
//!   its replies and move the flow there, which can reorder it at the move
//!   (tun.c: "a very small possibility of OOO during switching"). The
//!   udp->tun threads therefore write through queues of their own that are
//!   detached (`TUNSETQUEUE`/`IFF_DETACH_QUEUE`): the kernel accepts writes
//!   on them, learns nothing from them and never reads into them, so a
//!   flow's queue is fixed by its hash.
//! - **udp->tun**: `SO_REUSEPORT` hands each datagram to the socket its
//!   4-tuple hashes to, so a peer's datagrams are always decrypted by one
//!   thread, in the order they arrived; different peers spread over the
//!   queues. (One peer's inbound decryption stays on one core: boringtun's
//!   `Tunn` decrypts under `&mut self`, see ARCHITECTURE.md.)
//!
//! Before the packet threads sleep they poll their descriptor for an
//! adaptive window (see [`idle_poll`]): in a steady exchange of packets the
//! next one is taken without a thread wakeup, which is most of the
//! request/response latency the engine adds.
//!
//! All loops wake at least every [`POLL_INTERVAL`] to notice shutdown, so
//! [`Engine::shutdown`] joins them promptly and then closes the TUN fd, which
//! makes the (non-persistent) device disappear.
//!
//! # State and locking
//! The peer set is an immutable snapshot (`Arc<PeerSet>`: maps by key and by
//! index plus the AllowedIPs trie) behind a `RwLock`; hot loops take the read
//! lock only to clone the `Arc`. [`Engine::set_peers`] builds a new snapshot and
//! swaps it in. Per-peer mutable state (the `Tunn`, the current endpoint) sits
//! behind a per-peer `parking_lot::Mutex`; unchanged peers carry their `Arc<Peer>`
//! into the new snapshot, so their sessions survive reconfiguration.
//!
//! # Demux
//! Handshake initiations carry no receiver index. MAC1 is keyed by the
//! responder's public key (whitepaper §5.4.4), so checking it against each of
//! our answering keys (current, then previous during a grace period) tells
//! cheaply which key the initiator addressed, before any Diffie-Hellman work;
//! the initiator's static key is then decrypted with that key
//! (`parse_handshake_anon`) and looked up by public key. Every other message
//! carries the receiver index we chose, which boringtun builds as
//! `(slot_index << 8) | session`, so `receiver_index >> 8` finds the session
//! slot and its peer. MAC1 (and, under load, the cookie/MAC2 check) runs first
//! through the `RateLimiter` of the addressed key, shared by all peers.
//!
//! # Key rotation
//! A `Tunn` is bound to one (our static key, their static key) pair, so a peer
//! holds a list of *slots*, each a `Tunn` with its own receiver index: the
//! current slot (our current key, the peer's configured key) and retiring
//! slots left over from a rotation on either side.
//! - **We rotate** ([`Engine::rotate_key`]): every peer gets a new current slot
//!   with the new key, which initiates a handshake at once; the old current
//!   slot retires at the end of the grace period. Until then our previous key
//!   still answers initiations (MAC1 picks the key, the matching slot answers),
//!   so peers that have not seen our announcement keep working.
//! - **A peer rotates** ([`Engine::set_peers`] with a new key for the same
//!   AllowedIPs): the peer entry is kept, a new current slot initiates towards
//!   the new key, the old slot retires after [`rotation::PEER_REKEY_OVERLAP`].
//! - **Sending** uses the current slot once it has a session, otherwise the
//!   youngest usable retiring session ([`rotation::send_slot`]): traffic flows
//!   on the old session until the new handshake completes. Receiving works on
//!   every slot by index, so in-flight packets of the old session still land.
//! - A retiring slot goes only when its deadline has passed *and* the current
//!   slot carries traffic or the retiring one has no session left
//!   ([`rotation::should_retire`]); it never starts handshakes of its own.
//! - While an old session stands in, the timer pushes a new handshake on the
//!   current slot every REKEY_TIMEOUT, because boringtun gives up retrying
//!   after REKEY_ATTEMPT_TIME and no packet would restart it.
//! - **Initiations from a key that is not a peer yet** are held for
//!   [`rotation::HELD_INITIATION_TTL`] (bounded, newest win,
//!   [`rotation::HeldInitiations`]) and answered by [`Engine::set_peers`]
//!   once the key is configured. A rotating node initiates with its new key
//!   at once, but its peers configure that key only after verifying its
//!   announcement; dropping the initiation left the initiator waiting
//!   REKEY_TIMEOUT for its next one. Nothing from a held key is answered or
//!   decrypted before the key is a configured peer.
//!
//! # Why `IP_PMTUDISC_DONT`
//! An encrypted packet is 32 bytes (+ UDP/IP headers) larger than its payload,
//! and TUN packets can exceed the TUN MTU (see above). With the default
//! path-MTU discovery the socket sets DF and a too-large datagram is dropped
//! (locally with EMSGSIZE, or by a router that sends an ICMP error nobody acts
//! on): an MTU black hole. With `IP_PMTUDISC_DONT` (and `IPV6_PMTUDISC_DONT`)
//! the kernel fragments the UDP datagram instead (ip(7), ipv6(7)). The other
//! half of the story is MSS clamping in eBPF, which keeps TCP from relying on
//! fragmentation at all.

pub mod batch;
pub mod idle_poll;
pub mod lpm;
pub mod offload;
pub mod packet;
pub mod rotation;
pub mod uapi;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use idle_poll::{IdlePoll, PollState};
use ipnet::IpNet;
use lpm::LpmTable;
use packet::{CryptokeyVerdict, Demux};
use parking_lot::{Mutex, RwLock};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How often every peer's timers are driven. WireGuard's timers have a
/// granularity of seconds (REKEY_TIMEOUT = 5 s, KEEPALIVE = 10 s), so 100 ms
/// is ample and costs nothing when idle.
pub const TIMER_TICK: Duration = Duration::from_millis(100);
/// Upper bound on how long any engine thread sleeps before checking for shutdown.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Default bound of the packet threads' idle polling, in µs: the kernel's
/// own default for guest halt polling (`guest_halt_poll_ns`), which covers a
/// round trip between two nodes of a cluster.
pub const DEFAULT_IDLE_POLL_US: u64 = 200;
/// Most packet queues [`auto_queues`] picks: past a handful of cores per
/// node, one peer's traffic is bound by its lock anyway (see "Queues").
pub const AUTO_QUEUES_MAX: usize = 8;
/// Most packet queues an engine runs (two threads, two TUN queue descriptors
/// and one socket each); the tun driver allows 256 queues.
pub const MAX_QUEUES: usize = 64;
/// Largest IP packet (the IPv4/IPv6 total-length fields are 16 bits).
const MAX_PACKET: usize = 65_536;
/// WireGuard data message overhead: type/reserved (4) + receiver (4) + counter (8) + tag (16).
const WG_OVERHEAD: usize = 32;
/// Handshake messages per second accepted before cookies are required. boringtun's
/// own device uses 100; each handshake passes the shared limiter twice (our
/// pre-demux check and `Tunn::decapsulate`), hence the factor of two.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;
/// Socket buffers: large enough for bursts at multi-Gbit/s without drops.
const SOCKET_BUFFER: usize = 4 << 20;
/// Segments one TUN read can yield: a 64 KiB TSO super-packet at the smallest
/// usual MSS (536) is 123 segments.
const TUN_SEGMENTS: usize = tun_rs::IDEAL_BATCH_SIZE;
/// TUN reads drained per wakeup before the batch is encrypted and sent: 64
/// small packets (e.g. a burst of 64-byte UDP) leave in one GSO send instead
/// of 64 sends, while the wait a packet can add stays one batch's work.
const TX_READS: usize = 64;
/// Packet slots of the tun->udp thread: room for [`TX_READS`] single packets
/// and then one more full super-packet split. Reading stops while fewer than
/// [`TUN_SEGMENTS`] slots are free, so a split never runs out of room.
const TX_SLOTS: usize = TX_READS + TUN_SEGMENTS;
/// One slot: any packet a read can return (a non-GSO packet can exceed the
/// MTU, see above). The slots are one allocation whose pages are touched only
/// as deep as packets are written, so resident memory follows packet sizes.
const TX_SLOT: usize = MAX_PACKET;
/// Encrypted datagrams of one wakeup, back to back, flushed early when full
/// (two 64 KiB super-packets and their headers and WireGuard overhead).
const OUT_BUF: usize = 4 * MAX_PACKET;
/// Decrypted packets collected before one TUN write batch (GRO coalesces them).
const RX_BATCH: usize = 64;
/// Room `decapsulate` needs for handshake replies and cookies (a 148-byte
/// initiation is answered with 92 bytes).
const MIN_OUT: usize = 256;

/// Decrypted packets waiting for one TUN write, each after room for a
/// virtio-net header. The buffers are kept between batches (no per-packet
/// allocation); GRO may grow one up to a 64 KiB super-packet.
struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: tun_rs::GROTable,
}

impl TunBatch {
    fn new() -> TunBatch {
        TunBatch {
            bufs: (0..RX_BATCH).map(|_| Vec::new()).collect(),
            len: 0,
            gro: tun_rs::GROTable::new(),
        }
    }

    fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// Room for the plaintext of a `dgram_len`-byte datagram (plaintext is shorter).
    fn next(&mut self, dgram_len: usize) -> &mut [u8] {
        let b = &mut self.bufs[self.len];
        b.resize(tun_rs::VIRTIO_NET_HDR_LEN + dgram_len.max(MIN_OUT), 0);
        &mut b[tun_rs::VIRTIO_NET_HDR_LEN..]
    }

    /// Keeps the first `len` bytes written to [`TunBatch::next`] for the TUN.
    fn commit(&mut self, len: usize) {
        self.bufs[self.len].truncate(tun_rs::VIRTIO_NET_HDR_LEN + len);
        self.len += 1;
    }
}
/// Packets the kernel queues on the TUN device for us (its `txqueuelen`; the
/// tun driver sizes its ring from it and tail-drops when it is full, counted
/// as TX drops of the device). The default 500 holds only a few ms of a
/// saturating TCP flow: whenever our reader thread was not scheduled for that
/// long, every other flow through the node lost packets too. 1024 matches the
/// per-peer queue of the kernel WireGuard implementation (MAX_QUEUED_PACKETS).
const TUN_QUEUE_LEN: u32 = 1024;
/// Nice value of the engine's packet and timer threads. A key rotation (or
/// any reconciliation) makes the agent, `veilctl` and their file watchers busy
/// at the same moment; measured in `rotate_all_three_times_under_load` on a
/// loaded host, the engine itself dropped nothing while the TUN queue
/// overflowed by thousands of packets, UDP datagrams among them. The data
/// path must not wait behind the control plane.
const DATA_PATH_NICE: i32 = -10;

/// Errors starting the engine. Packet-level problems are never errors: they are
/// counted in [`EngineCounters`] and logged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "TUN interface name {0:?} is invalid: it must be 1 to 15 bytes without '/' or whitespace"
    )]
    InvalidTunName(String),
    #[error("cannot create TUN device {name:?} (is /dev/net/tun available and the name free?): {source}")]
    Tun { name: String, source: io::Error },
    #[error("cannot configure TUN device {name:?} ({what}): {source}")]
    TunConfig {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot bind the WireGuard UDP socket to port {port} (port in use?): {source}")]
    Bind { port: u16, source: io::Error },
    #[error("cannot set {option} on the WireGuard UDP socket: {source}")]
    SocketOption {
        option: &'static str,
        source: io::Error,
    },
    #[error("cannot serve the UAPI socket {path}: {source}")]
    Uapi { path: PathBuf, source: io::Error },
    #[error(
        "UAPI socket {path} is in use by a running process (another engine for this interface?)"
    )]
    UapiInUse { path: PathBuf },
    #[error("cannot spawn engine thread {name}: {source}")]
    Thread { name: String, source: io::Error },
}

/// Static configuration of an engine.
pub struct EngineConfig {
    /// TUN device name, e.g. `veil0`.
    pub tun_name: String,
    /// TUN MTU, e.g. 1420 (underlay 1500 minus 80 bytes of IPv6+UDP+WireGuard).
    pub mtu: u16,
    /// UDP port; 0 picks any free port (tests).
    pub listen_port: u16,
    pub private_key: x25519_dalek::StaticSecret,
    /// UAPI socket, e.g. `/var/run/wireguard/veil0.sock`; `None` serves none.
    pub uapi_socket: Option<PathBuf>,
    /// Longest a packet thread polls before it sleeps ([`idle_poll`]); zero
    /// never polls.
    pub idle_poll: Duration,
    /// Packet queues (see "Queues" in the module docs); 0 picks
    /// [`auto_queues`], more than [`MAX_QUEUES`] count as [`MAX_QUEUES`].
    pub queues: usize,
}

/// Desired configuration of one peer (one remote node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Observed state of one peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    /// The current endpoint: the configured one, or where the peer last roamed to.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    /// Plaintext bytes received from / sent to this peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub has_session: bool,
    /// Our public key with which the session that carries our traffic to this
    /// peer was made (`None`: no session). After [`Engine::rotate_key`] it turns
    /// to the new key once the peer has switched.
    pub session_key: Option<[u8; 32]>,
}

/// Engine-wide packet counters (monotonic since start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Outbound packet whose destination matches no peer's AllowedIPs.
    pub dropped_no_peer: u64,
    /// Outbound packet for a peer that has no endpoint yet.
    pub dropped_no_endpoint: u64,
    /// Inbound message for a receiver index with no session (e.g. from before a restart).
    pub dropped_no_session: u64,
    /// Decrypted packet whose inner source is outside the sender's AllowedIPs.
    pub dropped_cryptokey: u64,
    /// Malformed, unauthenticated, replayed or otherwise invalid packets.
    pub dropped_invalid: u64,
    /// Handshake initiation from a public key that is not a configured peer.
    pub dropped_unknown_peer: u64,
    /// Of those, held to be answered if the key becomes a peer shortly
    /// ([`rotation::HeldInitiations`]).
    pub initiations_held: u64,
    /// Held initiations answered after their key was configured.
    pub held_answered: u64,
    /// Cookie replies sent because handshakes arrived faster than the rate limit.
    pub cookie_replies: u64,
    /// UDP sends or TUN writes that failed.
    pub send_errors: u64,
    pub tun_rx_packets: u64,
    pub tun_tx_packets: u64,
    pub udp_rx_datagrams: u64,
    pub udp_tx_datagrams: u64,
    /// The packet threads' polling before they sleep ([`idle_poll`]).
    pub idle_poll: idle_poll::Stats,
    /// Per packet queue, in queue order (see [`EngineConfig::queues`]).
    pub queues: Vec<QueueCounters>,
}

/// What one packet queue carried: which cores the work went to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Plaintext packets its tun->udp thread read (and encrypted).
    pub tun_rx_packets: u64,
    /// Datagrams its udp->tun thread received (and decrypted).
    pub udp_rx_datagrams: u64,
}

#[derive(Default)]
struct Counters {
    dropped_no_peer: AtomicU64,
    dropped_no_endpoint: AtomicU64,
    dropped_no_session: AtomicU64,
    dropped_cryptokey: AtomicU64,
    dropped_invalid: AtomicU64,
    dropped_unknown_peer: AtomicU64,
    initiations_held: AtomicU64,
    held_answered: AtomicU64,
    cookie_replies: AtomicU64,
    send_errors: AtomicU64,
    tun_tx_packets: AtomicU64,
    udp_tx_datagrams: AtomicU64,
    /// Shared with the packet threads, which publish their polling there.
    idle_poll: Arc<PollState>,
    /// Per queue: tun->udp packets read, udp->tun datagrams received (the
    /// engine's totals are their sums).
    queues: Box<[[AtomicU64; 2]]>,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// For `queues` packet queues, two packet threads each.
    fn new(queues: usize) -> Counters {
        Counters {
            idle_poll: Arc::new(PollState::new(2 * queues)),
            queues: (0..queues).map(|_| Default::default()).collect(),
            ..Counters::default()
        }
    }

    fn snapshot(&self) -> EngineCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let queues: Vec<QueueCounters> = self
            .queues
            .iter()
            .map(|[tun, udp]| QueueCounters {
                tun_rx_packets: l(tun),
                udp_rx_datagrams: l(udp),
            })
            .collect();
        EngineCounters {
            dropped_no_peer: l(&self.dropped_no_peer),
            dropped_no_endpoint: l(&self.dropped_no_endpoint),
            dropped_no_session: l(&self.dropped_no_session),
            dropped_cryptokey: l(&self.dropped_cryptokey),
            dropped_invalid: l(&self.dropped_invalid),
            dropped_unknown_peer: l(&self.dropped_unknown_peer),
            initiations_held: l(&self.initiations_held),
            held_answered: l(&self.held_answered),
            cookie_replies: l(&self.cookie_replies),
            send_errors: l(&self.send_errors),
            tun_rx_packets: queues.iter().map(|q| q.tun_rx_packets).sum(),
            tun_tx_packets: l(&self.tun_tx_packets),
            udp_rx_datagrams: queues.iter().map(|q| q.udp_rx_datagrams).sum(),
            udp_tx_datagrams: l(&self.udp_tx_datagrams),
            idle_poll: self.idle_poll.stats(),
            queues,
        }
    }
}

/// One of our static keys with the rate limiter (and so the MAC1 key) for it.
struct LocalKey {
    secret: x25519_dalek::StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

impl LocalKey {
    fn new(secret: x25519_dalek::StaticSecret) -> Arc<LocalKey> {
        let public = PublicKey::from(&secret);
        Arc::new(LocalKey {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
        })
    }
}

/// Our current key and, during a grace period, the previous one.
struct Keys {
    current: Arc<LocalKey>,
    /// The previous key and until when it answers handshake initiations.
    previous: Option<(Arc<LocalKey>, Instant)>,
}

impl Keys {
    /// The keys that answer handshake initiations now, current first.
    fn answering(&self, now: Instant) -> impl Iterator<Item = &Arc<LocalKey>> {
        let prev = self
            .previous
            .as_ref()
            .filter(|(_, until)| rotation::answering(now, *until))
            .map(|(k, _)| k);
        std::iter::once(&self.current).chain(prev)
    }

    fn previous_answering(&self, now: Instant) -> Option<(&Arc<LocalKey>, Instant)> {
        self.previous
            .as_ref()
            .filter(|(_, until)| rotation::answering(now, *until))
            .map(|(k, until)| (k, *until))
    }
}

/// A `Tunn` for one (our key, their key) pair; see "Key rotation" above.
struct Slot {
    tunn: Tunn,
    /// The receiver-index prefix boringtun uses for this `Tunn`'s sessions.
    index: u32,
    limiter: Arc<RateLimiter>,
    local: [u8; 32],
    remote: [u8; 32],
    /// `None` for the current slot.
    retire_at: Option<Instant>,
}

impl Slot {
    fn new(
        key: &LocalKey,
        remote: [u8; 32],
        keepalive: Option<u16>,
        index: u32,
        retire_at: Option<Instant>,
    ) -> Slot {
        Slot {
            tunn: Tunn::new(
                key.secret.clone(),
                PublicKey::from(remote),
                None,
                keepalive,
                index,
                Some(key.limiter.clone()),
            ),
            index,
            limiter: key.limiter.clone(),
            local: key.public.to_bytes(),
            remote,
            retire_at,
        }
    }

    fn age(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    fn usable(&self) -> bool {
        rotation::usable(self.age())
    }
}

struct PeerState {
    current: Slot,
    /// Newest first.
    retiring: Vec<Slot>,
    endpoint: Option<SocketAddr>,
    config: PeerConfig,
    /// Byte counts of slots already dropped, so the totals stay monotonic.
    retired_tx: u64,
    retired_rx: u64,
    /// When we last pushed a handshake for the current slot (see module docs).
    last_pushed: Option<Instant>,
}

impl PeerState {
    fn slots(&self) -> impl Iterator<Item = &Slot> {
        std::iter::once(&self.current).chain(self.retiring.iter())
    }

    /// Position (0 = current) of the slot that encrypts outgoing packets.
    fn send_slot(&self) -> usize {
        rotation::send_slot(self.slots().map(Slot::age))
    }

    fn slot(&self, pos: usize) -> &Slot {
        match pos.checked_sub(1).and_then(|i| self.retiring.get(i)) {
            Some(s) => s,
            None => &self.current,
        }
    }

    fn slot_mut(&mut self, pos: usize) -> &mut Slot {
        match pos.checked_sub(1).and_then(|i| self.retiring.get_mut(i)) {
            Some(s) => s,
            None => &mut self.current,
        }
    }

    fn position(&self, pick: impl Fn(&Slot) -> bool) -> Option<usize> {
        self.slots().position(pick)
    }

    fn drop_slot_counts(&mut self, slot: &Slot) {
        let (_, tx, rx, _, _) = slot.tunn.stats();
        self.retired_tx += tx as u64;
        self.retired_rx += rx as u64;
    }

    /// Makes `slot` current; the old current slot retires at `retire_at`.
    fn replace_current(&mut self, slot: Slot, retire_at: Instant) {
        let mut old = std::mem::replace(&mut self.current, slot);
        old.retire_at = Some(retire_at);
        self.retiring.insert(0, old);
        self.last_pushed = None;
        self.trim();
    }

    /// Adds a retiring slot as the newest. (Appending it as the oldest made
    /// `trim` evict it at once whenever the list was full: a slot created to
    /// answer an initiation to our previous key has no session yet, and the
    /// oldest slot without one is the first to go. Measured in
    /// `rotate_all_three_times_under_load`: "handshake to a key with no
    /// session slot" right after such an eviction.)
    fn add_retiring(&mut self, slot: Slot) {
        self.retiring.insert(0, slot);
        self.trim();
    }

    fn trim(&mut self) {
        while self.retiring.len() > rotation::MAX_RETIRING {
            let ages: Vec<Option<Duration>> = self.retiring.iter().map(Slot::age).collect();
            let Some(i) = rotation::evict(&ages) else {
                break;
            };
            let s = self.retiring.remove(i);
            tracing::debug!(
                index = s.index,
                usable = s.usable(),
                "too many retiring session slots; evicted one"
            );
            self.drop_slot_counts(&s);
        }
    }

    /// Drops retiring slots that are no longer needed; true if any went.
    fn prune(&mut self, now: Instant) -> bool {
        let current_usable = self.current.usable();
        let (keep, gone): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|s| match s.retire_at {
                Some(at) => !rotation::should_retire(now, at, s.usable(), current_usable),
                None => true,
            });
        self.retiring = keep;
        for s in &gone {
            self.drop_slot_counts(s);
        }
        !gone.is_empty()
    }

    /// During our grace period, a peer that has not seen our new key initiates
    /// to the previous one: make sure a slot for (previous key, its key) exists.
    fn ensure_previous_slot(
        &mut self,
        prev: Option<(&Arc<LocalKey>, Instant)>,
        alloc: &mut IndexAlloc,
    ) {
        let Some((key, until)) = prev else { return };
        let (local, remote) = (key.public.to_bytes(), self.config.public_key);
        if self.slots().any(|s| s.local == local && s.remote == remote) {
            return;
        }
        let slot = Slot::new(
            key,
            remote,
            self.config.persistent_keepalive,
            alloc.take(),
            Some(until),
        );
        self.add_retiring(slot);
    }
}

struct Peer {
    /// Stable for the life of the peer entry (across key changes): the value
    /// AllowedIPs map to, used for routing and cryptokey checks.
    id: u32,
    state: Mutex<PeerState>,
}

/// Which slot of a peer an incoming datagram is for.
#[derive(Clone, Copy)]
enum SlotRef {
    /// A handshake initiation: (our addressed public key, the initiator's key).
    Keys([u8; 32], [u8; 32]),
    /// Any other message: the slot's receiver-index prefix.
    Index(u32),
}

/// An immutable snapshot of the peer set.
#[derive(Default)]
struct PeerSet {
    /// In configuration order, for stable `peer_stats` and `wg show` output.
    ordered: Vec<Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    /// Slot receiver-index prefix -> peer.
    by_index: HashMap<u32, Arc<Peer>>,
    by_id: HashMap<u32, Arc<Peer>>,
    /// AllowedIPs of all peers -> peer id.
    routes: LpmTable<u32>,
}

impl PeerSet {
    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst).and_then(|id| self.by_id.get(id))
    }

    /// Builds the lookup maps for `peers`, in order (a later peer wins an
    /// AllowedIP listed twice, with a warning).
    fn build(peers: Vec<Arc<Peer>>, tun_name: &str) -> PeerSet {
        let mut set = PeerSet::default();
        for peer in peers {
            {
                let st = peer.state.lock();
                for net in &st.config.allowed_ips {
                    if let Some(prev) = set.routes.insert(*net, peer.id) {
                        if prev != peer.id {
                            tracing::warn!(tun = %tun_name, allowed_ip = %net,
                                "AllowedIP listed for two peers; the later peer gets it");
                        }
                    }
                }
                for s in st.slots() {
                    set.by_index.insert(s.index, peer.clone());
                }
                set.by_key.insert(st.config.public_key, peer.clone());
            }
            set.by_id.insert(peer.id, peer.clone());
            set.ordered.push(peer);
        }
        set
    }
}

/// Hands out slot indices and peer ids that are not in use, from a random
/// start (see [`random_index`]).
struct IndexAlloc {
    next: u32,
    used: HashSet<u32>,
}

impl IndexAlloc {
    fn new(next: u32, set: &PeerSet) -> IndexAlloc {
        let used = set
            .by_index
            .keys()
            .copied()
            .chain(set.by_id.keys().copied())
            .collect();
        IndexAlloc { next, used }
    }

    fn take(&mut self) -> u32 {
        loop {
            let candidate = self.next;
            self.next = if candidate >= packet::MAX_PEER_INDEX {
                1
            } else {
                candidate + 1
            };
            if self.used.insert(candidate) {
                return candidate;
            }
        }
    }
}

struct Shared {
    /// Queue q's TUN queue, read by its tun->udp thread (see "Queues").
    tun_readers: Vec<tun_rs::SyncDevice>,
    /// With several queues, queue q's udp->tun thread writes through
    /// `tun_writers[q]`, a detached queue; with one, through the reader.
    tun_writers: Vec<tun_rs::SyncDevice>,
    /// The TUN device speaks virtio-net headers with TSO/checksum offload
    /// (see [`offload`]); false if the kernel refused and we fell back.
    tun_offload: bool,
    /// `UDP_SEGMENT` sends still work; cleared (once, logged) when the kernel refuses them.
    udp_gso: AtomicBool,
    tun_name: String,
    tun_ifindex: u32,
    /// Queue q's UDP socket, `SO_REUSEPORT` siblings bound to one port;
    /// protocol messages (handshakes, cookies, keepalives) leave by the first.
    socks: Vec<UdpSocket>,
    /// The socket is AF_INET6 with IPV6_V6ONLY off: v4 peers are reached via
    /// v4-mapped addresses.
    dual_stack: bool,
    listen_port: u16,
    keys: RwLock<Arc<Keys>>,
    peers: RwLock<Arc<PeerSet>>,
    /// Serialises reconfiguration (`set_peers`, `rotate_key`, ...) so index
    /// allocation and the swap are atomic; holds the next index to try.
    config_lock: Mutex<u32>,
    counters: Counters,
    /// Initiations from keys that are not peers yet (see module docs).
    held: Mutex<rotation::HeldInitiations<HeldInitiation>>,
    idle_poll: Duration,
    stop: AtomicBool,
}

/// A handshake initiation held until its key is configured.
struct HeldInitiation {
    datagram: Vec<u8>,
    from: SocketAddr,
}

/// The running engine. Dropping it is the same as [`Engine::shutdown`].
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    uapi_path: Option<PathBuf>,
}

fn validate_ifname(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidTunName(name.to_owned()))
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the
    // call; the option value is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds the engine's UDP socket on `port`; with `reuse_port` it joins (or
/// starts) the `SO_REUSEPORT` group of the engine's queues on that port.
fn bind_udp(port: u16, reuse_port: bool) -> Result<(UdpSocket, bool), Error> {
    let opt = |option: &'static str| move |source| Error::SocketOption { option, source };
    let reuse = |s: &Socket| {
        if reuse_port {
            setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
                .map_err(opt("SO_REUSEPORT"))?;
        }
        Ok::<(), Error>(())
    };
    let (sock, dual) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false).map_err(opt("IPV6_V6ONLY"))?;
            reuse(&s)?;
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            s.bind(&addr.into())
                .map_err(|source| Error::Bind { port, source })?;
            (s, true)
        }
        // A kernel or namespace without IPv6: fall back to an IPv4-only socket.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                .map_err(|source| Error::Bind { port, source })?;
            reuse(&s)?;
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            s.bind(&addr.into())
                .map_err(|source| Error::Bind { port, source })?;
            (s, false)
        }
        Err(source) => return Err(Error::Bind { port, source }),
    };
    let fd = sock.as_raw_fd();
    // See the module docs: fragment rather than drop oversized encrypted packets.
    // On an AF_INET6 socket, SOL_IP options govern the v4-mapped traffic
    // (ipv6_setsockopt hands SOL_IP to ip_setsockopt for UDP sockets).
    setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )
    .map_err(opt("IP_MTU_DISCOVER=IP_PMTUDISC_DONT"))?;
    if dual {
        setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )
        .map_err(opt("IPV6_MTU_DISCOVER=IPV6_PMTUDISC_DONT"))?;
    }
    let size = SOCKET_BUFFER as i32;
    // The *FORCE variants bypass net.core.{r,w}mem_max but need CAP_NET_ADMIN;
    // without it fall back to the capped request.
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
        sock.set_recv_buffer_size(SOCKET_BUFFER)
            .map_err(opt("SO_RCVBUF"))?;
    }
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
        sock.set_send_buffer_size(SOCKET_BUFFER)
            .map_err(opt("SO_SNDBUF"))?;
    }
    match offload::enable_udp_gro(fd) {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                port,
                "UDP_GRO not supported; receiving one datagram per call"
            )
        }
        Err(e) => {
            tracing::warn!(port, error = %e, "UDP_GRO refused; receiving one datagram per call")
        }
    }
    Ok((sock.into(), dual))
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass
    // exactly one entry; `fd` stays open because its owner outlives this call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Read queues and write queues (see [`open_queues`]).
type TunQueues = (Vec<tun_rs::SyncDevice>, Vec<tun_rs::SyncDevice>);

/// Opens the TUN queues 1..`queues` of `first`'s device (non-blocking, read by
/// the tun->udp threads) and, with more than one queue, `queues` detached
/// write queues; on failure, what failed and why.
fn open_queues(
    first: &tun_rs::SyncDevice,
    queues: usize,
) -> Result<TunQueues, (&'static str, io::Error)> {
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    if queues < 2 {
        return Ok((readers, writers));
    }
    for q in 1..2 * queues {
        let dev = first.try_clone().map_err(|e| ("open a TUN queue", e))?;
        if q < queues {
            dev.set_nonblocking(true)
                .map_err(|e| ("make a TUN queue non-blocking", e))?;
            readers.push(dev);
        } else {
            detach_queue(dev.as_raw_fd()).map_err(|e| ("detach a TUN write queue", e))?;
            writers.push(dev);
        }
    }
    Ok((readers, writers))
}

/// One packet queue per CPU this process may run on (its affinity and cgroup
/// quota, `std::thread::available_parallelism`), at most [`AUTO_QUEUES_MAX`].
pub fn auto_queues() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(AUTO_QUEUES_MAX)
}

/// Detaches the TUN queue `fd` (`TUNSETQUEUE` with `IFF_DETACH_QUEUE`): the
/// kernel no longer queues packets on it, and a write on it teaches the
/// driver no flow->queue mapping (tun.c `tun_get_user` skips the flow update
/// for a detached queue), while the write itself goes through as on any queue.
fn detach_queue(fd: RawFd) -> io::Result<()> {
    // SAFETY: an all-zero ifreq is a valid value (a C struct of integers,
    // byte arrays and a union of those).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_flags = libc::IFF_DETACH_QUEUE as libc::c_short;
    // SAFETY: `fd` is an open TUN queue owned by the caller; TUNSETQUEUE reads
    // one ifreq, which lives for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETQUEUE, &mut req) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Datagrams from v4 peers arrive on the dual-stack socket as v4-mapped v6
/// addresses; keep them as plain v4 everywhere else (stats, `wg show`, rate limiter).
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn bind_uapi(path: &Path) -> Result<UnixListener, Error> {
    let err = |source| Error::Uapi {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket someone still answers on is not stale: do not steal it.
            if UnixStream::connect(path).is_ok() {
                return Err(Error::UapiInUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket; refusing to remove it",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // The socket reveals the private key: owner only. (Set after bind; the
    // parent directory is root-owned, so nobody else can reach it meanwhile.)
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

impl Engine {
    /// Creates and brings up the TUN device, binds the UDP socket, spawns the
    /// engine threads and (if configured) serves the UAPI socket.
    pub fn start(cfg: EngineConfig) -> Result<Engine, Error> {
        validate_ifname(&cfg.tun_name)?;
        let name = cfg.tun_name.clone();
        let tun_err = |what: &'static str| {
            let name = name.clone();
            move |source| Error::TunConfig { name, what, source }
        };
        let queues = match cfg.queues {
            0 => auto_queues(),
            n => n.min(MAX_QUEUES),
        };
        let builder = || {
            tun_rs::DeviceBuilder::new()
                .name(&cfg.tun_name)
                .multi_queue(queues > 1)
        };
        // IFF_TUN | IFF_NO_PI | IFF_VNET_HDR with TUNSETOFFLOAD CSUM|TSO4|TSO6:
        // the kernel hands us TCP super-packets and takes coalesced ones
        // (see `offload`). A kernel that refuses gets plain one-packet I/O.
        let tun = match builder().offload(true).build_sync() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(tun = %name, error = %e,
                    "TUN offloads (IFF_VNET_HDR/TSO) refused; falling back to one packet per read");
                builder().build_sync().map_err(|source| Error::Tun {
                    name: name.clone(),
                    source,
                })?
            }
        };
        let tun_offload = tun.tcp_gso();
        tun.set_mtu(cfg.mtu).map_err(tun_err("set MTU"))?;
        if let Err(e) = tun.set_tx_queue_len(TUN_QUEUE_LEN) {
            // Works with the default queue, only with more drops under load.
            tracing::warn!(tun = %cfg.tun_name, error = %e, "cannot set txqueuelen");
        }
        tun.enabled(true).map_err(tun_err("bring up"))?;
        // Reads are driven by poll() so the thread can notice shutdown.
        tun.set_nonblocking(true)
            .map_err(tun_err("set non-blocking"))?;
        let tun_ifindex = tun.if_index().map_err(tun_err("look up ifindex"))?;
        // Queues 1.. (same flags and offloads as the first), and with several
        // queues the detached write queues (see "Queues" in the module docs).
        // A kernel that refuses them leaves the engine with one queue, which
        // works the same, on one core.
        let (mut tun_readers, mut tun_writers) = match open_queues(&tun, queues) {
            Ok((readers, writers)) => (std::iter::once(tun).chain(readers).collect(), writers),
            Err((what, e)) => {
                tracing::warn!(tun = %name, queues, error = %e, "cannot {what}; running one packet queue");
                (vec![tun], Vec::new())
            }
        };

        let (sock, dual_stack) = bind_udp(cfg.listen_port, tun_readers.len() > 1)?;
        let listen_port = sock
            .local_addr()
            .map_err(|source| Error::Bind {
                port: cfg.listen_port,
                source,
            })?
            .port();
        let mut socks = vec![sock];
        while socks.len() < tun_readers.len() {
            match bind_udp(listen_port, true) {
                Ok((s, _)) => socks.push(s),
                Err(e) => {
                    tracing::warn!(tun = %name, error = %e,
                        "cannot bind another socket on the listen port; running one packet queue");
                    socks.truncate(1);
                    tun_readers.truncate(1);
                    tun_writers.clear();
                }
            }
        }
        let queues = socks.len();

        let listener = match &cfg.uapi_socket {
            Some(p) => Some(bind_uapi(p)?),
            None => None,
        };

        let shared = Arc::new(Shared {
            tun_readers,
            tun_writers,
            tun_offload,
            udp_gso: AtomicBool::new(true),
            tun_name: cfg.tun_name.clone(),
            tun_ifindex,
            socks,
            dual_stack,
            listen_port,
            keys: RwLock::new(Arc::new(Keys {
                current: LocalKey::new(cfg.private_key),
                previous: None,
            })),
            peers: RwLock::new(Arc::new(PeerSet::default())),
            config_lock: Mutex::new(random_index()),
            counters: Counters::new(queues),
            held: Mutex::new(rotation::HeldInitiations::default()),
            idle_poll: cfg.idle_poll,
            stop: AtomicBool::new(false),
        });
        let mut engine = Engine {
            shared: shared.clone(),
            threads: Vec::new(),
            uapi_path: None,
        };
        // From here on, dropping `engine` on an error path stops what was started.
        for q in 0..queues {
            // Queue 0 keeps the names of the single-queue engine.
            let suffix = if q == 0 { String::new() } else { q.to_string() };
            engine.spawn(format!("veil-wg-tun{suffix}"), {
                let sh = shared.clone();
                move || sh.tun_loop(q)
            })?;
            engine.spawn(format!("veil-wg-udp{suffix}"), {
                let sh = shared.clone();
                move || sh.udp_loop(q)
            })?;
        }
        engine.spawn("veil-wg-timers".into(), {
            let sh = shared.clone();
            move || sh.timer_loop()
        })?;
        if let (Some(listener), Some(path)) = (listener, cfg.uapi_socket) {
            engine.uapi_path = Some(path);
            engine.spawn("veil-wg-uapi".into(), {
                let sh = shared.clone();
                move || sh.uapi_loop(listener)
            })?;
        }
        tracing::info!(
            tun = %shared.tun_name,
            ifindex = tun_ifindex,
            mtu = cfg.mtu,
            listen_port,
            dual_stack,
            tun_offload,
            queues,
            "WireGuard engine started"
        );
        Ok(engine)
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let data_path = name != "veil-wg-uapi";
        let thread_name = name.clone();
        let h = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if data_path {
                    raise_priority(&thread_name);
                }
                f()
            })
            .map_err(|source| Error::Thread { name, source })?;
        self.threads.push(h);
        Ok(())
    }

    pub fn tun_ifindex(&self) -> u32 {
        self.shared.tun_ifindex
    }

    pub fn tun_name(&self) -> &str {
        &self.shared.tun_name
    }

    /// Packet queues running (see "Queues" in the module docs).
    pub fn queues(&self) -> usize {
        self.shared.socks.len()
    }

    /// Whether the TUN device runs with TSO/checksum offloads (virtio-net
    /// headers); false if the kernel refused them and the engine fell back.
    pub fn tun_offload(&self) -> bool {
        self.shared.tun_offload
    }

    /// The UDP port actually bound.
    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.shared.keys.read().current.public.to_bytes()
    }

    /// Replaces the whole peer set, diffing by public key: unchanged peers keep
    /// their sessions, a changed endpoint or AllowedIPs is updated in place,
    /// removed peers are dropped, and new peers initiate a handshake at once,
    /// so that an agent restart re-establishes sessions immediately instead of
    /// after the first packet plus WireGuard's REKEY_TIMEOUT.
    ///
    /// A peer whose public key (or keepalive, which boringtun fixes at
    /// creation) changed while its AllowedIPs stayed the same is the same node
    /// re-keyed: it keeps its old session for receiving and, until the new
    /// handshake completes, for sending (see "Key rotation" in the module docs).
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let sh = &self.shared;
        let mut next_index = sh.config_lock.lock();
        let old = sh.peers.read().clone();
        let keys = sh.keys.read().clone();
        let now = Instant::now();
        let prev = keys.previous_answering(now);
        let own: Vec<[u8; 32]> = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref().map(|(k, _)| k))
            .map(|k| k.public.to_bytes())
            .collect();

        // Last entry for a key wins, keeping the position of the first.
        let mut wanted: Vec<PeerConfig> = Vec::with_capacity(peers.len());
        let mut pos: HashMap<[u8; 32], usize> = HashMap::new();
        for p in peers {
            if own.contains(&p.public_key) {
                tracing::warn!(tun = %sh.tun_name, "ignoring a peer with our own public key");
                continue;
            }
            match pos.get(&p.public_key) {
                Some(&i) => {
                    tracing::warn!(tun = %sh.tun_name, peer = %short_key(&p.public_key),
                        "duplicate peer in configuration; the last entry wins");
                    wanted[i] = p;
                }
                None => {
                    pos.insert(p.public_key, wanted.len());
                    wanted.push(p);
                }
            }
        }

        let mut alloc = IndexAlloc::new(*next_index, &old);
        // Exact matches first, so an entry re-keyed by AllowedIPs never takes
        // over a peer that is still configured under its own key.
        let exact: Vec<Option<Arc<Peer>>> = wanted
            .iter()
            .map(|cfg| {
                old.by_key
                    .get(&cfg.public_key)
                    .filter(|p| {
                        p.state.lock().config.persistent_keepalive == cfg.persistent_keepalive
                    })
                    .cloned()
            })
            .collect();
        let mut claimed: HashSet<u32> = exact.iter().flatten().map(|p| p.id).collect();
        let mut peers = Vec::with_capacity(wanted.len());
        let mut fresh = Vec::new();
        let mut rekeyed = 0usize;
        for (cfg, exact) in wanted.into_iter().zip(exact) {
            if let Some(p) = exact {
                let mut st = p.state.lock();
                // Only an explicit endpoint change overrides a roamed endpoint.
                if st.config.endpoint != cfg.endpoint {
                    if let Some(ep) = cfg.endpoint {
                        st.endpoint = Some(normalize(ep));
                    }
                }
                st.config = cfg;
                st.ensure_previous_slot(prev, &mut alloc);
                drop(st);
                peers.push(p);
                continue;
            }
            let same = old.ordered.iter().find(|p| {
                if claimed.contains(&p.id) {
                    return false;
                }
                let st = p.state.lock();
                st.config.public_key == cfg.public_key
                    || rotation::same_node(&st.config.allowed_ips, &cfg.allowed_ips)
            });
            let slot = Slot::new(
                &keys.current,
                cfg.public_key,
                cfg.persistent_keepalive,
                alloc.take(),
                None,
            );
            let peer = match same {
                Some(p) => {
                    claimed.insert(p.id);
                    let mut st = p.state.lock();
                    tracing::info!(tun = %sh.tun_name, old = %short_key(&st.config.public_key),
                        new = %short_key(&cfg.public_key), "peer re-keyed; keeping its old session until the new one is up");
                    st.replace_current(slot, now + rotation::PEER_REKEY_OVERLAP);
                    if st.config.endpoint != cfg.endpoint {
                        if let Some(ep) = cfg.endpoint {
                            st.endpoint = Some(normalize(ep));
                        }
                    }
                    st.config = cfg;
                    st.ensure_previous_slot(prev, &mut alloc);
                    drop(st);
                    rekeyed += 1;
                    p.clone()
                }
                None => {
                    let mut st = PeerState {
                        current: slot,
                        retiring: Vec::new(),
                        endpoint: cfg.endpoint.map(normalize),
                        config: cfg,
                        retired_tx: 0,
                        retired_rx: 0,
                        last_pushed: None,
                    };
                    st.ensure_previous_slot(prev, &mut alloc);
                    Arc::new(Peer {
                        id: alloc.take(),
                        state: Mutex::new(st),
                    })
                }
            };
            fresh.push(peer.clone());
            peers.push(peer);
        }
        let set = PeerSet::build(peers, &sh.tun_name);
        let removed = old
            .ordered
            .iter()
            .filter(|p| !set.by_id.contains_key(&p.id))
            .count();
        let total = set.ordered.len();
        *sh.peers.write() = Arc::new(set);
        *next_index = alloc.next;
        drop(next_index);
        tracing::info!(tun = %sh.tun_name, peers = total, new_or_rekeyed = fresh.len(), rekeyed, removed,
            "peer set updated");
        sh.answer_held();
        sh.initiate(&fresh);
    }

    /// Switches this interface to `new`, used for all new handshakes,
    /// initiated or answered, while the previous key still answers handshake
    /// initiations until `grace` has passed, so peers that have not yet seen
    /// the new announcement keep working. Established sessions keep flowing
    /// until a handshake with the new key replaces them; one is started at once
    /// with every peer that has an endpoint. A key still in an earlier grace
    /// period stops answering (only one previous key is kept).
    pub fn rotate_key(&self, new: x25519_dalek::StaticSecret, grace: Duration) {
        let sh = &self.shared;
        let mut next_index = sh.config_lock.lock();
        let old_keys = sh.keys.read().clone();
        let key = LocalKey::new(new);
        if key.public == old_keys.current.public {
            tracing::warn!(tun = %sh.tun_name, "rotate_key with the current key; nothing to do");
            return;
        }
        let now = Instant::now();
        // A grace too large to represent means "for as long as we run".
        let until = now
            .checked_add(grace)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        *sh.keys.write() = Arc::new(Keys {
            current: key.clone(),
            previous: Some((old_keys.current.clone(), until)),
        });
        let set = sh.peers.read().clone();
        let mut alloc = IndexAlloc::new(*next_index, &set);
        for p in &set.ordered {
            let mut st = p.state.lock();
            let slot = Slot::new(
                &key,
                st.config.public_key,
                st.config.persistent_keepalive,
                alloc.take(),
                None,
            );
            // The old current slot is exactly (previous key, their key): it
            // answers initiations to the previous key until `until`.
            st.replace_current(slot, until);
        }
        let peers = set.ordered.clone();
        *sh.peers.write() = Arc::new(PeerSet::build(peers.clone(), &sh.tun_name));
        *next_index = alloc.next;
        drop(next_index);
        tracing::info!(tun = %sh.tun_name, public_key = %short_key(&key.public.to_bytes()),
            previous = %short_key(&old_keys.current.public.to_bytes()), grace_s = grace.as_secs(),
            peers = peers.len(), "WireGuard key rotated");
        sh.initiate(&peers);
    }

    /// Restores the previous key after a restart during a grace period: it
    /// answers handshake initiations (from peers that have not seen our current
    /// key) until `until`. A deadline already past, or our current key, is
    /// ignored.
    pub fn set_previous_key(&self, previous: x25519_dalek::StaticSecret, until: SystemTime) {
        let sh = &self.shared;
        let mut next_index = sh.config_lock.lock();
        let Some(until) = rotation::deadline(until, SystemTime::now(), Instant::now()) else {
            tracing::info!(tun = %sh.tun_name, "previous key's grace period is over; not restoring it");
            return;
        };
        let cur = sh.keys.read().clone();
        let key = LocalKey::new(previous);
        if key.public == cur.current.public {
            tracing::warn!(tun = %sh.tun_name, "set_previous_key with the current key; ignored");
            return;
        }
        *sh.keys.write() = Arc::new(Keys {
            current: cur.current.clone(),
            previous: Some((key.clone(), until)),
        });
        let set = sh.peers.read().clone();
        let mut alloc = IndexAlloc::new(*next_index, &set);
        for p in &set.ordered {
            p.state
                .lock()
                .ensure_previous_slot(Some((&key, until)), &mut alloc);
        }
        *sh.peers.write() = Arc::new(PeerSet::build(set.ordered.clone(), &sh.tun_name));
        *next_index = alloc.next;
        tracing::info!(tun = %sh.tun_name, previous = %short_key(&key.public.to_bytes()),
            "previous WireGuard key restored for the rest of its grace period");
    }

    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared
            .peer_views()
            .into_iter()
            .map(|v| v.stats)
            .collect()
    }

    pub fn counters(&self) -> EngineCounters {
        self.shared.counters.snapshot()
    }

    /// Whether every engine thread is still running. The threads loop until
    /// shutdown, so one that finished earlier has died (it panicked or its
    /// device or socket failed): the node no longer encrypts (`/healthz`).
    pub fn is_running(&self) -> bool {
        !self.shared.stop.load(Ordering::SeqCst) && self.threads.iter().all(|h| !h.is_finished())
    }

    /// Stops the threads, closes the TUN device (it disappears) and removes the
    /// UAPI socket.
    pub fn shutdown(self) {
        drop(self)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::error!(tun = %self.shared.tun_name, "an engine thread panicked");
            }
        }
        if let Some(path) = self.uapi_path.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove UAPI socket");
                }
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Gives the calling thread [`DATA_PATH_NICE`]; without CAP_SYS_NICE it
/// keeps the default, with a debug log.
fn raise_priority(thread: &str) {
    // SAFETY: gettid(2) has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: on Linux, PRIO_PROCESS with a thread id changes only that
    // thread's nice value (setpriority(2), NOTES); no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, DATA_PATH_NICE) };
    if rc != 0 {
        tracing::debug!(thread, error = %io::Error::last_os_error(),
            "cannot raise the thread's priority; it runs at the default");
    }
}

fn random_index() -> u32 {
    use rand_core::RngCore;
    // A random start makes indices from a previous run of the agent unlikely to
    // match ours, so the remote's stale data messages miss instead of failing auth.
    (rand_core::OsRng.next_u32() % packet::MAX_PEER_INDEX).max(1)
}

fn short_key(k: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(k)
}

impl Shared {
    /// The socket address to send to: v4 peers as v4-mapped on a dual-stack socket.
    fn wire_addr(&self, to: SocketAddr) -> SocketAddr {
        match (self.dual_stack, to) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => to,
        }
    }

    fn send(&self, data: &[u8], to: SocketAddr) {
        let to = self.wire_addr(to);
        match self.socks[0].send_to(data, to) {
            Ok(_) => bump(&self.counters.udp_tx_datagrams),
            Err(e) => {
                bump(&self.counters.send_errors);
                tracing::debug!(tun = %self.tun_name, %to, error = %e, "UDP send failed");
            }
        }
    }

    /// Sends the encrypted datagrams queued in `tx` ([`batch::plan`]: GSO
    /// runs per endpoint, several messages per `sendmmsg`) on queue `q`'s
    /// socket and empties it.
    fn flush_tx(&self, tx: &mut batch::TxQueue, q: usize) {
        if tx.is_empty() {
            tx.clear();
            return;
        }
        let gso = self.udp_gso.load(Ordering::Relaxed);
        batch::plan(&tx.tos, &tx.lens, gso, &mut tx.msgs);
        let fd = self.socks[q].as_raw_fd();
        let mut i = 0;
        while i < tx.msgs.len() {
            let end = tx.msgs.len().min(i + batch::MAX_MSGS);
            let data = &tx.out[..tx.used];
            match tx
                .mmsg
                .send(fd, data, &tx.msgs[i..end], |a| self.wire_addr(a))
            {
                Ok(k) if k > 0 => {
                    let sent: usize = tx.msgs[i..i + k].iter().map(|m| m.count).sum();
                    self.counters
                        .udp_tx_datagrams
                        .fetch_add(sent as u64, Ordering::Relaxed);
                    i += k;
                }
                Ok(_) => {
                    bump(&self.counters.send_errors);
                    i += 1;
                }
                Err(e) => {
                    self.send_failed(&tx.msgs[i], data, e);
                    i += 1;
                }
            }
        }
        tx.clear();
    }

    /// A message `sendmmsg` refused. A GSO message is retried one datagram
    /// at a time; a refusal that is for good (`EIO`: the route's device cannot
    /// checksum UDP, udp_send_skb; `ENOPROTOOPT`/`EOPNOTSUPP`: a kernel without
    /// UDP GSO) turns GSO off. `EINVAL` and others (e.g. a segment larger than
    /// the path MTU) concern only this message.
    fn send_failed(&self, m: &batch::Msg<SocketAddr>, data: &[u8], e: io::Error) {
        let Some(seg) = m.seg.filter(|_| m.count > 1) else {
            bump(&self.counters.send_errors);
            tracing::debug!(tun = %self.tun_name, to = %m.to, error = %e, "UDP send failed");
            return;
        };
        if matches!(
            e.raw_os_error(),
            Some(libc::EIO) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
        ) && self.udp_gso.swap(false, Ordering::Relaxed)
        {
            tracing::warn!(tun = %self.tun_name, error = %e,
                "UDP GSO (UDP_SEGMENT) refused; sending one datagram per call");
        } else {
            tracing::debug!(tun = %self.tun_name, to = %m.to, error = %e,
                "UDP GSO send failed; sending this run one by one");
        }
        for d in data[m.off..m.off + m.len].chunks(usize::from(seg).max(1)) {
            self.send(d, m.to);
        }
    }

    /// Queue `q`'s tun->udp thread.
    fn tun_loop(&self, q: usize) {
        // One read is one packet or one TSO super-packet (virtio header first);
        // tun-rs splits the latter into segments (see `offload`), each into a
        // slot. A wakeup drains the device into the slots (see [`TX_READS`]),
        // then encrypts and sends all of it at once (see `batch`).
        let mut raw = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + MAX_PACKET];
        let mut pool = vec![0u8; TX_SLOTS * TX_SLOT];
        let mut segs: Vec<&mut [u8]> = pool.chunks_mut(TX_SLOT).collect();
        let mut sizes = vec![0usize; TX_SLOTS];
        let mut tx = batch::TxQueue::new(OUT_BUF, TX_SLOTS);
        let tun = &self.tun_readers[q];
        let fd = tun.as_raw_fd();
        let mut idle = IdlePoll::new(self.idle_poll, self.counters.idle_poll.clone(), 2 * q);
        // Whether the last drain stopped at its bound with packets still queued.
        let mut more = false;
        while !self.stop.load(Ordering::Relaxed) {
            if !more {
                match idle.wait_readable(fd, POLL_INTERVAL, &self.stop) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(tun = %self.tun_name, error = %e, "poll on TUN failed");
                        std::thread::sleep(POLL_INTERVAL);
                        continue;
                    }
                }
            }
            let (mut filled, mut reads) = (0, 0);
            // Stopped at the bound (not at EAGAIN or an error): read again
            // after sending, without polling first.
            more = true;
            while reads < TX_READS && filled + TUN_SEGMENTS <= TX_SLOTS {
                reads += 1;
                match tun.recv_multiple(&mut raw[..], &mut segs[filled..], &mut sizes[filled..], 0)
                {
                    Ok(n) => filled += n,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        more = false;
                        break;
                    }
                    Err(e) => {
                        // A super-packet tun-rs cannot split (bad header, too
                        // many segments): drop it; the next wakeup reads on.
                        bump(&self.counters.dropped_invalid);
                        tracing::debug!(tun = %self.tun_name, error = %e, "TUN read failed");
                        more = false;
                        break;
                    }
                }
            }
            if filled > 0 {
                self.counters.queues[q][0].fetch_add(filled as u64, Ordering::Relaxed);
                self.outbound(&segs[..filled], &sizes[..filled], &mut tx, q);
            }
        }
    }

    /// Plaintext packets from the TUN device (one wakeup's reads) towards their
    /// peers. Packets are grouped by peer, stably ([`batch::group_stable`]):
    /// each peer's packets are encrypted under one lock in the order they were
    /// read, queued back to back, and all of it leaves in as few `sendmmsg`
    /// calls and GSO runs as possible ([`Shared::flush_tx`]).
    fn outbound(&self, segs: &[&mut [u8]], sizes: &[usize], tx: &mut batch::TxQueue, q: usize) {
        let c = &self.counters;
        let set = self.peers.read().clone();
        tx.keys.clear();
        // The segments of one super-packet share the destination: one lookup.
        let mut last: Option<(IpAddr, Option<u32>)> = None;
        for (seg, &size) in segs.iter().zip(sizes) {
            let key = match packet::dst_addr(&seg[..size]) {
                None => {
                    bump(&c.dropped_invalid);
                    None
                }
                Some(dst) => {
                    let id = match last {
                        Some((d, id)) if d == dst => id,
                        _ => set.route(dst).map(|p| p.id),
                    };
                    last = Some((dst, id));
                    if id.is_none() {
                        bump(&c.dropped_no_peer);
                    }
                    id
                }
            };
            tx.keys.push(key);
        }
        batch::group_stable(&tx.keys, &mut tx.order);
        let mut i = 0;
        while i < tx.order.len() {
            let id = tx.keys[tx.order[i]];
            let mut j = i + 1;
            while j < tx.order.len() && tx.keys[tx.order[j]] == id {
                j += 1;
            }
            let run = i..j;
            i = j;
            let Some(peer) = id.and_then(|id| set.by_id.get(&id)) else {
                c.dropped_no_peer
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                continue;
            };
            let mut st = peer.state.lock();
            let Some(ep) = st.endpoint else {
                drop(st);
                c.dropped_no_endpoint
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                continue;
            };
            let pos = st.send_slot();
            for r in run {
                let k = tx.order[r];
                let pkt = &segs[k][..sizes[k]];
                if tx.room() < pkt.len() + WG_OVERHEAD {
                    self.flush_tx(tx, q);
                }
                // Without a session boringtun queues the packet and returns a
                // handshake initiation (or Done if one is already in flight).
                match st.slot_mut(pos).tunn.encapsulate(pkt, tx.tail()) {
                    TunnResult::WriteToNetwork(p) if p.first() == Some(&4) => {
                        let len = p.len();
                        tx.commit(ep, len);
                    }
                    // A retiring slot whose session just lapsed: no handshake
                    // with a key that is going away (see module docs).
                    TunnResult::WriteToNetwork(p) if pos > 0 && rotation::is_initiation(p) => {}
                    // A protocol message goes out at once, not behind the batch.
                    TunnResult::WriteToNetwork(p) => self.send(p, ep),
                    TunnResult::Done => {}
                    TunnResult::Err(e) => {
                        bump(&c.dropped_invalid);
                        tracing::debug!(tun = %self.tun_name, error = ?e, "encapsulate failed");
                    }
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
                }
            }
        }
        self.flush_tx(tx, q);
    }

    /// Sends a handshake initiation from the current slot of each of `peers`
    /// that has an endpoint (see [`Engine::set_peers`], [`Engine::rotate_key`]).
    fn initiate(&self, peers: &[Arc<Peer>]) {
        let mut buf = [0u8; 256];
        for p in peers {
            let mut st = p.state.lock();
            let Some(ep) = st.endpoint else { continue };
            st.last_pushed = Some(Instant::now());
            if let TunnResult::WriteToNetwork(init) =
                st.current.tunn.format_handshake_initiation(&mut buf, false)
            {
                drop(st);
                self.send(init, ep);
            }
        }
    }

    /// Queue `q`'s udp->tun thread.
    fn udp_loop(&self, q: usize) {
        let fd = self.socks[q].as_raw_fd();
        // One recvmmsg takes up to RX_MSGS messages, only what is queued; with
        // UDP_GRO each is a run of datagrams from one sender.
        let mut rx = batch::RecvMmsg::new();
        let mut batch = TunBatch::new();
        let mut idle = IdlePoll::new(self.idle_poll, self.counters.idle_poll.clone(), 2 * q + 1);
        while !self.stop.load(Ordering::Relaxed) {
            let n = match rx.recv(fd, false) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing queued: poll, then sleep until something is.
                    if let Err(e) = idle.wait_readable(fd, POLL_INTERVAL, &self.stop) {
                        tracing::error!(tun = %self.tun_name, error = %e, "poll on the UDP socket failed");
                        std::thread::sleep(POLL_INTERVAL);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. ECONNREFUSED from an ICMP error on an earlier send: not fatal.
                    tracing::debug!(tun = %self.tun_name, error = %e, "UDP receive error");
                    continue;
                }
            };
            let received = &self.counters.queues[q][1];
            for m in 0..n {
                let Some((data, from, seg)) = rx.message(m) else {
                    bump(&self.counters.dropped_invalid);
                    continue;
                };
                let from = normalize(from);
                for d in offload::datagrams(data, seg) {
                    bump(received);
                    if batch.is_full() {
                        self.flush_tun(&mut batch, q);
                    }
                    let out = batch.next(d.len());
                    if let Some(len) = self.inbound(d, from, out) {
                        batch.commit(len);
                    }
                }
            }
            self.flush_tun(&mut batch, q);
        }
    }

    /// Writes the decrypted packets of `batch` to the TUN device (through
    /// queue `q`'s write queue); with offloads, consecutive TCP segments of a
    /// flow go as one GRO super-packet.
    fn flush_tun(&self, batch: &mut TunBatch, q: usize) {
        let n = batch.len;
        if n == 0 {
            return;
        }
        batch.len = 0;
        let tun = self.tun_writers.get(q).unwrap_or(&self.tun_readers[q]);
        match tun.send_multiple(
            &mut batch.gro,
            &mut batch.bufs[..n],
            tun_rs::VIRTIO_NET_HDR_LEN,
        ) {
            Ok(_) => {
                self.counters
                    .tun_tx_packets
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                bump(&self.counters.send_errors);
                tracing::debug!(tun = %self.tun_name, error = %e, "TUN write failed");
            }
        }
    }

    /// One datagram from the network. Returns the length of a decrypted packet
    /// that passed cryptokey routing and now sits at the start of `out`.
    fn inbound(&self, dgram: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<usize> {
        let c = &self.counters;
        let Ok(packet) = Tunn::parse_incoming_packet(dgram) else {
            bump(&c.dropped_invalid);
            return None;
        };
        let set = self.peers.read().clone();
        let (peer, slot_ref) = match packet {
            Packet::HandshakeInit(_) => {
                let keys = self.keys.read().clone();
                // MAC1 is keyed by the responder's public key (whitepaper
                // §5.4.4): it tells which of our keys was addressed before any
                // Diffie-Hellman work, and the cookie check runs under load.
                let mut addressed = None;
                for key in keys.answering(Instant::now()) {
                    match key.limiter.verify_packet(Some(from.ip()), dgram, out) {
                        Ok(_) => {
                            addressed = Some(key);
                            break;
                        }
                        Err(TunnResult::WriteToNetwork(cookie)) => {
                            bump(&c.cookie_replies);
                            self.send(cookie, from);
                            return None;
                        }
                        Err(TunnResult::Err(WireGuardError::InvalidMac)) => continue,
                        Err(_) => break,
                    }
                }
                let Some(key) = addressed else {
                    bump(&c.dropped_invalid);
                    return None;
                };
                let peer_public = match packet::demux(&packet, &key.secret, &key.public) {
                    Ok(Demux::Initiation { peer_public }) => peer_public,
                    _ => {
                        bump(&c.dropped_invalid);
                        return None;
                    }
                };
                let Some(peer) = set.by_key.get(&peer_public) else {
                    bump(&c.dropped_unknown_peer);
                    self.hold_initiation(peer_public, dgram, from);
                    return None;
                };
                (peer, SlotRef::Keys(key.public.to_bytes(), peer_public))
            }
            Packet::HandshakeResponse(_) | Packet::PacketCookieReply(_) | Packet::PacketData(_) => {
                let Ok(Demux::Index { peer_index }) = packet::demux_index(&packet) else {
                    bump(&c.dropped_invalid);
                    return None;
                };
                let Some(peer) = set.by_index.get(&peer_index) else {
                    bump(&c.dropped_no_session);
                    tracing::trace!(tun = %self.tun_name, %from, peer_index, "message for an unknown receiver index");
                    return None;
                };
                (peer, SlotRef::Index(peer_index))
            }
        };
        let is_cookie = matches!(packet, Packet::PacketCookieReply(_));

        let mut st = peer.state.lock();
        let pos = match slot_ref {
            SlotRef::Keys(local, remote) => st.position(|s| s.local == local && s.remote == remote),
            SlotRef::Index(index) => st.position(|s| s.index == index),
        };
        let Some(pos) = pos else {
            match slot_ref {
                SlotRef::Keys(_, remote) => {
                    bump(&c.dropped_unknown_peer);
                    tracing::debug!(tun = %self.tun_name, %from, peer = %short_key(&remote),
                        "handshake to a key with no session slot for this peer");
                }
                // A slot retired since the snapshot was taken.
                SlotRef::Index(index) => {
                    bump(&c.dropped_no_session);
                    tracing::trace!(tun = %self.tun_name, %from, index, "message for a retired session slot");
                }
            }
            return None;
        };
        let slot = st.slot_mut(pos);
        if matches!(packet, Packet::HandshakeResponse(_)) {
            // MAC1 (and the cookie under load) with the key this slot used,
            // before the Diffie-Hellman work in decapsulate.
            match slot.limiter.verify_packet(Some(from.ip()), dgram, out) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    bump(&c.cookie_replies);
                    self.send(cookie, from);
                    return None;
                }
                Err(_) => {
                    bump(&c.dropped_invalid);
                    return None;
                }
            }
        }
        let result = slot.tunn.decapsulate(Some(from.ip()), dgram, out);
        if let TunnResult::Err(e) = &result {
            match e {
                WireGuardError::NoCurrentSession => bump(&c.dropped_no_session),
                _ => bump(&c.dropped_invalid),
            }
            tracing::trace!(tun = %self.tun_name, %from, error = ?e, "decapsulate rejected a datagram");
            return None;
        }
        // The datagram authenticated as this peer: follow it if it moved (roaming,
        // WireGuard paper §2.1). Cookie replies are not authenticated by the
        // peer's static key, so they do not move the endpoint.
        if !is_cookie && st.endpoint != Some(from) {
            tracing::debug!(tun = %self.tun_name, old = ?st.endpoint, new = %from, "peer endpoint changed");
            st.endpoint = Some(from);
        }
        let (flush, deliver) = match result {
            TunnResult::WriteToNetwork(p) => {
                self.send(p, from);
                (true, None)
            }
            TunnResult::WriteToTunnelV4(p, src) => (
                false,
                self.accept(&set, peer.id, IpAddr::V4(src))
                    .then_some(p.len()),
            ),
            TunnResult::WriteToTunnelV6(p, src) => (
                false,
                self.accept(&set, peer.id, IpAddr::V6(src))
                    .then_some(p.len()),
            ),
            TunnResult::Done | TunnResult::Err(_) => (false, None),
        };
        if flush {
            // A completed handshake releases the packets queued while it ran:
            // boringtun hands them out one per call with an empty datagram.
            let ep = st.endpoint.unwrap_or(from);
            while let TunnResult::WriteToNetwork(p) =
                st.slot_mut(pos).tunn.decapsulate(None, &[], out)
            {
                self.send(p, ep);
            }
        }
        deliver
    }

    /// An initiation from `key`, which is not a configured peer: held for a
    /// moment in case the key is being configured right now (a peer that
    /// rotated and whose announcement we have not read yet).
    fn hold_initiation(&self, key: [u8; 32], dgram: &[u8], from: SocketAddr) {
        let evicted = self.held.lock().hold(
            key,
            HeldInitiation {
                datagram: dgram.to_vec(),
                from,
            },
            Instant::now(),
        );
        bump(&self.counters.initiations_held);
        tracing::debug!(tun = %self.tun_name, %from, peer = %short_key(&key), evicted,
            "handshake from a key that is not a configured peer; held until it is or for {:?}",
            rotation::HELD_INITIATION_TTL);
    }

    /// Answers the held initiations whose key is now a configured peer, as if
    /// they had just arrived: the same MAC1, rate-limit and handshake checks
    /// run, and boringtun rejects a replayed one by its timestamp.
    fn answer_held(&self) {
        let set = self.peers.read().clone();
        let ready = self
            .held
            .lock()
            .take(|k| set.by_key.contains_key(k), Instant::now());
        if ready.is_empty() {
            return;
        }
        let mut out = vec![0u8; MAX_PACKET + WG_OVERHEAD];
        for h in ready {
            bump(&self.counters.held_answered);
            tracing::debug!(tun = %self.tun_name, from = %h.from, "answering a held handshake initiation");
            self.inbound(&h.datagram, h.from, &mut out);
        }
    }

    /// Logs the drop counters (debug) at most once a second when they moved,
    /// so losses can be matched against rotation events in the log.
    fn log_drops(&self, last: &mut (Instant, EngineCounters)) {
        if last.0.elapsed() < Duration::from_secs(1) {
            return;
        }
        let now = self.counters.snapshot();
        let drops = |c: &EngineCounters| {
            (
                c.dropped_no_peer,
                c.dropped_no_endpoint,
                c.dropped_no_session,
                c.dropped_cryptokey,
                c.dropped_invalid,
                c.dropped_unknown_peer,
                c.send_errors,
            )
        };
        if drops(&now) != drops(&last.1) || now.held_answered != last.1.held_answered {
            tracing::debug!(tun = %self.tun_name, no_peer = now.dropped_no_peer,
                no_endpoint = now.dropped_no_endpoint, no_session = now.dropped_no_session,
                cryptokey = now.dropped_cryptokey, invalid = now.dropped_invalid,
                unknown_peer = now.dropped_unknown_peer, held = now.initiations_held,
                held_answered = now.held_answered, send_errors = now.send_errors,
                "engine drop counters");
        }
        *last = (Instant::now(), now);
    }

    /// Cryptokey routing on receive (see [`packet::cryptokey_check`]).
    fn accept(&self, set: &PeerSet, sender: u32, src: IpAddr) -> bool {
        match packet::cryptokey_check(&set.routes, &sender, src) {
            CryptokeyVerdict::Allow => true,
            CryptokeyVerdict::WrongSource => {
                bump(&self.counters.dropped_cryptokey);
                tracing::debug!(tun = %self.tun_name, %src,
                    "dropped a packet whose source is outside the sending peer's AllowedIPs");
                false
            }
        }
    }

    fn timer_loop(&self) {
        let mut buf = vec![0u8; MAX_PACKET + WG_OVERHEAD];
        let mut sends: Vec<Vec<u8>> = Vec::new();
        let mut logged = (Instant::now(), self.counters.snapshot());
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(TIMER_TICK);
            self.log_drops(&mut logged);
            // Peers share one limiter per key, so boringtun does not reset them per peer.
            let keys = self.keys.read().clone();
            keys.current.limiter.reset_count();
            if let Some((k, _)) = &keys.previous {
                k.limiter.reset_count();
            }
            let set = self.peers.read().clone();
            let now = Instant::now();
            for peer in &set.ordered {
                let mut st = peer.state.lock();
                let ep = st.endpoint;
                let state = &mut *st;
                for (pos, slot) in std::iter::once(&mut state.current)
                    .chain(state.retiring.iter_mut())
                    .enumerate()
                {
                    match slot.tunn.update_timers(&mut buf) {
                        // Retiring slots start no handshakes (module docs).
                        TunnResult::WriteToNetwork(p) if pos > 0 && rotation::is_initiation(p) => {}
                        TunnResult::WriteToNetwork(p) => sends.push(p.to_vec()),
                        // Expected after REKEY_ATTEMPT_TIME without an answer; a new
                        // packet for the peer starts over.
                        TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                        TunnResult::Err(e) => {
                            tracing::debug!(tun = %self.tun_name, error = ?e, "timer error")
                        }
                        _ => {}
                    }
                }
                if st.prune(now) {
                    tracing::debug!(tun = %self.tun_name, peer = %short_key(&st.config.public_key),
                        left = st.retiring.len(), "retired old session slots");
                }
                let current_usable = st.current.usable();
                if rotation::should_push_handshake(
                    !st.retiring.is_empty(),
                    current_usable,
                    st.last_pushed,
                    now,
                ) {
                    st.last_pushed = Some(now);
                    if let TunnResult::WriteToNetwork(p) =
                        st.current.tunn.format_handshake_initiation(&mut buf, false)
                    {
                        sends.push(p.to_vec());
                    }
                }
                drop(st);
                for p in sends.drain(..) {
                    match ep {
                        Some(ep) => self.send(&p, ep),
                        None => bump(&self.counters.dropped_no_endpoint),
                    }
                }
            }
        }
    }

    fn uapi_loop(&self, listener: UnixListener) {
        let fd = listener.as_raw_fd();
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(false).is_ok() {
                        uapi::serve_client(stream, self, &self.tun_name, uapi::CLIENT_DEADLINE);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = wait_readable(fd, POLL_INTERVAL);
                }
                Err(e) => {
                    tracing::warn!(tun = %self.tun_name, error = %e, "UAPI accept failed");
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
        }
    }

    fn peer_views(&self) -> Vec<uapi::PeerView> {
        let set = self.peers.read().clone();
        let now = SystemTime::now();
        set.ordered
            .iter()
            .map(|p| {
                let st = p.state.lock();
                let sending = st.slot(st.send_slot());
                // A session older than Reject-After-Time can no longer carry
                // data (whitepaper §6.1), even if boringtun keeps it.
                let has_session = sending.usable();
                let youngest = st.slots().filter_map(Slot::age).min();
                let (mut tx, mut rx) = (st.retired_tx, st.retired_rx);
                for s in st.slots() {
                    let (_, t, r, _, _) = s.tunn.stats();
                    tx += t as u64;
                    rx += r as u64;
                }
                uapi::PeerView {
                    stats: PeerStats {
                        public_key: st.config.public_key,
                        endpoint: st.endpoint,
                        allowed_ips: st.config.allowed_ips.clone(),
                        last_handshake: youngest.and_then(|d| now.checked_sub(d)),
                        rx_bytes: rx,
                        tx_bytes: tx,
                        has_session,
                        session_key: has_session.then_some(sending.local),
                    },
                    persistent_keepalive: st.config.persistent_keepalive,
                }
            })
            .collect()
    }
}

impl uapi::UapiSource for Shared {
    fn private_key(&self) -> [u8; 32] {
        self.keys.read().current.secret.to_bytes()
    }
    fn listen_port(&self) -> u16 {
        self.listen_port
    }
    fn peer_views(&self) -> Vec<uapi::PeerView> {
        Shared::peer_views(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_send_and_sync() {
        // The agent moves the engine between threads and shares it across tasks.
        fn check<T: Send + Sync>() {}
        check::<Engine>();
    }

    #[test]
    fn interface_names() {
        assert!(validate_ifname("veil0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        for bad in ["", "abcdefghijklmnop", "a/b", "a b", ".", "..", "a:1"] {
            assert!(
                matches!(validate_ifname(bad), Err(Error::InvalidTunName(_))),
                "{bad:?}"
            );
        }
    }

    /// A full handshake between two in-memory `Tunn`s, ending with the
    /// initiator's keepalive so both sides have a current session.
    fn handshake(init: &mut Tunn, resp: &mut Tunn) {
        let (mut b1, mut b2) = (vec![0u8; 2048], vec![0u8; 2048]);
        let TunnResult::WriteToNetwork(i) = init.format_handshake_initiation(&mut b1, false) else {
            panic!("no initiation")
        };
        let i = i.to_vec();
        let TunnResult::WriteToNetwork(r) = resp.decapsulate(None, &i, &mut b2) else {
            panic!("no response")
        };
        let r = r.to_vec();
        let TunnResult::WriteToNetwork(k) = init.decapsulate(None, &r, &mut b1) else {
            panic!("no keepalive")
        };
        let k = k.to_vec();
        assert!(matches!(
            resp.decapsulate(None, &k, &mut b2),
            TunnResult::Done
        ));
    }

    fn remote(key: &x25519_dalek::StaticSecret, ours: &LocalKey, index: u32) -> Tunn {
        Tunn::new(key.clone(), ours.public, None, None, index, None)
    }

    #[test]
    fn old_session_carries_traffic_until_the_new_one_is_up() {
        let k0 = LocalKey::new(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ));
        let k1 = LocalKey::new(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ));
        let kb = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        let kb_pub = PublicKey::from(&kb).to_bytes();
        let cfg = PeerConfig {
            public_key: kb_pub,
            endpoint: None,
            allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
            persistent_keepalive: None,
        };
        let mut st = PeerState {
            current: Slot::new(&k0, kb_pub, None, 10, None),
            retiring: Vec::new(),
            endpoint: None,
            config: cfg,
            retired_tx: 0,
            retired_rx: 0,
            last_pushed: None,
        };
        let mut b_old = remote(&kb, &k0, 100);
        handshake(&mut st.current.tunn, &mut b_old);
        assert_eq!(st.send_slot(), 0);

        // Rotate: the new current slot has no session yet, so the old one sends.
        let now = Instant::now();
        st.replace_current(Slot::new(&k1, kb_pub, None, 11, None), now);
        assert_eq!(st.send_slot(), 1);
        assert_eq!(st.slot(1).local, k0.public.to_bytes());
        let mut out = vec![0u8; 256];
        let pkt = [0x45u8; 40];
        assert!(matches!(
            st.slot_mut(st.send_slot()).tunn.encapsulate(&pkt, &mut out),
            TunnResult::WriteToNetwork(_)
        ));
        // Past its deadline the old slot stays while it is the only carrier.
        assert!(!st.prune(now + Duration::from_secs(1)));
        assert_eq!(st.retiring.len(), 1);

        // The peer learns the new key and initiates: the new session takes over.
        let mut b_new = remote(&kb, &k1, 101);
        handshake(&mut b_new, &mut st.current.tunn);
        assert_eq!(st.send_slot(), 0);
        assert!(
            !st.prune(now - Duration::from_secs(1)),
            "not before its deadline"
        );
        assert!(st.prune(now + Duration::from_secs(1)));
        assert!(st.retiring.is_empty());
        assert_eq!(
            st.retired_tx,
            pkt.len() as u64,
            "counts of dropped slots are kept"
        );
    }

    #[test]
    fn previous_key_slot_is_created_once_and_trimmed() {
        let k0 = LocalKey::new(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ));
        let k1 = LocalKey::new(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ));
        let cfg = PeerConfig {
            public_key: [7; 32],
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        };
        let mut st = PeerState {
            current: Slot::new(&k1, [7; 32], None, 1, None),
            retiring: Vec::new(),
            endpoint: None,
            config: cfg,
            retired_tx: 0,
            retired_rx: 0,
            last_pushed: None,
        };
        let mut alloc = IndexAlloc {
            next: 5,
            used: HashSet::from([6]),
        };
        let until = Instant::now() + Duration::from_secs(9);
        st.ensure_previous_slot(Some((&k0, until)), &mut alloc);
        st.ensure_previous_slot(Some((&k0, until)), &mut alloc);
        assert_eq!(st.retiring.len(), 1);
        assert_eq!(st.retiring[0].index, 5);
        assert_eq!(st.retiring[0].retire_at, Some(until));
        assert_eq!(alloc.take(), 7, "indices in use are skipped");
        let extra = rotation::MAX_RETIRING as u8 + 2;
        for i in 0..extra {
            st.add_retiring(Slot::new(&k0, [i; 32], None, 20 + u32::from(i), None));
        }
        assert_eq!(st.retiring.len(), rotation::MAX_RETIRING);
        // None has a session: the oldest go first, the one just added stays.
        assert_eq!(st.retiring[0].index, 20 + u32::from(extra - 1));
        assert!(st.retiring.iter().all(|s| s.index != 5));
    }

    #[test]
    fn auto_queues_follow_the_cpus_the_process_may_use() {
        assert!((1..=AUTO_QUEUES_MAX).contains(&auto_queues()));
        // A thread pinned to one CPU (as a cpuset or `taskset` would pin the
        // agent) gets one queue, whatever the machine has.
        let pinned = std::thread::spawn(|| {
            // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes
            // bit 0 of the set we own.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(0, &mut set) };
            // SAFETY: pid 0 is the calling thread; the set is a live
            // cpu_set_t of the size passed.
            let rc =
                unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(rc, 0, "sched_setaffinity: {}", io::Error::last_os_error());
            auto_queues()
        });
        assert_eq!(pinned.join().unwrap(), 1);
    }

    #[test]
    fn v4_mapped_addresses_are_normalized() {
        let mapped: SocketAddr = "[::ffff:198.18.0.1]:51820".parse().unwrap();
        assert_eq!(normalize(mapped), "198.18.0.1:51820".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:51820".parse().unwrap();
        assert_eq!(normalize(v6), v6);
    }
}
