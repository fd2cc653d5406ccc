//! Batched UDP I/O for the engine: what one wakeup of a thread produced goes
//! out, or comes in, with as few syscalls as the kernel allows.
//!
//! **Sending** (tun->udp): the thread drains the TUN device, encrypts what it
//! read grouped by peer ([`group_stable`]), and queues the encrypted datagrams
//! back to back with their endpoint. [`plan`] turns that queue into messages:
//! a run of consecutive datagrams to one endpoint with equal sizes (a shorter
//! last one allowed) becomes one `UDP_SEGMENT` message, as wireguard-go does;
//! [`SendMmsg`] hands up to [`MAX_MSGS`] messages to one `sendmmsg(2)`.
//!
//! **Receiving** (udp->tun): [`RecvMmsg`] takes up to [`RX_MSGS`] messages
//! per `recvmmsg(2)`, waiting only for the first (`MSG_WAITFORONE`); with
//! `UDP_GRO` each message is itself a run of datagrams from one sender.
//!
//! **Order.** A flow's packets all go to one peer, and a peer's packets are
//! encrypted in the order they were read (their counters increase in that
//! order) and sent in that order: grouping is stable, `plan` keeps the queue
//! order, and `sendmmsg` sends its messages in array order (`__sys_sendmmsg`
//! loops over them). Only packets of different peers change their relative
//! order, which no flow can see.
//!
//! All buffers are allocated once per thread; nothing here allocates per packet.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::offload::{self, CmsgBuf};

/// Messages per `sendmmsg`: one wakeup's worth (64 TUN reads, or a TSO
/// super-packet in a few GSO runs) fits in one call; the kernel's own cap is
/// `UIO_MAXIOV` (1024).
pub const MAX_MSGS: usize = 64;
/// Messages per `recvmmsg`, each up to 64 KiB (a `UDP_GRO` run): bounds the
/// work between two TUN write batches and so the added latency.
pub const RX_MSGS: usize = 8;
/// Largest UDP payload a receive may carry (a GRO run is at most 64 KiB).
const RX_BUF: usize = 65_536;

/// One message for `sendmmsg`: `count` datagrams to `to`, laid out at
/// `off..off + len` of the send buffer; `seg` is the `UDP_SEGMENT` size when
/// `count > 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg<E> {
    pub to: E,
    pub off: usize,
    pub len: usize,
    pub count: usize,
    pub seg: Option<u16>,
}

/// The indices of `keys` grouped by key, stably: groups in the order their key
/// first appears, and within a group the original order. `None` (a packet
/// already dropped) is left out. Typical wakeups hold one or two peers, so the
/// quadratic worst case (every packet to a different peer) stays small at the
/// engine's batch bound.
pub fn group_stable<K: PartialEq>(keys: &[Option<K>], order: &mut Vec<usize>) {
    order.clear();
    for (i, k) in keys.iter().enumerate() {
        let Some(k) = k else { continue };
        // Only the first occurrence of a key starts (and fills) its group.
        if keys[..i].iter().any(|e| e.as_ref() == Some(k)) {
            continue;
        }
        order.extend(
            keys.iter()
                .enumerate()
                .skip(i)
                .filter(|(_, e)| e.as_ref() == Some(k))
                .map(|(j, _)| j),
        );
    }
}

/// Plans the messages for datagrams queued back to back (`tos[i]`, `lens[i]`
/// in send order): consecutive datagrams to one endpoint form GSO runs within
/// the kernel's limits ([`offload::gso_runs`]) when `gso` is on; every other
/// datagram is a message of its own. Messages keep the queue order.
pub fn plan<E: Copy + PartialEq>(tos: &[E], lens: &[usize], gso: bool, msgs: &mut Vec<Msg<E>>) {
    msgs.clear();
    let n = tos.len().min(lens.len());
    let mut off = 0;
    let mut i = 0;
    while i < n {
        let to = tos[i];
        let mut j = i + 1;
        while j < n && tos[j] == to {
            j += 1;
        }
        let run = &lens[i..j];
        if gso {
            offload::gso_runs(run, |first, count, seg| {
                let len: usize = run[first..first + count].iter().sum();
                match u16::try_from(seg) {
                    Ok(seg) if count > 1 => msgs.push(Msg {
                        to,
                        off,
                        len,
                        count,
                        seg: Some(seg),
                    }),
                    // One datagram, or a size no UDP_SEGMENT can express
                    // (cannot happen below 64 KiB): one message each.
                    _ => {
                        let mut o = off;
                        for &l in &run[first..first + count] {
                            msgs.push(Msg {
                                to,
                                off: o,
                                len: l,
                                count: 1,
                                seg: None,
                            });
                            o += l;
                        }
                    }
                }
                off += len;
            });
        } else {
            for &l in run {
                msgs.push(Msg {
                    to,
                    off,
                    len: l,
                    count: 1,
                    seg: None,
                });
                off += l;
            }
        }
        i = j;
    }
}

/// Encrypted datagrams of one wakeup waiting to be sent, and the scratch the
/// tun->udp thread reuses between wakeups.
pub struct TxQueue {
    /// Encrypted datagrams, back to back.
    pub out: Vec<u8>,
    pub used: usize,
    pub tos: Vec<SocketAddr>,
    pub lens: Vec<usize>,
    pub msgs: Vec<Msg<SocketAddr>>,
    /// Per packet read: the peer id it routes to (`None`: dropped).
    pub keys: Vec<Option<u32>>,
    /// Packet indices grouped by peer ([`group_stable`]).
    pub order: Vec<usize>,
    pub mmsg: SendMmsg,
}

impl TxQueue {
    pub fn new(out_bytes: usize, packets: usize) -> TxQueue {
        TxQueue {
            out: vec![0; out_bytes],
            used: 0,
            tos: Vec::with_capacity(packets),
            lens: Vec::with_capacity(packets),
            msgs: Vec::with_capacity(packets),
            keys: Vec::with_capacity(packets),
            order: Vec::with_capacity(packets),
            mmsg: SendMmsg::new(),
        }
    }

    /// Free room for the next encrypted datagram.
    pub fn room(&self) -> usize {
        self.out.len() - self.used
    }

    /// Where the next datagram is encrypted to.
    pub fn tail(&mut self) -> &mut [u8] {
        &mut self.out[self.used..]
    }

    /// Keeps the `len` bytes just written at [`TxQueue::tail`] for `to`.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        self.tos.push(to);
        self.lens.push(len);
        self.used += len;
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    pub fn clear(&mut self) {
        self.tos.clear();
        self.lens.clear();
        self.msgs.clear();
        self.used = 0;
    }
}

/// Preallocated `sendmmsg` arguments (up to [`MAX_MSGS`]).
pub struct SendMmsg {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<socket2::SockAddr>,
    cmsgs: Vec<CmsgBuf>,
}

impl Default for SendMmsg {
    fn default() -> Self {
        Self::new()
    }
}

/// `n` all-zero values.
///
/// # Safety
/// All-zero bytes must be a valid `T` (a plain C struct of integers and raw
/// pointers, like `mmsghdr`).
unsafe fn zeroed<T>(n: usize) -> Vec<T> {
    // SAFETY: the caller guarantees that all-zero is a valid `T`.
    (0..n)
        .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
        .collect()
}

impl SendMmsg {
    pub fn new() -> SendMmsg {
        SendMmsg {
            // SAFETY: mmsghdr/iovec are plain C structs of integers and raw
            // pointers; all-zero is a valid (empty) value of each.
            hdrs: unsafe { zeroed(MAX_MSGS) },
            // SAFETY: as above.
            iovs: unsafe { zeroed(MAX_MSGS) },
            names: Vec::with_capacity(MAX_MSGS),
            cmsgs: (0..MAX_MSGS).map(|_| CmsgBuf::new()).collect(),
        }
    }

    /// Sends `msgs` (at most [`MAX_MSGS`]; the rest is ignored), whose bytes
    /// are in `data`, with one `sendmmsg`. `wire` maps an endpoint to the
    /// socket's address family. `Ok(k)`: the first `k` messages went
    /// (`k >= 1`); an error concerns `msgs[0]` (the kernel reports a later
    /// message's error only when it is the first of a call, so the caller
    /// resumes at `msgs[k]` and learns it then).
    pub fn send(
        &mut self,
        fd: RawFd,
        data: &[u8],
        msgs: &[Msg<SocketAddr>],
        wire: impl Fn(SocketAddr) -> SocketAddr,
    ) -> io::Result<usize> {
        let n = msgs.len().min(MAX_MSGS);
        if n == 0 {
            return Ok(0);
        }
        self.names.clear();
        for m in &msgs[..n] {
            if m.off + m.len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "message outside the send buffer",
                ));
            }
            self.names.push(socket2::SockAddr::from(wire(m.to)));
        }
        for (i, m) in msgs[..n].iter().enumerate() {
            self.iovs[i] = libc::iovec {
                iov_base: data[m.off..].as_ptr() as *mut libc::c_void,
                iov_len: m.len,
            };
            let h = &mut self.hdrs[i];
            // SAFETY: as in `new`: a zeroed msghdr is "no name, no iov, no control".
            h.msg_hdr = unsafe { MaybeUninit::zeroed().assume_init() };
            h.msg_len = 0;
            h.msg_hdr.msg_name = self.names[i].as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = self.names[i].len();
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if let Some(seg) = m.seg.filter(|_| m.count > 1) {
                offload::set_segment_cmsg(&mut h.msg_hdr, &mut self.cmsgs[i], seg);
            }
        }
        // SAFETY: `hdrs[..n]` are initialised above and every pointer in them
        // (names, iovecs into `data`, control buffers) refers to memory that
        // lives until the call returns; the kernel only reads it (sendmmsg(2)).
        let rc = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

/// Preallocated `recvmmsg` buffers: [`RX_MSGS`] messages of up to 64 KiB
/// (one allocation; its pages are only touched as deep as data lands).
pub struct RecvMmsg {
    buf: Vec<u8>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<CmsgBuf>,
    /// Messages filled by the last [`RecvMmsg::recv`].
    filled: usize,
}

impl Default for RecvMmsg {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvMmsg {
    pub fn new() -> RecvMmsg {
        RecvMmsg {
            buf: vec![0; RX_MSGS * RX_BUF],
            // SAFETY: plain C structs; all-zero is valid for each.
            hdrs: unsafe { zeroed(RX_MSGS) },
            // SAFETY: as above.
            iovs: unsafe { zeroed(RX_MSGS) },
            // SAFETY: as above.
            names: unsafe { zeroed(RX_MSGS) },
            cmsgs: (0..RX_MSGS).map(|_| CmsgBuf::new()).collect(),
            filled: 0,
        }
    }

    /// One `recvmmsg` with `MSG_WAITFORONE`: with `wait`, waits (up to the
    /// socket's `SO_RCVTIMEO`) for the first message, without it fails with
    /// `WouldBlock` when none is queued; then takes only what is already
    /// queued. Returns how many messages [`RecvMmsg::message`] can read.
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        self.filled = 0;
        for (i, chunk) in self.buf.chunks_mut(RX_BUF).enumerate().take(RX_MSGS) {
            self.iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let h = &mut self.hdrs[i];
            // SAFETY: a zeroed msghdr is a valid empty value.
            h.msg_hdr = unsafe { MaybeUninit::zeroed().assume_init() };
            h.msg_len = 0;
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr();
            h.msg_hdr.msg_controllen = CmsgBuf::LEN as _;
        }
        // SAFETY: every header points at live, writable buffers of the stated
        // sizes owned by `self` for the duration of the call; a null timeout
        // is allowed (recvmmsg(2); its timeout is unreliable, SO_RCVTIMEO bounds
        // a waiting receive instead).
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                RX_MSGS as libc::c_uint,
                libc::MSG_WAITFORONE | if wait { 0 } else { libc::MSG_DONTWAIT },
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.filled = (rc as usize).min(RX_MSGS);
        Ok(self.filled)
    }

    /// Message `i` of the last receive: its bytes, sender and (with `UDP_GRO`)
    /// the size of the datagrams glued in it. `None` past the last message or
    /// for a sender that is not an IP address.
    pub fn message(&self, i: usize) -> Option<(&[u8], SocketAddr, Option<u16>)> {
        if i >= self.filled {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(RX_BUF);
        let data = &self.buf[i * RX_BUF..i * RX_BUF + len];
        let namelen = h.msg_hdr.msg_namelen;
        // SAFETY: the kernel filled `names[i]` with `namelen` bytes of a
        // sockaddr (bounded by the storage size we passed).
        let addr = unsafe { socket2::SockAddr::new(self.names[i], namelen) };
        let from = addr.as_socket()?;
        let seg = offload::gro_segment(&h.msg_hdr);
        Some((data, from, seg))
    }
}

#[cfg(test)]
mod tests {
    use super::super::lpm::tests::XorShift;
    use super::*;

    /// Reference grouping: a map from key to its indices, keys in first-seen order.
    fn reference_groups(keys: &[Option<u8>]) -> Vec<usize> {
        let mut groups: Vec<(u8, Vec<usize>)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let Some(k) = k else { continue };
            match groups.iter_mut().find(|(g, _)| g == k) {
                Some((_, v)) => v.push(i),
                None => groups.push((*k, vec![i])),
            }
        }
        groups.into_iter().flat_map(|(_, v)| v).collect()
    }

    #[test]
    fn grouping_matches_the_reference_and_keeps_each_peers_order() {
        let mut rng = XorShift(0x5eed_0003);
        let mut order = Vec::new();
        for round in 0..2000 {
            let n = (rng.next() % 200) as usize;
            let peers = 1 + rng.next() % 6;
            let keys: Vec<Option<u8>> = (0..n)
                .map(|_| {
                    let r = rng.next();
                    (!r.is_multiple_of(10)).then_some(((r >> 8) % peers) as u8)
                })
                .collect();
            group_stable(&keys, &mut order);
            assert_eq!(order, reference_groups(&keys), "round {round}");
            // The property the engine relies on: per key, indices ascend.
            for k in 0..peers as u8 {
                let idx: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|&i| keys[i] == Some(k))
                    .collect();
                assert!(idx.windows(2).all(|w| w[0] < w[1]), "round {round}");
            }
        }
    }

    /// Expands planned messages back into (endpoint, datagram bytes), as the
    /// kernel does with a UDP_SEGMENT message.
    fn expand(data: &[u8], msgs: &[Msg<u8>]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        for m in msgs {
            let bytes = &data[m.off..m.off + m.len];
            match m.seg {
                Some(s) => {
                    let parts: Vec<&[u8]> = bytes.chunks(usize::from(s)).collect();
                    assert_eq!(parts.len(), m.count);
                    out.extend(parts.into_iter().map(|p| (m.to, p.to_vec())));
                }
                None => {
                    assert_eq!(m.count, 1);
                    out.push((m.to, bytes.to_vec()));
                }
            }
        }
        out
    }

    #[test]
    fn plan_sends_exactly_the_queue_in_order_within_kernel_limits() {
        let mut rng = XorShift(0x5eed_0004);
        let mut msgs = Vec::new();
        for round in 0..2000 {
            let n = (rng.next() % 150) as usize;
            let endpoints = 1 + rng.next() % 3;
            let mut tos = Vec::new();
            let mut lens = Vec::new();
            let mut to = 0u8;
            for _ in 0..n {
                // Mostly runs to one endpoint with TCP-like sizes, sometimes a
                // switch, an odd size or a large jumbo datagram.
                if rng.next().is_multiple_of(8) {
                    to = (rng.next() % endpoints) as u8;
                }
                let r = rng.next() % 16;
                let len = match r {
                    0 => 1 + (rng.next() % 1500) as usize,
                    1 => 9000,
                    2 => 60,
                    _ => 1452,
                };
                tos.push(to);
                lens.push(len);
            }
            let data: Vec<u8> = (0..lens.iter().sum::<usize>())
                .map(|_| rng.next() as u8)
                .collect();
            let mut want = Vec::new();
            let mut off = 0;
            for (t, l) in tos.iter().zip(&lens) {
                want.push((*t, data[off..off + l].to_vec()));
                off += l;
            }
            for gso in [true, false] {
                plan(&tos, &lens, gso, &mut msgs);
                assert_eq!(expand(&data, &msgs), want, "round {round} gso={gso}");
                let mut next_off = 0;
                for m in &msgs {
                    assert_eq!(m.off, next_off, "round {round}: messages are contiguous");
                    next_off += m.len;
                    assert!((1..=offload::UDP_MAX_SEGMENTS).contains(&m.count));
                    if m.count > 1 {
                        assert!(gso);
                        assert!(m.len <= offload::UDP_GSO_MAX_BYTES);
                    }
                }
                if !gso {
                    assert_eq!(msgs.len(), n);
                }
            }
        }
    }

    #[test]
    fn plan_coalesces_a_burst_of_equal_datagrams() {
        // 64 small UDP packets read in one wakeup: one GSO message, not 64 sends.
        let mut msgs = Vec::new();
        plan(&[7u8; 64], &[124; 64], true, &mut msgs);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].count, msgs[0].seg), (64, Some(124)));
        // Two endpoints interleaved in runs: one message per run.
        let tos = [1u8, 1, 1, 2, 2, 1, 1];
        plan(&tos, &[100; 7], true, &mut msgs);
        let counts: Vec<(u8, usize)> = msgs.iter().map(|m| (m.to, m.count)).collect();
        assert_eq!(counts, vec![(1, 3), (2, 2), (1, 2)]);
    }

    #[test]
    fn sendmmsg_and_recvmmsg_round_trip_on_loopback() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let gro = offload::enable_udp_gro(rx.as_raw_fd()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        // Three runs: 10 x 1000 + 300 (GSO), one 77-byte datagram, 5 x 200 (GSO).
        let mut lens = vec![1000; 10];
        lens.push(300);
        lens.push(77);
        lens.extend([200; 5]);
        let tos = vec![to; lens.len()];
        let data: Vec<u8> = (0..lens.iter().sum::<usize>())
            .map(|i| (i % 251) as u8)
            .collect();
        let mut msgs = Vec::new();
        plan(&tos, &lens, true, &mut msgs);
        assert_eq!(msgs.len(), 3);
        let mut mmsg = SendMmsg::new();
        let sent = mmsg.send(tx.as_raw_fd(), &data, &msgs, |a| a).unwrap();
        assert_eq!(sent, 3);

        let mut r = RecvMmsg::new();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while got.len() < data.len() {
            let n = r.recv(rx.as_raw_fd(), true).unwrap();
            assert!(n >= 1);
            for i in 0..n {
                let (bytes, from, seg) = r.message(i).unwrap();
                assert_eq!(from, tx.local_addr().unwrap());
                for d in offload::datagrams(bytes, seg) {
                    sizes.push(d.len());
                    got.extend_from_slice(d);
                }
            }
            assert!(r.message(n).is_none());
        }
        assert_eq!(got, data);
        assert_eq!(sizes, lens, "gro={gro}: datagram boundaries survive");
    }

    #[test]
    fn a_message_outside_the_buffer_is_refused() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = tx.local_addr().unwrap();
        let bad = [Msg {
            to,
            off: 10,
            len: 100,
            count: 1,
            seg: None,
        }];
        let mut mmsg = SendMmsg::new();
        let e = mmsg.send(tx.as_raw_fd(), &[0u8; 50], &bad, |a| a);
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
