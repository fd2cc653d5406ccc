//! Pure packet logic: inner IP header fields, the cryptokey-routing check on
//! receive, and demultiplexing of WireGuard datagrams to peers.
//!
//! Nothing here touches sockets or locks, so it is unit-tested directly,
//! including with random bytes.

use super::lpm::LpmTable;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Destination address of an IPv4/IPv6 packet read from the TUN device.
pub fn dst_addr(packet: &[u8]) -> Option<IpAddr> {
    addr_at(packet, 16, 24)
}

/// Source address of a decrypted IPv4/IPv6 packet.
pub fn src_addr(packet: &[u8]) -> Option<IpAddr> {
    addr_at(packet, 12, 8)
}

fn addr_at(packet: &[u8], v4_off: usize, v6_off: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(v4_off..v4_off + 4)?.try_into().ok()?;
            // A v4 header is at least 20 bytes; a shorter "packet" is not IP.
            (packet.len() >= 20).then_some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(v6_off..v6_off + 16)?.try_into().ok()?;
            (packet.len() >= 40).then_some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Why a decrypted packet was refused by cryptokey routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptokeyVerdict {
    /// The source lies in the sending peer's AllowedIPs: deliver.
    Allow,
    /// The source belongs to another peer, or to none: drop.
    WrongSource,
}

/// Cryptokey routing on receive (WireGuard paper §2 and `allowedips_lookup_src`
/// in the kernel module): a packet authenticated as coming from `sender` is only
/// accepted if the longest AllowedIPs prefix containing its inner source address
/// belongs to `sender`. This is what lets the datapath map "source IP ->
/// identity" safely on the receiving node: a peer cannot speak for addresses it
/// was not given.
pub fn cryptokey_check<K: PartialEq>(
    routes: &LpmTable<K>,
    sender: &K,
    source: IpAddr,
) -> CryptokeyVerdict {
    match routes.lookup(source) {
        Some(owner) if owner == sender => CryptokeyVerdict::Allow,
        _ => CryptokeyVerdict::WrongSource,
    }
}

/// To which peer an incoming datagram belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demux {
    /// A handshake initiation whose encrypted static key decrypted to this
    /// public key (it still has to be verified by the peer's `Tunn`).
    Initiation { peer_public: [u8; 32] },
    /// A response, cookie reply or data message for our local peer index.
    Index { peer_index: u32 },
}

/// The 24-bit peer index our side put in the upper bits of a receiver index.
///
/// `Tunn::new(.., index, ..)` seeds its handshake with `index << 8` and each new
/// session increments only the low byte (`Handshake::inc_index` in boringtun
/// 0.7.1), so every receiver index the peer echoes back is
/// `(peer_index << 8) | session_counter`.
pub fn peer_index_of(receiver_index: u32) -> u32 {
    receiver_index >> 8
}

/// Largest peer index usable with boringtun's `index << 8` scheme.
pub const MAX_PEER_INDEX: u32 = (1 << 24) - 1;

/// Routes a parsed (and MAC-verified) datagram to a peer. Initiations carry no
/// receiver index, so we decrypt the initiator's static key with our own
/// static key (Noise IK first message) to learn who it claims to be.
pub fn demux(
    packet: &Packet<'_>,
    our_secret: &StaticSecret,
    our_public: &PublicKey,
) -> Result<Demux, WireGuardError> {
    Ok(match packet {
        Packet::HandshakeInit(init) => {
            let half = parse_handshake_anon(our_secret, our_public, init)?;
            Demux::Initiation {
                peer_public: half.peer_static_public,
            }
        }
        _ => demux_index(packet)?,
    })
}

/// Routes a response, cookie reply or data message by the receiver index we
/// chose; initiations carry none (use [`demux`]) and are refused here.
pub fn demux_index(packet: &Packet<'_>) -> Result<Demux, WireGuardError> {
    let receiver = match packet {
        Packet::HandshakeInit(_) => return Err(WireGuardError::InvalidPacket),
        Packet::HandshakeResponse(r) => r.receiver_idx,
        Packet::PacketCookieReply(c) => c.receiver_idx,
        Packet::PacketData(d) => d.receiver_idx,
    };
    Ok(Demux::Index {
        peer_index: peer_index_of(receiver),
    })
}

/// Parses and demuxes raw bytes (no MAC or rate-limit check): used by tests and
/// as the single entry point that must never panic on garbage.
pub fn demux_bytes(
    datagram: &[u8],
    our_secret: &StaticSecret,
    our_public: &PublicKey,
) -> Result<Demux, WireGuardError> {
    let packet = Tunn::parse_incoming_packet(datagram)?;
    demux(&packet, our_secret, our_public)
}

#[cfg(test)]
mod tests {
    use super::super::lpm::tests::XorShift;
    use super::*;
    use boringtun::noise::TunnResult;

    fn key(seed: u8) -> StaticSecret {
        StaticSecret::from([seed; 32])
    }

    fn v4_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn header_fields() {
        let p = v4_packet([10, 244, 1, 2], [10, 244, 2, 3]);
        assert_eq!(src_addr(&p), Some("10.244.1.2".parse().unwrap()));
        assert_eq!(dst_addr(&p), Some("10.244.2.3".parse().unwrap()));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(src_addr(&v6), Some("fd00::1".parse().unwrap()));
        assert_eq!(dst_addr(&v6), Some("fd00::2".parse().unwrap()));
        assert_eq!(dst_addr(&[]), None);
        assert_eq!(dst_addr(&p[..19]), None);
        assert_eq!(dst_addr(&v6[..39]), None);
        assert_eq!(dst_addr(&[0x55; 60]), None);
    }

    #[test]
    fn cryptokey_routing() {
        let mut routes = LpmTable::new();
        routes.insert("10.244.1.0/24".parse().unwrap(), 1u32);
        routes.insert("10.244.2.0/24".parse().unwrap(), 2u32);
        routes.insert("10.244.2.128/25".parse().unwrap(), 3u32);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            cryptokey_check(&routes, &1, ip("10.244.1.9")),
            CryptokeyVerdict::Allow
        );
        // Another peer's range.
        assert_eq!(
            cryptokey_check(&routes, &1, ip("10.244.2.9")),
            CryptokeyVerdict::WrongSource
        );
        // Nobody's range.
        assert_eq!(
            cryptokey_check(&routes, &1, ip("10.244.9.1")),
            CryptokeyVerdict::WrongSource
        );
        // A more specific prefix of peer 3 inside peer 2's /24 belongs to 3 only.
        assert_eq!(
            cryptokey_check(&routes, &2, ip("10.244.2.200")),
            CryptokeyVerdict::WrongSource
        );
        assert_eq!(
            cryptokey_check(&routes, &3, ip("10.244.2.200")),
            CryptokeyVerdict::Allow
        );
        assert_eq!(
            cryptokey_check(&routes, &1, ip("::ffff:10.244.1.9")),
            CryptokeyVerdict::WrongSource
        );
    }

    #[test]
    fn demux_of_each_message_type() {
        let a = key(1);
        let b = key(2);
        let a_pub = PublicKey::from(&a);
        let b_pub = PublicKey::from(&b);
        let mut ta = Tunn::new(a.clone(), b_pub, None, None, 0x12_3456, None);
        let mut tb = Tunn::new(b.clone(), a_pub, None, None, 0x00_0042, None);
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];

        let init = match ta.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected an initiation, got {other:?}"),
        };
        assert_eq!(
            demux_bytes(&init, &b, &b_pub).unwrap(),
            Demux::Initiation {
                peer_public: *a_pub.as_bytes()
            }
        );
        // An initiation not meant for us does not decrypt.
        let c = key(3);
        assert!(demux_bytes(&init, &c, &PublicKey::from(&c)).is_err());
        // Initiations carry no receiver index: the index-only path refuses them.
        let parsed = Tunn::parse_incoming_packet(&init).unwrap();
        assert!(demux_index(&parsed).is_err());

        let resp = match tb.decapsulate(None, &init, &mut buf2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a response, got {other:?}"),
        };
        // The response is addressed to A's index.
        assert_eq!(
            demux_bytes(&resp, &a, &a_pub).unwrap(),
            Demux::Index {
                peer_index: 0x12_3456
            }
        );
        let keepalive = match ta.decapsulate(None, &resp, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a keepalive, got {other:?}"),
        };
        assert_eq!(
            demux_bytes(&keepalive, &b, &b_pub).unwrap(),
            Demux::Index { peer_index: 0x42 }
        );
        let data = match ta.encapsulate(&v4_packet([1, 1, 1, 1], [2, 2, 2, 2]), &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected data, got {other:?}"),
        };
        assert_eq!(
            demux_bytes(&data, &b, &b_pub).unwrap(),
            Demux::Index { peer_index: 0x42 }
        );
        let mut cookie = vec![0u8; 64];
        cookie[0] = 3;
        cookie[4..8].copy_from_slice(&((7u32 << 8) | 3).to_le_bytes());
        assert_eq!(
            demux_bytes(&cookie, &b, &b_pub).unwrap(),
            Demux::Index { peer_index: 7 }
        );
    }

    #[test]
    fn garbage_never_panics() {
        let ours = key(9);
        let ours_pub = PublicKey::from(&ours);
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let sizes = [0usize, 1, 3, 4, 31, 32, 33, 64, 92, 148, 149, 1500];
        let mut accepted = 0;
        for i in 0..5000usize {
            let len = if i.is_multiple_of(2) {
                sizes[i % sizes.len()]
            } else {
                (rng.next() % 2000) as usize
            };
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Make a share of them look like real message types so the deeper
            // parsers (including the anonymous handshake decryption) run.
            if len >= 4 && i.is_multiple_of(3) {
                d[0] = (1 + rng.next() % 4) as u8;
                d[1..4].fill(0);
            }
            if demux_bytes(&d, &ours, &ours_pub).is_ok() {
                accepted += 1;
            }
            let _ = src_addr(&d);
            let _ = dst_addr(&d);
        }
        // Random data messages do demux (by index); random initiations never decrypt.
        assert!(accepted > 0);
    }
}
