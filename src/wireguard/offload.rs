//! Segmentation offloads for the engine's two sides.
//!
//! **TUN** (`IFF_VNET_HDR` + `TUNSETOFFLOAD` CSUM|TSO4|TSO6): the kernel hands
//! us TCP super-packets of up to 64 KiB with a virtio-net header instead of
//! segmenting them first, and accepts coalesced super-packets back. tun-rs
//! implements the split (`gso_split`, a port of wireguard-go's
//! `tun/offload_linux.go`) and the coalescing (`handle_gro`, the kernel's TCP
//! GRO rules: same flow, adjacent sequence numbers, equal segment size with a
//! shorter last one, no flags but ACK/PSH); the tests below hold both to a
//! simple reference of our own.
//!
//! **UDP** (udp(7)): `UDP_SEGMENT` lets one `sendmsg` carry every encrypted
//! segment of a super-packet as equal-sized datagrams that the kernel splits
//! (once, late, in the stack); `UDP_GRO` lets one `recvmsg` return a run of
//! datagrams from one sender glued together, with their size in a cmsg.
//! Either may be refused (old kernel, a device without checksum offload): the
//! engine then falls back to one datagram per syscall and says so once.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// `UDP_SEGMENT` and `UDP_GRO` from `<linux/udp.h>` (Linux 4.18 / 5.0).
pub const UDP_SEGMENT: i32 = 103;
pub const UDP_GRO: i32 = 104;
/// The kernel's cap on segments per GSO send (`UDP_MAX_SEGMENTS`, 64 before Linux 6.9).
pub const UDP_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload one GSO send may carry: the whole datagram, headers
/// included, must fit the 16-bit IP length field (IPv6 header 40 + UDP 8).
pub const UDP_GSO_MAX_BYTES: usize = 65_535 - 48;

/// Errors of the offload layer (only configuration; data errors are `io::Error`s
/// the engine counts).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot enable {option} on the WireGuard UDP socket: {source}")]
    SocketOption {
        option: &'static str,
        source: io::Error,
    },
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`). `Ok(false)` if
/// this kernel does not know the option.
pub fn enable_udp_gro(fd: RawFd) -> Result<bool, Error> {
    let one: i32 = 1;
    // SAFETY: `fd` is an open socket for the duration of the call; the value
    // is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(false),
        _ => Err(Error::SocketOption {
            option: "UDP_GRO",
            source: e,
        }),
    }
}

/// Room for one `UDP_SEGMENT`/`UDP_GRO` cmsg (an int or a u16) on any ABI.
const CMSG_BUF: usize = 64;

/// `cmsghdr`-aligned storage for control messages.
#[repr(C, align(8))]
pub(super) struct CmsgBuf([u8; CMSG_BUF]);

impl CmsgBuf {
    pub(super) const LEN: usize = CMSG_BUF;

    pub(super) fn new() -> CmsgBuf {
        CmsgBuf([0; CMSG_BUF])
    }

    pub(super) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// Points `msg`'s control data at `cbuf`, holding one `UDP_SEGMENT` cmsg
/// with segment size `seg`: the kernel splits the message's payload into
/// datagrams of `seg` bytes (udp(7)).
pub(super) fn set_segment_cmsg(msg: &mut libc::msghdr, cbuf: &mut CmsgBuf, seg: u16) {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= CMSG_BUF);
    cbuf.0 = [0; CMSG_BUF];
    msg.msg_control = cbuf.as_mut_ptr();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes of 8-aligned zeroed storage
    // that the caller keeps alive until sendmsg returns, so CMSG_FIRSTHDR is
    // non-null and the header plus a u16 of data fit (cmsg(3)).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
}

/// The `UDP_GRO` segment size in the control data the kernel filled in
/// `msg` after a receive (`None`: a single datagram).
pub(super) fn gro_segment(msg: &libc::msghdr) -> Option<u16> {
    let mut seg = None;
    // SAFETY: walking the control buffer the kernel filled, with the cmsg(3)
    // macros, which bound every step by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                // The kernel writes the segment size as an int (udp_cmsg_recv).
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                seg = u16::try_from(v).ok().filter(|&s| s > 0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    seg
}

/// Sends `data` to `to` in one `sendmsg`; with `segment = Some(n)` the kernel
/// splits it into datagrams of `n` bytes (the last may be shorter).
pub fn send(fd: RawFd, data: &[u8], segment: Option<u16>, to: SocketAddr) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf::new();
    // SAFETY: a zeroed msghdr is a valid "no name, no iov, no control" value.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(seg) = segment {
        set_segment_cmsg(&mut msg, &mut cbuf, seg);
    }
    // SAFETY: every pointer in `msg` (name, iov, data, control) refers to
    // memory that outlives the call; the kernel only reads it.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recvmsg`: the byte count, the sender, and (with `UDP_GRO`) the size
/// of the glued datagrams (`None`: a single datagram).
pub fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> io::Result<(usize, SocketAddr, Option<u16>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut cbuf = CmsgBuf::new();
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr();
    msg.msg_controllen = CMSG_BUF as _;
    // SAFETY: all pointers in `msg` refer to live, writable buffers of the
    // stated sizes for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `storage` with msg_namelen bytes of a sockaddr.
    let addr = unsafe { socket2::SockAddr::new(storage, msg.msg_namelen) };
    let from = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    Ok((n as usize, from, gro_segment(&msg)))
}

/// The datagrams of a received buffer: `seg`-sized pieces (the last may be
/// shorter), or the whole buffer without GRO.
pub fn datagrams(data: &[u8], seg: Option<u16>) -> std::slice::Chunks<'_, u8> {
    let size = seg.map_or(data.len(), usize::from).max(1);
    data.chunks(size)
}

/// Plans GSO sends over `lens` (encrypted datagram sizes in send order, all to
/// one endpoint): each run is `(first, count, segment)` of consecutive
/// datagrams the kernel can split itself, i.e. equal sizes except a shorter
/// last one, at most [`UDP_MAX_SEGMENTS`] and [`UDP_GSO_MAX_BYTES`] in total.
pub fn gso_runs(lens: &[usize], mut f: impl FnMut(usize, usize, usize)) {
    let mut i = 0;
    while i < lens.len() {
        let seg = lens[i];
        let mut total = seg;
        let mut j = i + 1;
        while j < lens.len()
            && j - i < UDP_MAX_SEGMENTS
            && lens[j] <= seg
            && total + lens[j] <= UDP_GSO_MAX_BYTES
        {
            total += lens[j];
            j += 1;
            if lens[j - 1] < seg {
                break;
            }
        }
        f(i, j - i, seg);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::super::lpm::tests::XorShift;
    use super::*;
    use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6};

    const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const ACK: u8 = 0x10;

    /// RFC 1071 ones'-complement sum, folded, not inverted.
    fn sum(data: &[u8], mut acc: u32) -> u32 {
        let mut it = data.chunks_exact(2);
        for w in &mut it {
            acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = it.remainder() {
            acc += u32::from(*b) << 8;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc
    }

    fn pseudo(p: &[u8], v6: bool, l4_len: usize) -> u32 {
        let mut acc = 0u32;
        if v6 {
            acc = sum(&p[8..40], acc);
        } else {
            acc = sum(&p[12..20], acc);
        }
        acc += 6;
        acc += l4_len as u32;
        acc
    }

    fn iph(v6: bool) -> usize {
        if v6 {
            40
        } else {
            20
        }
    }

    /// Checks the IPv4 header checksum and the TCP checksum of a plain packet.
    fn checksums_ok(p: &[u8], v6: bool) -> bool {
        let ih = iph(v6);
        let ip_ok = v6 || sum(&p[..20], 0) == 0xffff;
        let l4 = &p[ih..];
        ip_ok && sum(l4, pseudo(p, v6, l4.len())) == 0xffff
    }

    /// A flow's endpoints and our reference packet builder.
    #[derive(Clone, Copy)]
    struct Flow {
        v6: bool,
        src: u8,
        sport: u16,
    }

    /// Reference: one complete TCP segment with correct lengths and checksums.
    fn segment(f: Flow, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let ih = iph(f.v6);
        let mut p = vec![0u8; ih + 20 + payload.len()];
        if f.v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, f.src]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        } else {
            p[0] = 0x45;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 244, 1, f.src]);
            p[16..20].copy_from_slice(&[10, 244, 2, 9]);
            let c = !(sum(&p[..20], 0) as u16);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ih;
        p[t..t + 2].copy_from_slice(&f.sport.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p[t + 20..].copy_from_slice(payload);
        let l4 = p.len() - ih;
        let c = !(sum(&p[ih..], pseudo(&p, f.v6, l4)) as u16);
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// What the kernel hands a TSO-enabled TUN: the headers of the first
    /// segment with lengths for the whole payload, a partial (pseudo-header)
    /// checksum and a virtio header with the segment size.
    fn super_packet(f: Flow, id: u16, seq: u32, flags: u8, payload: &[u8], mss: u16) -> Vec<u8> {
        let ih = iph(f.v6);
        let mut p = segment(f, id, seq, flags, payload);
        let l4 = p.len() - ih;
        let partial = pseudo(&p, f.v6, l4);
        let partial = sum(&[], partial) as u16;
        p[ih + 16..ih + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: 1, // NEEDS_CSUM
            gso_type: if f.v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            },
            hdr_len: (ih + 20) as u16,
            gso_size: mss,
            csum_start: ih as u16,
            csum_offset: 16,
        };
        let mut out = vec![0u8; HDR];
        hdr.encode(&mut out).unwrap();
        out.extend_from_slice(&p);
        out
    }

    /// Reference segmentation (RFC 9293 + the kernel's tcp_gso_segment): each
    /// segment carries `mss` bytes of payload, seq advances by the payload,
    /// the IPv4 id by one, FIN/PSH only on the last segment.
    fn reference_split(
        f: Flow,
        id: u16,
        seq: u32,
        flags: u8,
        payload: &[u8],
        mss: usize,
    ) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = payload.chunks(mss).collect();
        let n = chunks.len();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let fl = if i + 1 == n {
                    flags
                } else {
                    flags & !(FIN | PSH)
                };
                segment(
                    f,
                    id.wrapping_add(i as u16),
                    seq.wrapping_add((i * mss) as u32),
                    fl,
                    c,
                )
            })
            .collect()
    }

    fn random_payload(rng: &mut XorShift, len: usize) -> Vec<u8> {
        (0..len).map(|_| rng.next() as u8).collect()
    }

    #[test]
    fn gso_split_matches_the_reference() {
        let mut rng = XorShift(0x5eed_0001);
        for round in 0..300 {
            let f = Flow {
                v6: round % 3 == 0,
                src: (rng.next() % 200) as u8 + 1,
                sport: (rng.next() % 60000) as u16 + 1024,
            };
            let mss = 500 + (rng.next() % 1000) as usize;
            let len = 1 + (rng.next() % 60_000) as usize;
            let payload = random_payload(&mut rng, len);
            let seq = rng.next() as u32;
            let id = rng.next() as u16;
            let flags = ACK | if rng.next().is_multiple_of(2) { PSH } else { 0 };
            let mut sp = super_packet(f, id, seq, flags, &payload, mss as u16);
            let hdr = VirtioNetHdr::decode(&sp[..HDR]).unwrap();
            let mut bufs = vec![vec![0u8; 2048]; 128];
            let mut sizes = vec![0usize; 128];
            let n = tun_rs::gso_split(&mut sp[HDR..], hdr, &mut bufs, &mut sizes, 0, f.v6).unwrap();
            let want = reference_split(f, id, seq, flags, &payload, mss);
            assert_eq!(n, want.len(), "round {round}: segment count");
            for (i, w) in want.iter().enumerate() {
                let got = &bufs[i][..sizes[i]];
                assert!(
                    checksums_ok(got, f.v6),
                    "round {round} segment {i}: checksum"
                );
                assert_eq!(
                    got,
                    &w[..],
                    "round {round} segment {i} differs from the reference"
                );
            }
        }
    }

    #[test]
    fn gso_split_refuses_bad_headers_without_panicking() {
        let f = Flow {
            v6: false,
            src: 1,
            sport: 1000,
        };
        let mut rng = XorShift(7);
        let payload = random_payload(&mut rng, 5000);
        let good = super_packet(f, 1, 1, ACK, &payload, 1000);
        let mut bufs = vec![vec![0u8; 2048]; 8];
        let mut sizes = vec![0usize; 8];
        for _ in 0..2000 {
            let mut sp = good.clone();
            // Corrupt a few header bytes (virtio or IP/TCP).
            for _ in 0..3 {
                let at = (rng.next() % 80) as usize;
                sp[at] = rng.next() as u8;
            }
            let cut = HDR + (rng.next() as usize % (sp.len() - HDR));
            sp.truncate(cut.max(HDR + 1));
            let Ok(hdr) = VirtioNetHdr::decode(&sp[..HDR]) else {
                continue;
            };
            // Too few output buffers for the segments is an error too.
            let _ = tun_rs::gso_split(&mut sp[HDR..], hdr, &mut bufs, &mut sizes, 0, false);
        }
    }

    /// Reference view of a set of segments: per flow, the sorted list of
    /// (sequence number, TCP flags, payload). GRO may move a retransmitted
    /// segment behind later ones of its flow (as wireguard-go's does), which
    /// TCP does not mind, so order is not compared; content is, exactly.
    type Segs = std::collections::BTreeMap<(u8, u16, bool), Vec<(u32, u8, Vec<u8>)>>;
    fn segments_of(pkts: &[Vec<u8>]) -> Segs {
        let mut m = Segs::new();
        for p in pkts {
            let v6 = p[0] >> 4 == 6;
            let ih = iph(v6);
            let src = if v6 { p[23] } else { p[15] };
            let sport = u16::from_be_bytes([p[ih], p[ih + 1]]);
            let seq = u32::from_be_bytes([p[ih + 4], p[ih + 5], p[ih + 6], p[ih + 7]]);
            let doff = usize::from(p[ih + 12] >> 4) * 4;
            m.entry((src, sport, v6))
                .or_default()
                .push((seq, p[ih + 13], p[ih + doff..].to_vec()));
        }
        for v in m.values_mut() {
            v.sort();
        }
        m
    }

    /// Runs tun-rs's GRO over `input` and returns the packets it would write:
    /// (virtio header, packet). Buffers swallowed by coalescing keep the 0xff
    /// marker we put where the header goes; every written one gets a header.
    fn gro(input: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut bufs: Vec<Vec<u8>> = input
            .iter()
            .map(|p| {
                let mut b = Vec::with_capacity(HDR + 65_536);
                b.resize(HDR, 0xff);
                b.extend_from_slice(p);
                b
            })
            .collect();
        let mut table = tun_rs::GROTable::new();
        table.apply_gro(&mut bufs, HDR, false).unwrap();
        bufs.iter()
            .filter(|b| b[..HDR].iter().any(|&x| x != 0xff))
            .map(|b| (VirtioNetHdr::decode(&b[..HDR]).unwrap(), b[HDR..].to_vec()))
            .collect()
    }

    /// Expands GRO output back into segments, checking every checksum.
    fn resplit(out: &[(VirtioNetHdr, Vec<u8>)], round: usize) -> Vec<Vec<u8>> {
        let mut segs = Vec::new();
        for (hdr, p) in out {
            let v6 = p[0] >> 4 == 6;
            if hdr.gso_type == 0 {
                assert_eq!(
                    hdr.flags, 0,
                    "round {round}: a plain packet needs no checksum help"
                );
                assert!(checksums_ok(p, v6), "round {round}: standalone checksum");
                segs.push(p.clone());
                continue;
            }
            // The kernel's side segments the same way gso_split does.
            let mut sp = p.clone();
            let mut parts = vec![vec![0u8; 2048]; 64];
            let mut sizes = vec![0usize; 64];
            let n = tun_rs::gso_split(&mut sp, *hdr, &mut parts, &mut sizes, 0, v6).unwrap();
            assert!(n >= 2, "round {round}: a GSO packet of one segment");
            for (i, part) in parts.iter().take(n).enumerate() {
                assert!(
                    checksums_ok(&part[..sizes[i]], v6),
                    "round {round}: resplit checksum"
                );
                segs.push(part[..sizes[i]].to_vec());
            }
        }
        segs
    }

    #[test]
    fn gro_coalesces_an_in_order_run_into_one_packet() {
        let mut rng = XorShift(11);
        for v6 in [false, true] {
            let f = Flow {
                v6,
                src: 3,
                sport: 40000,
            };
            let input: Vec<Vec<u8>> = (0..40u32)
                .map(|i| {
                    let flags = if i == 39 { ACK | PSH } else { ACK };
                    segment(
                        f,
                        i as u16,
                        1000 + i * 1400,
                        flags,
                        &random_payload(&mut rng, 1400),
                    )
                })
                .collect();
            let out = gro(&input);
            assert_eq!(out.len(), 1, "v6={v6}: 40 in-order segments become one");
            assert_eq!(out[0].0.gso_size, 1400);
            assert_eq!(segments_of(&resplit(&out, 0)), segments_of(&input));
        }
    }

    #[test]
    fn gro_coalescing_matches_the_reference() {
        let mut rng = XorShift(0x5eed_0002);
        let (mut total_in, mut total_out) = (0, 0);
        for round in 0..300 {
            // A batch as the UDP side builds it: segments of a few flows,
            // mostly in order, sometimes a retransmission, a PSH, a short segment.
            let nflows = 1 + (rng.next() % 3) as usize;
            let flows: Vec<(Flow, usize)> = (0..nflows)
                .map(|i| {
                    let f = Flow {
                        v6: rng.next().is_multiple_of(2),
                        src: i as u8 + 1,
                        sport: 40000 + i as u16,
                    };
                    (f, 600 + (rng.next() % 800) as usize)
                })
                .collect();
            let mut next: Vec<(u32, u16)> = (0..nflows)
                .map(|_| (rng.next() as u32, rng.next() as u16))
                .collect();
            let count = 1 + (rng.next() % 60) as usize;
            let mut input = Vec::new();
            for _ in 0..count {
                let k = (rng.next() as usize) % nflows;
                let (f, mss) = flows[k];
                let r = rng.next() % 20;
                let len = if r == 0 {
                    1 + (rng.next() as usize % mss)
                } else {
                    mss
                };
                let flags = ACK | if r == 1 { PSH } else { 0 };
                let (seq, id) = next[k];
                let seq = if r == 2 {
                    seq.wrapping_sub(mss as u32)
                } else {
                    seq
                };
                let payload = random_payload(&mut rng, len);
                input.push(segment(f, id, seq, flags, &payload));
                next[k].1 = id.wrapping_add(1);
                if r != 2 {
                    next[k].0 = seq.wrapping_add(len as u32);
                }
            }
            let out = gro(&input);
            assert!(out.len() <= input.len());
            let segs = resplit(&out, round);
            assert_eq!(segs.len(), input.len(), "round {round}: segment count");
            assert_eq!(
                segments_of(&segs),
                segments_of(&input),
                "round {round}: segments differ after coalescing and resplitting"
            );
            total_in += input.len();
            total_out += out.len();
        }
        // Mostly in-order traffic must actually coalesce.
        assert!(
            total_out * 3 < total_in,
            "{total_out} packets written for {total_in}"
        );
    }

    #[test]
    fn gso_runs_respect_kernel_limits() {
        let mut rng = XorShift(3);
        for _ in 0..1000 {
            let n = (rng.next() % 100) as usize;
            let lens: Vec<usize> = (0..n)
                .map(|_| {
                    if rng.next().is_multiple_of(4) {
                        1 + (rng.next() % 1500) as usize
                    } else {
                        1452
                    }
                })
                .collect();
            let mut covered = 0;
            gso_runs(&lens, |first, count, seg| {
                assert_eq!(first, covered);
                assert!((1..=UDP_MAX_SEGMENTS).contains(&count));
                let run = &lens[first..first + count];
                assert_eq!(run[0], seg);
                assert!(run[..count - 1].iter().all(|&l| l == seg));
                assert!(run[count - 1] <= seg);
                assert!(count == 1 || run.iter().sum::<usize>() <= UDP_GSO_MAX_BYTES);
                covered += count;
            });
            assert_eq!(covered, lens.len());
        }
    }

    #[test]
    fn udp_gso_and_gro_round_trip_on_loopback() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let gro = enable_udp_gro(rx.as_raw_fd()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let data: Vec<u8> = (0..10 * 1000 + 300).map(|i| (i % 251) as u8).collect();
        let to = rx.local_addr().unwrap();
        let sent = send(tx.as_raw_fd(), &data, Some(1000), to).unwrap();
        assert_eq!(sent, data.len());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        let mut sizes = Vec::new();
        while got.len() < data.len() {
            let (n, from, seg) = recv(rx.as_raw_fd(), &mut buf, 0).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            for d in datagrams(&buf[..n], seg) {
                sizes.push(d.len());
                got.extend_from_slice(d);
            }
        }
        assert_eq!(got, data);
        // Eleven datagrams of 1000 bytes and a 300-byte tail, however they were glued.
        assert_eq!(sizes.len(), 11, "gro={gro}");
        assert!(sizes[..10].iter().all(|&s| s == 1000));
        assert_eq!(sizes[10], 300);
    }
}
