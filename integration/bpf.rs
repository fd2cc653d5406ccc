//! eBPF datapath tests (root required).
//!
//! - Program tests: build a packet, run `from_pod` / `to_pod` with
//!   BPF_PROG_TEST_RUN (aya `TestRun`), check the verdict, the mark, the
//!   rewritten bytes and checksums, and the metrics. Note that the kernel
//!   frames every test-run packet of a TC program with an Ethernet header
//!   (net/bpf/test_run.c), so `to_pod` runs its L2 path there; its real TUN
//!   path (no L2 header, `bpf_skb_change_head`) is covered end to end by
//!   `tun_to_pod_and_pod_to_tun_end_to_end` in a network namespace.
//! - Attach tests in network namespaces: `from_pod` filters outlive the
//!   `Datapath` (fail closed) and a new agent replaces them without a gap.
mod harness;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use harness::netns::{require_root, unique_prefix, Netns};
use ipnet::IpNet;
use veil::datapath::maps::{identity_mark, ID_REMOTE_NODE, ID_UNMANAGED, ID_WORLD};
use veil::datapath::{
    Datapath, DatapathConfig, EndpointValue, Hook, Reason, RemoteValue, POD_FILTER_PRIORITIES,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// A TUN ifindex no test-run packet is ever really sent to (test runs do not
/// perform the redirect).
const TUN_IFINDEX: u32 = 4242;
const TUN_MTU: u16 = 1420; // -> MSS 1380 (v4), 1360 (v6)

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const POD_A_ID: u32 = 1000;
const POD_B_ID: u32 = 1001;
const REMOTE_PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20); // 10.244.1.0/24, peer ready
const REMOTE_PEER_ID: u32 = 2000;
const REMOTE_NO_PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5); // 10.244.2.0/24, no peer
const NOT_A_POD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const POD_A6: &str = "fd00:10:244::10";
const REMOTE6_NET: &str = "fd00:10:244:1::/64";
const REMOTE6: &str = "fd00:10:244:1::20";

const POD_MAC: [u8; 6] = [0xaa, 0xbb, 0xcc, 0x00, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0xaa, 0xbb, 0xcc, 0x00, 0x00, 0xfe];

// ---------------------------------------------------------------- packets

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            csum_add(0, &p)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
            csum_add(0, &p)
        }
        _ => panic!("mixed families"),
    }
}

/// An L4 segment with a correct checksum at `csum_off`.
fn with_l4_csum(src: IpAddr, dst: IpAddr, proto: u8, mut seg: Vec<u8>, csum_off: usize) -> Vec<u8> {
    seg[csum_off] = 0;
    seg[csum_off + 1] = 0;
    let c = csum_fold(csum_add(pseudo_sum(src, dst, proto, seg.len()), &seg));
    seg[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

fn tcp_seg(src: IpAddr, dst: IpAddr, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(
        options.len() % 4,
        0,
        "TCP options must be padded to 32 bits"
    );
    let doff = (20 + options.len()) / 4;
    let mut t = Vec::new();
    t.extend_from_slice(&40000u16.to_be_bytes());
    t.extend_from_slice(&80u16.to_be_bytes());
    t.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    t.extend_from_slice(&0u32.to_be_bytes()); // ack
    t.push((doff as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&64240u16.to_be_bytes()); // window
    t.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    with_l4_csum(src, dst, 6, t, 16)
}

fn udp_seg(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&5555u16.to_be_bytes());
    u.extend_from_slice(&7777u16.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    with_l4_csum(src, dst, 17, u, 6)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[nexthdr, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    h
}

fn eth(src_mac: [u8; 6], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn udp4_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let udp = udp_seg(src.into(), dst.into(), b"veil-test-payload");
    eth(POD_MAC, 0x0800, &ipv4(src, dst, 17, &udp))
}

fn syn4_frame(src: Ipv4Addr, dst: Ipv4Addr, options: &[u8]) -> Vec<u8> {
    let tcp = tcp_seg(src.into(), dst.into(), 0x02, options, &[]);
    eth(POD_MAC, 0x0800, &ipv4(src, dst, 6, &tcp))
}

/// MSS 1460, SACK permitted, timestamps, NOP, window scale: what Linux sends.
fn linux_syn_options(mss: u16) -> Vec<u8> {
    let mut o = vec![2, 4];
    o.extend_from_slice(&mss.to_be_bytes());
    o.extend_from_slice(&[4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]);
    o
}

/// Finds the MSS option value of the TCP header at `tcp`.
fn mss_of(tcp: &[u8]) -> Option<u16> {
    let doff = usize::from(tcp[12] >> 4) * 4;
    let opts = &tcp[20..doff];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            2 => return Some(u16::from_be_bytes([opts[i + 2], opts[i + 3]])),
            _ => i += usize::from(opts[i + 1]).max(2),
        }
    }
    None
}

fn l4_csum_ok(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> bool {
    csum_fold(csum_add(pseudo_sum(src, dst, proto, seg.len()), seg)) == 0
}

// ---------------------------------------------------------------- running

struct Run {
    ret: u32,
    out: Vec<u8>,
    mark: u32,
}

/// Runs `prog` once on `pkt` and returns verdict, output packet and mark.
fn run(prog: &SchedClassifier, pkt: &[u8]) -> Run {
    run_gso(prog, pkt, 0)
}

/// Offset of `gso_size` in `struct __sk_buff` (uapi/linux/bpf.h).
const SKB_GSO_SIZE_OFF: usize = 176;

/// Like [`run`], with `gso_size` set, as for a GSO super-packet.
fn run_gso(prog: &SchedClassifier, pkt: &[u8], gso_size: u32) -> Run {
    // struct __sk_buff is 192 bytes on 6.x; a larger zeroed buffer is
    // accepted on input (tail must be zero) and fits the output.
    let mut ctx_in = [0u8; 256];
    ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&gso_size.to_ne_bytes());
    let mut ctx_out = [0u8; 256];
    let mut out = vec![0u8; pkt.len() + 64];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte packet: {e}", pkt.len()));
    out.truncate(res.data_size_out as usize);
    // __sk_buff: len (0), pkt_type (4), mark (8).
    let mark = u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]]);
    Run {
        ret: res.return_value,
        out,
        mark,
    }
}

fn from_pod(dp: &Datapath, pkt: &[u8]) -> Run {
    run(dp.classifier(Hook::FromPod).expect("from_pod"), pkt)
}

fn to_pod(dp: &Datapath, pkt: &[u8]) -> Run {
    run(dp.classifier(Hook::ToPod).expect("to_pod"), pkt)
}

fn count(dp: &Datapath, r: Reason) -> (u64, u64) {
    dp.metrics().expect("metrics")[&r]
}

/// A remote map with one pod CIDR.
fn one_remote(
    cidr: &str,
    has_peer: bool,
    local: bool,
    node_id: u32,
) -> BTreeMap<IpNet, RemoteValue> {
    let cidr = cidr.parse::<IpNet>().expect("test CIDR");
    BTreeMap::from([(
        cidr,
        RemoteValue {
            has_peer,
            local,
            node_id,
        },
    )])
}

fn setup(enabled: bool, strict: bool) -> Datapath {
    require_root();
    let mut dp = Datapath::load().expect("load the datapath");
    dp.set_config(DatapathConfig {
        enabled,
        strict,
        tun_ifindex: TUN_IFINDEX,
        tun_mtu: TUN_MTU,
    })
    .expect("config");
    let mut eps = BTreeMap::new();
    eps.insert(
        IpAddr::V4(POD_A),
        EndpointValue {
            identity: POD_A_ID,
            ifindex: 5001,
        },
    );
    eps.insert(
        IpAddr::V4(POD_B),
        EndpointValue {
            identity: POD_B_ID,
            ifindex: 5002,
        },
    );
    eps.insert(
        POD_A6.parse().unwrap(),
        EndpointValue {
            identity: POD_A_ID,
            ifindex: 5001,
        },
    );
    dp.sync_endpoints(&eps).expect("endpoints");
    let mut remote = one_remote("10.244.1.0/24", true, false, 1);
    remote.insert(
        "10.244.2.0/24".parse::<IpNet>().unwrap(),
        RemoteValue {
            has_peer: false,
            local: false,
            node_id: 2,
        },
    );
    remote.insert(
        REMOTE6_NET.parse::<IpNet>().unwrap(),
        RemoteValue {
            has_peer: true,
            local: false,
            node_id: 1,
        },
    );
    dp.sync_remote(&remote).expect("remote");
    let mut ipc = BTreeMap::new();
    ipc.insert(IpAddr::V4(REMOTE_PEER), REMOTE_PEER_ID);
    dp.sync_ipcache(&ipc).expect("ipcache");
    dp
}

// ---------------------------------------------------------------- from_pod

#[test]
fn remote_with_peer_is_redirected_to_tun() {
    let dp = setup(true, true);
    let pkt = udp4_frame(POD_A, REMOTE_PEER);
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(POD_A_ID));
    assert_eq!(r.out, pkt, "a UDP packet must not be rewritten");
    assert_eq!(count(&dp, Reason::ForwardedToTun), (1, pkt.len() as u64));
    for r in Reason::ALL.into_iter().filter(|r| r.is_drop()) {
        assert_eq!(count(&dp, r), (0, 0), "{r}");
    }
}

#[test]
fn remote_without_peer_strict_is_dropped_and_counted() {
    let dp = setup(true, true);
    let pkt = udp4_frame(POD_A, REMOTE_NO_PEER);
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropNoPeer), (1, pkt.len() as u64));
    assert_eq!(count(&dp, Reason::ForwardedToTun), (0, 0));
    // A second packet counts again: the metric is per packet.
    from_pod(&dp, &pkt);
    assert_eq!(count(&dp, Reason::DropNoPeer).0, 2);
}

#[test]
fn remote_without_peer_non_strict_passes_and_is_counted() {
    let dp = setup(true, false);
    let pkt = udp4_frame(POD_A, REMOTE_NO_PEER);
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_OK);
    assert_eq!(r.mark, identity_mark(POD_A_ID));
    assert_eq!(count(&dp, Reason::PassedNoPeer), (1, pkt.len() as u64));
    assert_eq!(count(&dp, Reason::DropNoPeer), (0, 0));
}

#[test]
fn cluster_range_drops_unserved_addresses_but_not_local_ones() {
    let mut dp = setup(true, true);
    // The agent's layout: the cluster range as a peerless entry, this node's
    // own CIDR carved out as local, node CIDRs as usual.
    let mut remote = BTreeMap::new();
    for (net, has_peer, local) in [
        ("10.244.0.0/16", false, false),
        ("10.244.1.0/24", true, false),
        ("10.244.2.0/24", false, false),
        ("10.244.9.0/24", false, true),
    ] {
        let value = RemoteValue {
            has_peer,
            local,
            node_id: 0,
        };
        remote.insert(net.parse::<IpNet>().unwrap(), value);
    }
    dp.sync_remote(&remote).expect("remote");
    // An address in the cluster range that no node serves: dropped.
    let r = from_pod(&dp, &udp4_frame(POD_A, Ipv4Addr::new(10, 244, 77, 1)));
    assert_eq!(r.ret, TC_ACT_SHOT);
    // A local pod CIDR (not in the endpoint map yet): passed, never dropped.
    let r = from_pod(&dp, &udp4_frame(POD_A, Ipv4Addr::new(10, 244, 9, 20)));
    assert_eq!(r.ret, TC_ACT_OK);
    // A node CIDR with a peer still wins over the covering range.
    let r = from_pod(&dp, &udp4_frame(POD_A, REMOTE_PEER));
    assert_eq!(r.ret, TC_ACT_REDIRECT);
}

#[test]
fn encryption_disabled_passes_but_still_marks() {
    let dp = setup(false, true);
    for dst in [REMOTE_PEER, REMOTE_NO_PEER] {
        let r = from_pod(&dp, &udp4_frame(POD_A, dst));
        assert_eq!(r.ret, TC_ACT_OK, "to {dst}");
        assert_eq!(r.mark, identity_mark(POD_A_ID));
    }
    assert_eq!(count(&dp, Reason::ForwardedToTun), (0, 0));
    assert_eq!(count(&dp, Reason::DropNoPeer), (0, 0));
}

#[test]
fn config_can_be_changed_at_runtime() {
    let mut dp = setup(false, true);
    let pkt = udp4_frame(POD_A, REMOTE_PEER);
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_OK);
    let cfg = DatapathConfig {
        enabled: true,
        strict: true,
        tun_ifindex: TUN_IFINDEX,
        tun_mtu: TUN_MTU,
    };
    dp.set_config(cfg).unwrap();
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_REDIRECT);
    // Enabled without a TUN: fail closed.
    dp.set_config(DatapathConfig {
        tun_ifindex: 0,
        ..cfg
    })
    .unwrap();
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropNoTun).0, 1);
}

#[test]
fn peer_state_follows_sync_remote() {
    let mut dp = setup(true, true);
    let pkt = udp4_frame(POD_A, REMOTE_NO_PEER);
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_SHOT);
    let mut remote = BTreeMap::new();
    remote.insert(
        // Host bits set on purpose: the key is normalised.
        "10.244.2.77/24".parse::<IpNet>().unwrap(),
        RemoteValue {
            has_peer: true,
            local: false,
            node_id: 2,
        },
    );
    dp.sync_remote(&remote).unwrap();
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_REDIRECT);
    // 10.244.1.0/24 was dropped from the desired set: no longer remote.
    assert_eq!(
        from_pod(&dp, &udp4_frame(POD_A, REMOTE_PEER)).ret,
        TC_ACT_OK
    );
    dp.sync_remote(&BTreeMap::new()).unwrap();
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_OK);
}

#[test]
fn local_and_non_pod_destinations_pass() {
    let dp = setup(true, true);
    let r = from_pod(&dp, &udp4_frame(POD_A, POD_B));
    assert_eq!(r.ret, TC_ACT_OK);
    assert_eq!(r.mark, identity_mark(POD_A_ID));
    let r = from_pod(&dp, &udp4_frame(POD_B, NOT_A_POD));
    assert_eq!(r.ret, TC_ACT_OK);
    assert_eq!(r.mark, identity_mark(POD_B_ID));
    assert_eq!(count(&dp, Reason::ForwardedToTun), (0, 0));
}

#[test]
fn unknown_source_gets_unmanaged_identity() {
    let dp = setup(true, true);
    let stranger = Ipv4Addr::new(10, 244, 0, 99);
    let r = from_pod(&dp, &udp4_frame(stranger, NOT_A_POD));
    assert_eq!(r.ret, TC_ACT_OK);
    assert_eq!(r.mark, identity_mark(ID_UNMANAGED));
    // Still never leaves in plaintext towards a remote pod.
    let r = from_pod(&dp, &udp4_frame(stranger, REMOTE_PEER));
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(ID_UNMANAGED));
}

#[test]
fn syn_mss_is_clamped_with_valid_checksum() {
    let dp = setup(true, true);
    let pkt = syn4_frame(POD_A, REMOTE_PEER, &linux_syn_options(1460));
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.out.len(), pkt.len());
    let tcp = &r.out[34..];
    assert_eq!(mss_of(tcp), Some(1380));
    assert!(
        l4_csum_ok(POD_A.into(), REMOTE_PEER.into(), 6, tcp),
        "TCP checksum broken"
    );
    // Nothing but the MSS and the checksum changed.
    let changed: Vec<usize> = (0..pkt.len()).filter(|&i| pkt[i] != r.out[i]).collect();
    assert!(
        changed
            .iter()
            .all(|&i| [34 + 16, 34 + 17, 34 + 22, 34 + 23].contains(&i)),
        "{changed:?}"
    );
}

#[test]
fn syn_mss_at_odd_offset_is_clamped_with_valid_checksum() {
    let dp = setup(true, true);
    // NOP, MSS, NOP, NOP, NOP: the MSS value starts at TCP offset 23.
    let opts = [1, 2, 4, 0x05, 0xb4, 1, 1, 1];
    let pkt = syn4_frame(POD_A, REMOTE_PEER, &opts);
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    let tcp = &r.out[34..];
    assert_eq!(mss_of(tcp), Some(1380));
    assert!(
        l4_csum_ok(POD_A.into(), REMOTE_PEER.into(), 6, tcp),
        "TCP checksum broken"
    );
}

#[test]
fn small_mss_and_non_syn_are_left_alone() {
    let dp = setup(true, true);
    let small = syn4_frame(POD_A, REMOTE_PEER, &linux_syn_options(1200));
    let r = from_pod(&dp, &small);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.out, small);
    // An ACK carrying an MSS-looking option is not a SYN: untouched.
    let tcp = tcp_seg(
        POD_A.into(),
        REMOTE_PEER.into(),
        0x10,
        &linux_syn_options(1460),
        b"x",
    );
    let ack = eth(POD_MAC, 0x0800, &ipv4(POD_A, REMOTE_PEER, 6, &tcp));
    let r = from_pod(&dp, &ack);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.out, ack);
}

#[test]
fn ipv6_syn_is_redirected_and_clamped() {
    let dp = setup(true, true);
    let src: Ipv6Addr = POD_A6.parse().unwrap();
    let dst: Ipv6Addr = REMOTE6.parse().unwrap();
    let tcp = tcp_seg(src.into(), dst.into(), 0x02, &linux_syn_options(1440), &[]);
    let pkt = eth(POD_MAC, 0x86dd, &ipv6(src, dst, 6, &tcp));
    let r = from_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(POD_A_ID));
    let tcp = &r.out[14 + 40..];
    assert_eq!(mss_of(tcp), Some(TUN_MTU - 60));
    assert!(
        l4_csum_ok(src.into(), dst.into(), 6, tcp),
        "TCP checksum broken"
    );
}

#[test]
fn garbage_from_pod_never_crashes() {
    let dp = setup(true, true);
    let good = syn4_frame(POD_A, REMOTE_PEER, &linux_syn_options(1460));

    // Non-IP (ARP) passes untouched.
    let arp = eth(POD_MAC, 0x0806, &[0u8; 28]);
    assert_eq!(from_pod(&dp, &arp).ret, TC_ACT_OK);

    // (A frame too short for the IP header its ethertype announces cannot
    // be tested here: BPF_PROG_TEST_RUN itself rejects it with EINVAL.)
    // IHL below 5.
    let mut bad = good.clone();
    bad[14] = 0x43;
    assert_eq!(from_pod(&dp, &bad).ret, TC_ACT_SHOT);
    // Total length beyond the packet.
    let mut bad = good.clone();
    bad[16..18].copy_from_slice(&1500u16.to_be_bytes());
    assert_eq!(from_pod(&dp, &bad).ret, TC_ACT_SHOT);
    // IPv6 payload length beyond the packet.
    let src6: Ipv6Addr = POD_A6.parse().unwrap();
    let dst6: Ipv6Addr = REMOTE6.parse().unwrap();
    let mut v6 = eth(POD_MAC, 0x86dd, &ipv6(src6, dst6, 17, &[0; 8]));
    v6[18..20].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(from_pod(&dp, &v6).ret, TC_ACT_SHOT);
    // Version 4 in an IPv6 frame.
    let mut v6 = eth(POD_MAC, 0x86dd, &ipv6(src6, dst6, 17, &[0; 8]));
    v6[14] = 0x40;
    assert_eq!(from_pod(&dp, &v6).ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropInvalid).0, 4);

    // SYN whose options run past the end of the packet (doff 15, 4 bytes of
    // options): dropped, never read beyond the data.
    let src = IpAddr::V4(POD_A);
    let dst = IpAddr::V4(REMOTE_PEER);
    let mut tcp = tcp_seg(src, dst, 0x02, &[2, 4, 5, 0xb4], &[]);
    tcp[12] = 15 << 4;
    let pkt = eth(POD_MAC, 0x0800, &ipv4(POD_A, REMOTE_PEER, 6, &tcp));
    assert_eq!(from_pod(&dp, &pkt).ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropInvalid).0, 5);

    // Malformed option lengths (0, and running past the options) stop the
    // walk; the packet is still encrypted, unmodified.
    for opts in [[3, 0, 2, 4, 5, 0xb4, 1, 1], [8, 200, 1, 1, 1, 1, 1, 1]] {
        let tcp = tcp_seg(src, dst, 0x02, &opts, &[]);
        let pkt = eth(POD_MAC, 0x0800, &ipv4(POD_A, REMOTE_PEER, 6, &tcp));
        let r = from_pod(&dp, &pkt);
        assert_eq!(r.ret, TC_ACT_REDIRECT, "{opts:?}");
        assert_eq!(r.out, pkt);
    }

    // Deterministic fuzz: random mutations of a valid SYN, random lengths.
    let mut seed: u64 = 0x5eed_1234_5678_9abc;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for _ in 0..300 {
        let mut p = good.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = 14 + next() % (p.len() - 14);
            p[i] = next() as u8;
        }
        // At least Ethernet + a 20-byte IPv4 header (see above).
        let len = 34 + next() % (p.len() - 33);
        p.truncate(len);
        let r = from_pod(&dp, &p);
        assert!(
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&r.ret),
            "unexpected verdict {} for {p:02x?}",
            r.ret
        );
    }
}

#[test]
fn big_tcp_gso_packet_with_zero_total_length() {
    let dp = setup(true, true);
    let tcp = tcp_seg(POD_A.into(), REMOTE_PEER.into(), 0x10, &[], &[0u8; 200]);
    let mut pkt = eth(POD_MAC, 0x0800, &ipv4(POD_A, REMOTE_PEER, 6, &tcp));
    pkt[16..18].copy_from_slice(&0u16.to_be_bytes());
    // IPv4 BIG TCP: tot_len 0 on a GSO packet is valid and still encrypted.
    let prog = dp.classifier(Hook::FromPod).unwrap();
    assert_eq!(run_gso(prog, &pkt, 1400).ret, TC_ACT_REDIRECT);
    // The same header on a non-GSO packet is malformed.
    assert_eq!(run(prog, &pkt).ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropInvalid).0, 1);
}

// ---------------------------------------------------------------- to_pod

#[test]
fn to_pod_known_destination_is_delivered_with_ethernet_header() {
    let dp = setup(true, true);
    let udp = udp_seg(REMOTE_PEER.into(), POD_A.into(), b"hello pod");
    let pkt = eth(HOST_MAC, 0x0800, &ipv4(REMOTE_PEER, POD_A, 17, &udp));

    // MAC not learned yet: broadcast.
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(REMOTE_PEER_ID));
    assert_eq!(r.out.len(), pkt.len());
    assert_eq!(&r.out[0..6], &[0xff; 6]);
    assert_eq!(&r.out[6..12], &[0x02, 0x76, 0x65, 0x69, 0x6c, 0x00]);
    assert_eq!(&r.out[12..14], &[0x08, 0x00]);
    assert_eq!(&r.out[14..], &pkt[14..], "the IP packet must be untouched");
    assert_eq!(count(&dp, Reason::DeliveredToPod), (1, pkt.len() as u64));

    // from_pod learns the pod's MAC from its frames; to_pod then uses it.
    from_pod(&dp, &udp4_frame(POD_A, POD_B));
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(&r.out[0..6], &POD_MAC);
}

#[test]
fn to_pod_ipv6_is_delivered() {
    let dp = setup(true, true);
    let src: Ipv6Addr = REMOTE6.parse().unwrap();
    let dst: Ipv6Addr = POD_A6.parse().unwrap();
    let udp = udp_seg(src.into(), dst.into(), b"hello v6 pod");
    let pkt = eth(HOST_MAC, 0x86dd, &ipv6(src, dst, 17, &udp));
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(ID_WORLD));
    assert_eq!(&r.out[12..14], &[0x86, 0xdd]);
    assert_eq!(&r.out[14..], &pkt[14..]);
}

#[test]
fn endpoint_resync_keeps_learned_mac_only_for_the_same_veth() {
    let mut dp = setup(true, true);
    let udp = udp_seg(REMOTE_PEER.into(), POD_A.into(), b"x");
    let pkt = eth(HOST_MAC, 0x0800, &ipv4(REMOTE_PEER, POD_A, 17, &udp));
    from_pod(&dp, &udp4_frame(POD_A, POD_B)); // learn POD_MAC
    assert_eq!(&to_pod(&dp, &pkt).out[0..6], &POD_MAC);

    let mut eps = BTreeMap::new();
    eps.insert(
        IpAddr::V4(POD_A),
        EndpointValue {
            identity: 4321,
            ifindex: 5001,
        },
    );
    dp.sync_endpoints(&eps).unwrap();
    // New identity, same veth: the learned MAC stays; POD_B is gone.
    let r = from_pod(&dp, &udp4_frame(POD_A, NOT_A_POD));
    assert_eq!(r.mark, identity_mark(4321));
    assert_eq!(&to_pod(&dp, &pkt).out[0..6], &POD_MAC);
    let r = from_pod(&dp, &udp4_frame(POD_B, NOT_A_POD));
    assert_eq!(r.mark, identity_mark(ID_UNMANAGED));

    // Same IP on another veth (a new pod): the old MAC is forgotten.
    eps.insert(
        IpAddr::V4(POD_A),
        EndpointValue {
            identity: 4321,
            ifindex: 5009,
        },
    );
    dp.sync_endpoints(&eps).unwrap();
    assert_eq!(&to_pod(&dp, &pkt).out[0..6], &[0xff; 6]);

    // Identities beyond the 24-bit mark are refused, naming the key.
    eps.insert(
        IpAddr::V4(POD_A),
        EndpointValue {
            identity: 1 << 24,
            ifindex: 5009,
        },
    );
    let err = dp.sync_endpoints(&eps).unwrap_err().to_string();
    assert!(err.contains("10.244.0.10"), "{err}");
}

#[test]
fn to_pod_unknown_destination_or_source() {
    let dp = setup(true, true);
    // Not a local pod: left to the kernel's routing.
    let udp = udp_seg(REMOTE_PEER.into(), NOT_A_POD.into(), b"x");
    let pkt = eth(HOST_MAC, 0x0800, &ipv4(REMOTE_PEER, NOT_A_POD, 17, &udp));
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_OK);
    assert_eq!(r.mark, identity_mark(REMOTE_PEER_ID));
    assert_eq!(r.out, pkt);
    // Source not in the IP cache: world.
    let other = Ipv4Addr::new(10, 244, 1, 99);
    let udp = udp_seg(other.into(), POD_B.into(), b"x");
    let pkt = eth(HOST_MAC, 0x0800, &ipv4(other, POD_B, 17, &udp));
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    assert_eq!(r.mark, identity_mark(ID_WORLD));
}

#[test]
fn to_pod_clamps_syn_ack_mss() {
    let dp = setup(true, true);
    let tcp = tcp_seg(
        REMOTE_PEER.into(),
        POD_A.into(),
        0x12,
        &linux_syn_options(1460),
        &[],
    );
    let pkt = eth(HOST_MAC, 0x0800, &ipv4(REMOTE_PEER, POD_A, 6, &tcp));
    let r = to_pod(&dp, &pkt);
    assert_eq!(r.ret, TC_ACT_REDIRECT);
    let tcp = &r.out[34..];
    assert_eq!(mss_of(tcp), Some(1380));
    assert!(l4_csum_ok(REMOTE_PEER.into(), POD_A.into(), 6, tcp));
}

#[test]
fn to_pod_garbage_is_dropped_not_read_out_of_bounds() {
    let dp = setup(true, true);
    let udp = udp_seg(REMOTE_PEER.into(), POD_A.into(), b"payload");
    let good = eth(HOST_MAC, 0x0800, &ipv4(REMOTE_PEER, POD_A, 17, &udp));
    let mut bad = good.clone();
    bad[14] = 0x65; // version 6 in an IPv4 frame
    assert_eq!(to_pod(&dp, &bad).ret, TC_ACT_SHOT);
    // Total length beyond the packet (a truncated packet).
    let mut bad = good.clone();
    bad[16..18].copy_from_slice(&200u16.to_be_bytes());
    assert_eq!(to_pod(&dp, &bad).ret, TC_ACT_SHOT);
    // Total length shorter than the header.
    let mut bad = good.clone();
    bad[16..18].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(to_pod(&dp, &bad).ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::DropInvalid).0, 3);
    assert_eq!(count(&dp, Reason::DeliveredToPod), (0, 0));
    // Non-IP passes.
    assert_eq!(to_pod(&dp, &eth(HOST_MAC, 0x0806, &[0; 28])).ret, TC_ACT_OK);
}

// ---------------------------------------------------------------- namespaces

/// `from_pod` filter lines on `dev` ingress, as `(pref, line)`.
fn veil_filters(ns: &Netns, dev: &str) -> Vec<(u16, String)> {
    let out = ns.exec_ok(&["tc", "filter", "show", "dev", dev, "ingress"]);
    out.lines()
        .filter(|l| l.contains("from_pod"))
        .map(|l| {
            let pref = l
                .split_whitespace()
                .skip_while(|w| *w != "pref")
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no pref in `{l}`"));
            (pref, l.to_string())
        })
        .collect()
}

#[test]
fn pod_filter_outlives_the_agent_and_is_replaced_without_duplicates() {
    require_root();
    let p = unique_prefix();
    let ns = Netns::new(format!("{p}x"));
    let host = format!("{p}h");
    let peer = format!("{p}p");
    ns.exec_ok(&[
        "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
    ]);
    ns.exec_ok(&["ip", "link", "set", &host, "up"]);

    // First agent: attach, then exit (drop everything).
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_pod(&dev).expect("attach_pod");
    });
    let f = veil_filters(&ns, &host);
    assert_eq!(f.len(), 1, "the filter must survive the agent: {f:?}");
    let first = f[0].0;
    assert!(POD_FILTER_PRIORITIES.contains(&first));

    // Second agent: replaces the first one's filter at the other priority.
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_pod(&dev).expect("attach_pod over a predecessor");
    });
    let f = veil_filters(&ns, &host);
    assert_eq!(
        f.len(),
        1,
        "exactly one veil filter after replacement: {f:?}"
    );
    assert_ne!(f[0].0, first, "the replacement must use the other priority");

    // Third agent, and attach twice within one agent: still exactly one.
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_pod(&dev).expect("attach_pod");
        dp.attach_pod(&dev).expect("attach_pod again");
    });
    assert_eq!(veil_filters(&ns, &host).len(), 1);

    // A predecessor that died mid-swap leaves both priorities taken. Model
    // the second one with a classic-BPF cls_bpf filter at the free priority
    // (same kind, protocol and handle, so the netlink create hits EEXIST).
    let taken = veil_filters(&ns, &host)[0].0;
    let other = POD_FILTER_PRIORITIES
        .into_iter()
        .find(|p| *p != taken)
        .unwrap()
        .to_string();
    ns.exec_ok(&[
        "tc",
        "filter",
        "add",
        "dev",
        &host,
        "ingress",
        "protocol",
        "all",
        "pref",
        &other,
        "handle",
        "1",
        "bpf",
        "bytecode",
        "1,6 0 0 4294967295,",
    ]);
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_pod(&dev)
            .expect("attach_pod with both priorities taken");
    });
    let f = veil_filters(&ns, &host);
    assert_eq!(f.len(), 1, "{f:?}");
    let all = ns.exec_ok(&["tc", "filter", "show", "dev", &host, "ingress"]);
    assert!(
        !all.contains("bytecode"),
        "the stale filter must be gone: {all}"
    );

    // Explicit detach removes it; detaching again or a missing device is fine.
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.detach_pod(&dev).expect("detach_pod");
        dp.detach_pod(&dev).expect("detach_pod twice");
        dp.detach_pod("nonexistent0")
            .expect("detach_pod of a missing device");
        assert!(dp.attach_pod("nonexistent0").is_err());
    });
    assert_eq!(veil_filters(&ns, &host).len(), 0);
}

/// Opens the existing TUN device `name` (IFF_TUN | IFF_NO_PI) in the calling
/// thread's network namespace.
fn open_tun(name: &str) -> OwnedFd {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: open(2) with a valid NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a freshly opened descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes, name + flags) that
    // lives for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Reads one packet from the TUN, waiting up to `timeout`; skips packets
/// for which `want` is false (e.g. IPv6 router solicitations).
fn read_tun(fd: &OwnedFd, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let mut buf = vec![0u8; 2048];
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let len = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if len > 0 {
            buf.truncate(len as usize);
            if want(&buf) {
                return Some(buf);
            }
        }
    }
}

fn ifindex_in(ns: &Netns, dev: &str) -> u32 {
    let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
    out.trim().parse().expect("ifindex")
}

/// Puts pod 10.244.0.10 behind veth `host` of `node`: the pod's default route
/// goes via 10.244.0.1 with a permanent neighbour entry for it, at
/// `gateway_mac` or (None) at the host veth's own MAC, the one the node must
/// see as destination to route the frames (anything else is PACKET_OTHERHOST).
fn plug_pod(node: &Netns, pod: &Netns, host: &str, gateway_mac: Option<&str>) {
    node.exec_ok(&[
        "ip",
        "link",
        "add",
        host,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    node.exec_ok(&["ip", "link", "set", host, "up"]);
    pod.exec_ok(&["ip", "addr", "add", "10.244.0.10/32", "dev", "eth0"]);
    pod.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    pod.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.0.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.exec_ok(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "10.244.0.1",
        "dev",
        "eth0",
    ]);
    let host_mac = node.exec_ok(&["cat", &format!("/sys/class/net/{host}/address")]);
    let mac = gateway_mac.unwrap_or(host_mac.trim());
    pod.exec_ok(&[
        "ip",
        "neigh",
        "add",
        "10.244.0.1",
        "lladdr",
        mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
}

/// The real paths, in namespaces: a packet written into the TUN reaches the
/// pod's socket through to_pod (change_head + redirect_peer), and a packet
/// the pod sends to a remote pod comes out of the TUN (from_pod's redirect
/// strips the Ethernet header), MSS clamped.
#[test]
fn tun_to_pod_and_pod_to_tun_end_to_end() {
    require_root();
    let p = unique_prefix();
    let node = Netns::new(format!("{p}n"));
    let pod = Netns::new(format!("{p}q"));
    let tun = format!("{p}t");
    let host = format!("{p}h");
    node.exec_ok(&["ip", "tuntap", "add", "dev", &tun, "mode", "tun"]);
    node.exec_ok(&["ip", "link", "set", &tun, "mtu", &TUN_MTU.to_string(), "up"]);
    plug_pod(&node, &pod, &host, Some("aa:bb:cc:00:00:fe"));
    let tun_ifindex = ifindex_in(&node, &tun);
    let host_ifindex = ifindex_in(&node, &host);

    // The pod listens before anything is sent.
    let sock = pod.run(|| {
        let s = std::net::UdpSocket::bind("10.244.0.10:7777").expect("bind in pod");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });

    // Datapath (no pinning: the maps live in this test's fds).
    let (tun_name, host_name) = (tun.clone(), host.clone());
    let (dp, tun_fd) = node.run(move || {
        let mut dp = Datapath::load().expect("load");
        // attach_tun first, then a config naming no TUN: the datapath uses
        // the attached one (to_pod needs it to know there is no L2 header).
        dp.attach_tun(&tun_name).expect("attach_tun");
        let cfg = DatapathConfig {
            enabled: true,
            strict: true,
            tun_ifindex: 0,
            tun_mtu: TUN_MTU,
        };
        dp.set_config(cfg).unwrap();
        let wrong = DatapathConfig {
            tun_ifindex: tun_ifindex + 1000,
            ..cfg
        };
        assert!(
            dp.set_config(wrong).is_err(),
            "a config naming another TUN must be refused"
        );
        let mut eps = BTreeMap::new();
        eps.insert(
            IpAddr::V4(POD_A),
            EndpointValue {
                identity: POD_A_ID,
                ifindex: host_ifindex,
            },
        );
        dp.sync_endpoints(&eps).unwrap();
        let remote = one_remote("10.244.1.0/24", true, false, 1);
        dp.sync_remote(&remote).unwrap();
        dp.attach_pod(&host_name).expect("attach_pod");
        (dp, open_tun(&tun_name))
    });

    // TUN -> pod.
    let udp = udp_seg(REMOTE_PEER.into(), POD_A.into(), b"veil-canary-in");
    let pkt = ipv4(REMOTE_PEER, POD_A, 17, &udp);
    // SAFETY: pkt is valid for reads of pkt.len() bytes.
    let n = unsafe { libc::write(tun_fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
    assert_eq!(
        n,
        pkt.len() as isize,
        "write to TUN: {}",
        std::io::Error::last_os_error()
    );
    let (got, from) = pod.run(move || {
        let mut buf = [0u8; 256];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("the pod must receive the packet");
        (buf[..n].to_vec(), from)
    });
    assert_eq!(got, b"veil-canary-in");
    assert_eq!(from, "10.244.1.20:5555".parse().unwrap());
    assert_eq!(dp.metrics().unwrap()[&Reason::DeliveredToPod].0, 1);

    // Pod -> remote pod: comes out of the TUN as a bare IP packet.
    pod.run(|| {
        let s = std::net::UdpSocket::bind("10.244.0.10:0").unwrap();
        s.send_to(b"veil-canary-out", "10.244.1.20:7777")
            .expect("send from pod");
    });
    let is_udp4 = |p: &[u8]| p.len() > 20 && p[0] >> 4 == 4 && p[9] == 17;
    let out = read_tun(&tun_fd, Duration::from_secs(5), is_udp4)
        .expect("the pod's packet must come out of the TUN");
    assert_eq!(&out[12..16], &POD_A.octets(), "source");
    assert_eq!(&out[16..20], &REMOTE_PEER.octets(), "destination");
    assert!(out.ends_with(b"veil-canary-out"));
    assert_eq!(dp.metrics().unwrap()[&Reason::ForwardedToTun].0, 1);

    // A TCP SYN from the pod (eth0 MTU 1500, so MSS 1460) leaves through
    // the TUN with the MSS clamped to the TUN's and a valid checksum.
    let connect = pod.run(|| {
        std::thread::spawn(|| {
            let _ = std::net::TcpStream::connect_timeout(
                &"10.244.1.20:80".parse().unwrap(),
                Duration::from_secs(3),
            );
        })
    });
    let is_syn = |p: &[u8]| p.len() >= 40 && p[0] == 0x45 && p[9] == 6 && p[33] & 0x02 != 0;
    let syn = read_tun(&tun_fd, Duration::from_secs(5), is_syn).expect("SYN out of the TUN");
    assert_eq!(mss_of(&syn[20..]), Some(TUN_MTU - 40));
    // The pod's skb is CHECKSUM_PARTIAL (veth offload): the clamp must
    // leave the partial sum alone and the TUN's xmit path completes it.
    assert!(
        l4_csum_ok(POD_A.into(), REMOTE_PEER.into(), 6, &syn[20..]),
        "TCP checksum of the clamped SYN out of the TUN"
    );
    let _ = connect.join();
    drop(dp);
}

fn counter(ns: &Netns, dev: &str, stat: &str) -> u64 {
    let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{dev}/statistics/{stat}")]);
    out.trim().parse().expect("counter")
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fail closed across agent exit: the node has a plaintext route to the
/// remote pod CIDR (like a host-gw CNI). Without Veil the pod's packets leave
/// on it (positive control); after an agent attached `from_pod`, exited and
/// its TUN vanished, they are dropped, never sent in plaintext.
#[test]
fn fail_closed_after_agent_exit_no_plaintext_leak() {
    require_root();
    let p = unique_prefix();
    let node = Netns::new(format!("{p}n"));
    let pod = Netns::new(format!("{p}q"));
    let tun = format!("{p}t");
    let host = format!("{p}h");
    let (ul0, ul1) = (format!("{p}u0"), format!("{p}u1"));
    for s in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        node.exec_ok(&["sysctl", "-qw", s]);
    }
    pod.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    pod.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    node.exec_ok(&["ip", "tuntap", "add", "dev", &tun, "mode", "tun"]);
    node.exec_ok(&["ip", "link", "set", &tun, "up"]);
    plug_pod(&node, &pod, &host, None);
    node.exec_ok(&["ip", "route", "add", "10.244.0.10/32", "dev", &host]);
    // The "underlay": a veth pair inside the node; whatever the node sends
    // out of ul0 is counted as received on ul1.
    node.exec_ok(&[
        "ip", "link", "add", &ul0, "type", "veth", "peer", "name", &ul1,
    ]);
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/24", "dev", &ul0]);
    node.exec_ok(&["ip", "link", "set", &ul0, "up"]);
    node.exec_ok(&["ip", "link", "set", &ul1, "up"]);
    for (ip, mac) in [
        ("198.18.0.2", "aa:bb:cc:00:01:02"),
        ("198.18.0.3", "aa:bb:cc:00:01:03"),
    ] {
        node.exec_ok(&[
            "ip",
            "neigh",
            "add",
            ip,
            "lladdr",
            mac,
            "dev",
            &ul0,
            "nud",
            "permanent",
        ]);
    }
    // Plaintext route to the remote pod CIDR, as a host-gw CNI would have.
    node.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "198.18.0.2",
        "dev",
        &ul0,
    ]);

    let send = |dst: &'static str, n: usize| {
        pod.run(move || {
            let s = std::net::UdpSocket::bind("10.244.0.10:0").unwrap();
            for _ in 0..n {
                s.send_to(b"veil-canary-plaintext", dst)
                    .expect("send from pod");
            }
        })
    };

    // Positive control: without Veil the canaries leave in plaintext.
    let before = counter(&node, &ul1, "rx_packets");
    send("10.244.1.20:7777", 5);
    wait_for(
        "plaintext canaries on the underlay",
        Duration::from_secs(5),
        || counter(&node, &ul1, "rx_packets") >= before + 5,
    );

    // An agent attaches with encryption on, then exits; its TUN goes away.
    let tun_ifindex = ifindex_in(&node, &tun);
    let dev = host.clone();
    node.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.set_config(DatapathConfig {
            enabled: true,
            strict: true,
            tun_ifindex,
            tun_mtu: TUN_MTU,
        })
        .unwrap();
        let remote = one_remote("10.244.1.0/24", true, false, 1);
        dp.sync_remote(&remote).unwrap();
        dp.attach_pod(&dev).expect("attach_pod");
    });
    node.exec_ok(&["ip", "link", "del", &tun]);

    let leaked_before = counter(&node, &ul1, "rx_packets");
    let seen_before = counter(&node, &host, "rx_packets");
    send("10.244.1.20:7777", 5);
    // A sentinel to a non-pod address is still routed normally; once it has
    // crossed the underlay, the canaries sent before it have been handled.
    send("198.18.0.3:7777", 1);
    wait_for(
        "the pod's packets at the host veth",
        Duration::from_secs(5),
        || counter(&node, &host, "rx_packets") >= seen_before + 6,
    );
    wait_for(
        "the sentinel on the underlay",
        Duration::from_secs(5),
        || counter(&node, &ul1, "rx_packets") > leaked_before,
    );
    assert_eq!(
        counter(&node, &ul1, "rx_packets"),
        leaked_before + 1,
        "only the sentinel may cross the underlay: remote-pod canaries leaked in plaintext"
    );

    // Restarted agents replace the filter while the pod keeps sending: no
    // packet may slip through between the old filter and the new one.
    let leaked_before = counter(&node, &ul1, "rx_packets");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = pod.run(move || {
        std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("10.244.0.10:0").unwrap();
            let mut sent = 0u64;
            // Bounded: at most 20000 small packets.
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                if s.send_to(b"veil-canary-restart", "10.244.1.20:7777")
                    .is_ok()
                {
                    sent += 1;
                }
            }
            sent
        })
    });
    for _ in 0..3 {
        let dev = host.clone();
        node.run(move || {
            let mut dp = Datapath::load().expect("load");
            // The TUN is gone: enabled with no TUN also fails closed.
            dp.set_config(DatapathConfig {
                enabled: true,
                strict: true,
                tun_ifindex: 0,
                tun_mtu: TUN_MTU,
            })
            .unwrap();
            let remote = one_remote("10.244.1.0/24", true, false, 1);
            dp.sync_remote(&remote).unwrap();
            dp.attach_pod(&dev).expect("attach_pod over a predecessor");
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().expect("sender thread");
    assert!(sent > 0, "the pod sent nothing during the restarts");
    send("198.18.0.3:7777", 1);
    wait_for(
        "the sentinel on the underlay",
        Duration::from_secs(5),
        || counter(&node, &ul1, "rx_packets") > leaked_before,
    );
    assert_eq!(
        counter(&node, &ul1, "rx_packets"),
        leaked_before + 1,
        "plaintext leaked while agents replaced the filter ({sent} packets sent)"
    );
    assert_eq!(veil_filters(&node, &host).len(), 1);
}

// ---------------------------------------------------------------- into_pod

fn into_pod(dp: &Datapath, pkt: &[u8]) -> Run {
    run(dp.classifier(Hook::IntoPod).expect("into_pod"), pkt)
}

/// A routed frame arriving at a local pod from `src`, as the host-side veth
/// egress sees it.
fn routed4_to_pod(src: Ipv4Addr) -> Vec<u8> {
    let udp = udp_seg(IpAddr::V4(src), IpAddr::V4(POD_A), b"plaintext");
    eth(HOST_MAC, 0x0800, &ipv4(src, POD_A, 17, &udp))
}

#[test]
fn into_pod_refuses_plaintext_from_remote_sources_only_when_strict() {
    // setup(enabled, strict) with both set is what the agent writes once
    // the transition plan fails closed (acceptsPlaintext: false).
    let mut dp = setup(true, true);
    let remote_node = Ipv4Addr::new(198, 18, 0, 2);
    let mut ipc = BTreeMap::new();
    ipc.insert(IpAddr::V4(REMOTE_PEER), REMOTE_PEER_ID);
    ipc.insert(IpAddr::V4(remote_node), ID_REMOTE_NODE);
    dp.sync_ipcache(&ipc).expect("ipcache");

    // Remote pod in the IP cache, a remote node, and a remote pod CIDR
    // address the IP cache does not list (yet): all plaintext, all dropped.
    let mut dropped = 0;
    for src in [REMOTE_PEER, remote_node, REMOTE_NO_PEER] {
        let pkt = routed4_to_pod(src);
        let r = into_pod(&dp, &pkt);
        assert_eq!(r.ret, TC_ACT_SHOT, "plaintext from {src} must be dropped");
        dropped += 1;
        assert_eq!(count(&dp, Reason::DropPlaintextRefused).0, dropped, "{src}");
    }
    let src6: Ipv6Addr = REMOTE6.parse().unwrap();
    let dst6: Ipv6Addr = POD_A6.parse().unwrap();
    let udp = udp_seg(IpAddr::V6(src6), IpAddr::V6(dst6), b"x");
    let r = into_pod(&dp, &eth(HOST_MAC, 0x86dd, &ipv6(src6, dst6, 17, &udp)));
    assert_eq!(r.ret, TC_ACT_SHOT, "IPv6 plaintext from a remote pod");
    assert_eq!(count(&dp, Reason::DropPlaintextRefused).0, dropped + 1);

    // Local pod, host/underlay address, world: untouched, not counted.
    for src in [POD_B, NOT_A_POD, Ipv4Addr::new(192, 0, 2, 1)] {
        let pkt = routed4_to_pod(src);
        let r = into_pod(&dp, &pkt);
        assert_eq!(r.ret, TC_ACT_OK, "{src} must pass");
        assert_eq!(r.out, pkt, "{src}: a passed packet is not rewritten");
    }
    assert_eq!(count(&dp, Reason::DropPlaintextRefused).0, dropped + 1);
    // ARP passes.
    assert_eq!(
        into_pod(&dp, &eth(HOST_MAC, 0x0806, &[0; 28])).ret,
        TC_ACT_OK
    );

    // This node's own CIDR carved out of a covering cluster range: a local
    // address there is not remote.
    let mut remote = one_remote("10.244.0.0/16", false, false, 0);
    remote.insert(
        "10.244.0.0/24".parse::<IpNet>().unwrap(),
        RemoteValue {
            has_peer: false,
            local: true,
            node_id: 0,
        },
    );
    dp.sync_remote(&remote).expect("remote");
    let local_unlisted = Ipv4Addr::new(10, 244, 0, 99);
    assert_eq!(
        into_pod(&dp, &routed4_to_pod(local_unlisted)).ret,
        TC_ACT_OK
    );
    assert_eq!(
        into_pod(&dp, &routed4_to_pod(Ipv4Addr::new(10, 244, 7, 7))).ret,
        TC_ACT_SHOT,
        "the cluster range outside this node's CIDR is remote"
    );
}

#[test]
fn into_pod_passes_everything_while_plaintext_is_accepted() {
    // Non-strict, and strict while disabled (never written by the agent,
    // but the flag needs both): plaintext is accepted.
    for (enabled, strict) in [(true, false), (false, false), (false, true)] {
        let dp = setup(enabled, strict);
        for src in [REMOTE_PEER, REMOTE_NO_PEER, POD_B, NOT_A_POD] {
            let pkt = routed4_to_pod(src);
            let r = into_pod(&dp, &pkt);
            assert_eq!(r.ret, TC_ACT_OK, "enabled={enabled} strict={strict} {src}");
            assert_eq!(r.out, pkt);
        }
        assert_eq!(count(&dp, Reason::DropPlaintextRefused), (0, 0));
    }
}

#[test]
fn into_pod_flag_follows_runtime_config() {
    let mut dp = setup(true, false);
    let pkt = routed4_to_pod(REMOTE_PEER);
    assert_eq!(into_pod(&dp, &pkt).ret, TC_ACT_OK);
    let strict = DatapathConfig {
        enabled: true,
        strict: true,
        tun_ifindex: TUN_IFINDEX,
        tun_mtu: TUN_MTU,
    };
    dp.set_config(strict).expect("config");
    assert_eq!(into_pod(&dp, &pkt).ret, TC_ACT_SHOT);
    dp.set_config(DatapathConfig {
        strict: false,
        ..strict
    })
    .expect("config");
    assert_eq!(into_pod(&dp, &pkt).ret, TC_ACT_OK);
    assert_eq!(count(&dp, Reason::DropPlaintextRefused).0, 1);
}

#[test]
fn into_pod_malformed_headers_are_dropped_when_strict() {
    // (Truncated frames cannot be tested: BPF_PROG_TEST_RUN rejects them.)
    let good = routed4_to_pod(POD_B);
    let mut ihl = good.clone();
    ihl[14] = 0x43; // IHL below 5
    let mut tot = good.clone();
    tot[16..18].copy_from_slice(&1500u16.to_be_bytes()); // beyond the packet
    let dp = setup(true, true);
    for bad in [&ihl, &tot] {
        assert_eq!(into_pod(&dp, bad).ret, TC_ACT_SHOT);
    }
    assert_eq!(count(&dp, Reason::DropInvalid).0, 2);
    assert_eq!(into_pod(&dp, &good).ret, TC_ACT_OK);
    // Plaintext accepted: the program does not even parse.
    let dp = setup(true, false);
    assert_eq!(into_pod(&dp, &ihl).ret, TC_ACT_OK);
}

/// `into_pod` filter lines on `dev` egress.
fn into_pod_filters(ns: &Netns, dev: &str) -> usize {
    let out = ns.exec_ok(&["tc", "filter", "show", "dev", dev, "egress"]);
    out.lines().filter(|l| l.contains("into_pod")).count()
}

#[test]
fn into_pod_filter_is_attached_on_egress_and_outlives_the_agent() {
    require_root();
    let p = unique_prefix();
    let ns = Netns::new(format!("{p}x"));
    let host = format!("{p}h");
    let peer = format!("{p}p");
    ns.exec_ok(&[
        "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
    ]);
    for _ in 0..2 {
        let dev = host.clone();
        ns.run(move || {
            let mut dp = Datapath::load().expect("load");
            dp.attach_pod(&dev).expect("attach_pod");
        });
        assert_eq!(
            into_pod_filters(&ns, &host),
            1,
            "one into_pod after restart"
        );
        assert_eq!(veil_filters(&ns, &host).len(), 1);
    }
    let dev = host.clone();
    ns.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.detach_pod(&dev).expect("detach_pod");
    });
    assert_eq!(into_pod_filters(&ns, &host), 0);
}

/// Receiving side of strict mode through the kernel: a "remote node"
/// namespace sends UDP over the underlay straight to a local pod with a
/// remote pod's source address (as a sender without Veil steering, or a
/// forger on the underlay, would). The node routes it into the pod's veth,
/// where `into_pod` sees it on egress: delivered while plaintext is
/// accepted, dropped and counted once strict mode converged; a source the
/// IP cache does not know (a plain underlay host) is delivered either way.
#[test]
fn routed_plaintext_from_a_remote_pod_is_refused_once_strict() {
    require_root();
    let p = unique_prefix();
    let node = Netns::new(format!("{p}n"));
    let pod = Netns::new(format!("{p}q"));
    let remote = Netns::new(format!("{p}r"));
    let host = format!("{p}h");
    let (ul0, ul1) = (format!("{p}u0"), format!("{p}u1"));
    for ns in [&node, &pod, &remote] {
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            ns.exec_ok(&["sysctl", "-qw", s]);
        }
    }
    node.exec_ok(&[
        "ip",
        "link",
        "add",
        &host,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    node.exec_ok(&["ip", "link", "set", &host, "up"]);
    node.exec_ok(&["ip", "route", "add", "10.244.0.10/32", "dev", &host]);
    pod.exec_ok(&["ip", "addr", "add", "10.244.0.10/32", "dev", "eth0"]);
    pod.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    node.exec_ok(&[
        "ip",
        "link",
        "add",
        &ul0,
        "type",
        "veth",
        "peer",
        "name",
        &ul1,
        "netns",
        remote.name(),
    ]);
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/24", "dev", &ul0]);
    node.exec_ok(&["ip", "link", "set", &ul0, "up"]);
    remote.exec_ok(&["ip", "addr", "add", "198.18.0.2/24", "dev", &ul1]);
    // The remote pod's address, owned by the sender so it can bind to it.
    remote.exec_ok(&["ip", "addr", "add", "10.244.1.20/32", "dev", &ul1]);
    remote.exec_ok(&["ip", "link", "set", &ul1, "up"]);
    remote.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.0.0/24",
        "via",
        "198.18.0.1",
        "dev",
        &ul1,
    ]);

    let dev = host.clone();
    let host_ifindex = ifindex_in(&node, &host);
    let mut dp = node.run(move || {
        let mut dp = Datapath::load().expect("load");
        dp.set_config(DatapathConfig {
            enabled: true,
            strict: false,
            tun_ifindex: 0,
            tun_mtu: TUN_MTU,
        })
        .expect("config");
        let mut eps = BTreeMap::new();
        eps.insert(
            "10.244.0.10".parse().unwrap(),
            EndpointValue {
                identity: POD_A_ID,
                ifindex: host_ifindex,
            },
        );
        dp.sync_endpoints(&eps).expect("endpoints");
        let mut rem = BTreeMap::new();
        rem.insert(
            "10.244.1.0/24".parse::<IpNet>().unwrap(),
            RemoteValue {
                has_peer: true,
                local: false,
                node_id: 1,
            },
        );
        dp.sync_remote(&rem).expect("remote");
        let mut ipc = BTreeMap::new();
        ipc.insert("10.244.1.20".parse().unwrap(), REMOTE_PEER_ID);
        dp.sync_ipcache(&ipc).expect("ipcache");
        dp.attach_pod(&dev).expect("attach_pod");
        dp
    });

    let rx = pod.run(|| {
        let s = std::net::UdpSocket::bind("10.244.0.10:7777").expect("bind in pod");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        s
    });
    // Sends `tag` from `src` until the pod has it or `deadline` passes.
    let deliver = |src: &'static str, tag: &'static str, within: Duration| -> bool {
        let deadline = Instant::now() + within;
        let tx = remote.run(move || {
            std::net::UdpSocket::bind((src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"))
        });
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            tx.send_to(tag.as_bytes(), "10.244.0.10:7777")
                .expect("send from the remote node");
            if let Ok((n, _)) = rx.recv_from(&mut buf) {
                if &buf[..n] == tag.as_bytes() {
                    return true;
                }
            }
        }
        false
    };

    // Plaintext accepted (strict not converged): delivered.
    assert!(deliver("10.244.1.20", "accepted", Duration::from_secs(5)));
    assert_eq!(count(&dp, Reason::DropPlaintextRefused), (0, 0));

    dp.set_config(DatapathConfig {
        enabled: true,
        strict: true,
        tun_ifindex: 0,
        tun_mtu: TUN_MTU,
    })
    .expect("strict config");
    // Drained of anything still queued from the first phase.
    let mut buf = [0u8; 64];
    while rx.recv_from(&mut buf).is_ok() {}
    assert!(
        !deliver("10.244.1.20", "refused", Duration::from_secs(2)),
        "plaintext from a remote pod reached the pod after strict converged"
    );
    let (n, _) = count(&dp, Reason::DropPlaintextRefused);
    assert!(n >= 1, "the refusals must be counted, got {n}");
    // A source that is neither a remote pod nor a remote node still passes.
    assert!(deliver("198.18.0.2", "underlay", Duration::from_secs(5)));
    assert_eq!(count(&dp, Reason::DropPlaintextRefused).0, n);

    let dev = host.clone();
    node.run(move || dp.detach_pod(&dev).expect("detach"));
}
