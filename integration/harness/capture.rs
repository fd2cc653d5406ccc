//! Packet capture on the underlay and the leak analysis.
//!
//! One `tcpdump` per underlay bridge port: frames forwarded from one port to another
//! never pass the bridge device's own receive path, so capturing on `br0` (or `-i any`)
//! would miss them. `--immediate-mode -U` makes tcpdump write each packet as it comes;
//! it still delivers late, so [`Capture::stop`] waits a little before stopping it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::netns::Netns;
use super::process::Bg;

/// A running capture on a set of interfaces of one namespace.
#[derive(Debug)]
pub struct Capture {
    dir: tempfile::TempDir,
    dumps: Vec<(String, PathBuf, Bg)>,
}

impl Capture {
    /// Starts tcpdump on every `port` of `ns` and waits until each is listening.
    pub fn start(ns: &Netns, ports: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("veil-capture-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create capture dir: {e}"));
        let mut dumps = Vec::new();
        for port in ports {
            let file = dir.path().join(format!("{port}.pcap"));
            let log = dir.path().join(format!("{port}.log"));
            let mut cmd = ns.cmd("tcpdump");
            // -Z root: Debian's tcpdump otherwise drops to user `tcpdump` before opening
            // the output file, which it then cannot create in our 0700 temp dir.
            cmd.args([
                "-i",
                port,
                "-U",
                "--immediate-mode",
                "-n",
                "-Z",
                "root",
                // In immediate mode libpcap uses a ring of fixed-size slots, one per
                // packet, each as large as the snap length: with the default 256 KiB
                // and 2 MiB buffer that is 8 slots, and bursts overflowed it. 9000
                // bytes keeps every header and a jumbo frame whole (a GSO super-packet
                // is cut after 9000 bytes); 32 MiB gives ~3600 slots.
                "-s",
                "9000",
                "-B",
                "32768",
            ])
            .arg("-w")
            .arg(&file);
            let mut bg = Bg::spawn(format!("tcpdump -i {port}"), cmd, &log);
            bg.wait_for_log("listening on", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("capture on {port}: {e}"));
            dumps.push((port.clone(), file, bg));
        }
        Self { dir, dumps }
    }

    /// Waits for late packets, stops every tcpdump and analyses what they saw.
    pub fn stop(mut self, wg_port: u16, canary: &[u8]) -> Report {
        // tcpdump delivers packets late even in immediate mode; there is no signal to
        // wait for, so a short pause is the documented remedy.
        std::thread::sleep(Duration::from_millis(500));
        let mut files = Vec::new();
        let mut dropped = 0;
        for (port, file, bg) in &mut self.dumps {
            // SIGINT makes tcpdump flush and close the file cleanly.
            bg.signal(libc::SIGINT);
            if super::poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                bg.try_status()
            })
            .is_none()
            {
                bg.kill();
            }
            dropped += dropped_by_kernel(&bg.log());
            files.push((port.clone(), file.clone()));
        }
        let mut r = analyze_files(&files, wg_port, canary);
        r.dropped_by_kernel = dropped;
        if dropped > 0 {
            // Not a failure by itself (the packets seen are still judged), but the
            // claim is weaker: say so where a human reads the test output.
            eprintln!("capture: tcpdump dropped {dropped} packets; they were not inspected");
        }
        if !r.is_clean() {
            // What a human would look at first: tcpdump's own decoding.
            for (port, file) in &files {
                let text = tcpdump_text(file);
                let head: Vec<&str> = text.lines().take(TEXT_LINES).collect();
                r.tcpdump_head
                    .push_str(&format!("--- tcpdump -nn -r {port}.pcap (first lines)\n"));
                r.tcpdump_head.push_str(&head.join("\n"));
                r.tcpdump_head.push('\n');
            }
        }
        drop(self.dir);
        r
    }
}

/// What a capture saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub total: usize,
    pub per_port: BTreeMap<String, usize>,
    pub arp: usize,
    /// UDP to or from the WireGuard port, including later fragments of such datagrams.
    pub wireguard: usize,
    /// Later fragments whose first fragment was not captured (tcpdump drops under
    /// load), between two addresses that exchanged WireGuard datagrams in this capture.
    /// Pod traffic sent in plaintext carries pod addresses in its outer header, so a
    /// UDP fragment between node addresses is node-to-node UDP, which in these tests is
    /// only WireGuard; they are still searched for the canary.
    pub wireguard_unmatched_fragments: usize,
    /// Packets tcpdump reported as dropped by the kernel (its capture buffer was full).
    pub dropped_by_kernel: u64,
    /// ICMP errors quoting a WireGuard datagram (e.g. port unreachable while an agent
    /// is down): they carry no plaintext, only the head of ciphertext.
    pub wireguard_icmp_errors: usize,
    /// Everything else, one line each (capped).
    pub other: Vec<String>,
    pub other_count: usize,
    /// Packets with a pod address (10.244.0.0/16) in the outer IP header.
    pub pod_addr_outer: Vec<String>,
    pub pod_addr_outer_count: usize,
    /// Frames containing the canary anywhere.
    pub canary_frames: usize,
    pub canary_examples: Vec<String>,
    /// The start of `tcpdump -nn -r` of each port's file, filled when not clean.
    pub tcpdump_head: String,
}

const EXAMPLES: usize = 10;
const TEXT_LINES: usize = 20;

impl Report {
    /// True when nothing but WireGuard (and ARP, and ICMP errors about WireGuard
    /// datagrams) crossed the underlay, no pod address appeared outside, and the canary
    /// was never seen.
    pub fn is_clean(&self) -> bool {
        self.other_count == 0 && self.pod_addr_outer_count == 0 && self.canary_frames == 0
    }

    /// Panics with the whole report unless [`Report::is_clean`] and at least one
    /// WireGuard packet was captured (a capture that saw nothing proves nothing).
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.is_clean() && self.wireguard > 0,
            "{what}: capture is not clean (or saw no WireGuard traffic):\n{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "total={} per_port={:?} arp={} wireguard={} wireguard_unmatched_fragments={} \
             wireguard_icmp_errors={} other={} pod_addr_outer={} canary_frames={} \
             dropped_by_kernel={}",
            self.total,
            self.per_port,
            self.arp,
            self.wireguard,
            self.wireguard_unmatched_fragments,
            self.wireguard_icmp_errors,
            self.other_count,
            self.pod_addr_outer_count,
            self.canary_frames,
            self.dropped_by_kernel
        )?;
        for o in &self.other {
            writeln!(f, "  other: {o}")?;
        }
        for o in &self.pod_addr_outer {
            writeln!(f, "  pod address outside: {o}")?;
        }
        for o in &self.canary_examples {
            writeln!(f, "  canary: {o}")?;
        }
        f.write_str(&self.tcpdump_head)
    }
}

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub port: String,
    pub data: Vec<u8>,
}

/// Reads a classic pcap file (the format `tcpdump -w` writes): a 24-byte global
/// header whose magic gives byte order and time resolution, then records of a
/// 16-byte header (ts_sec, ts_frac, incl_len, orig_len) and `incl_len` bytes.
pub fn read_pcap(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse_pcap(&data).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_pcap(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if data.len() < 24 {
        return Err(format!("pcap too short ({} bytes)", data.len()));
    }
    let magic = [data[0], data[1], data[2], data[3]];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(format!("not a pcap file (magic {magic:02x?})")),
    };
    let u32_at = |b: &[u8], off: usize| -> u32 {
        let w = [b[off], b[off + 1], b[off + 2], b[off + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = u32_at(data, 20) & 0x0fff_ffff;
    if linktype != 1 {
        return Err(format!("link type {linktype}, expected 1 (Ethernet)"));
    }
    let mut frames = Vec::new();
    let mut off = 24;
    while off < data.len() {
        if off + 16 > data.len() {
            // tcpdump killed mid-record: keep what is complete.
            break;
        }
        let incl = u32_at(data, off + 8) as usize;
        let start = off + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= data.len()) else {
            break;
        };
        frames.push(data[start..end].to_vec());
        off = end;
    }
    Ok(frames)
}

fn analyze_files(files: &[(String, PathBuf)], wg_port: u16, canary: &[u8]) -> Report {
    let mut frames = Vec::new();
    for (port, file) in files {
        let got = read_pcap(file).unwrap_or_else(|e| panic!("capture on {port}: {e}"));
        frames.extend(got.into_iter().map(|data| Frame {
            port: port.clone(),
            data,
        }));
    }
    analyze(&frames, wg_port, canary)
}

/// Decoded outer headers of an Ethernet frame, as far as the analysis needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outer {
    Arp,
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        id: u16,
        /// Fragment offset in 8-byte units; non-zero means no transport header here.
        frag_off: u16,
        more_frags: bool,
        /// Offset of the transport header in the frame.
        l4: usize,
    },
    Ipv6,
    Other(u16),
    Truncated,
}

fn decode(frame: &[u8]) -> Outer {
    if frame.len() < 14 {
        return Outer::Truncated;
    }
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut l3 = 14;
    // 802.1Q / 802.1ad tags.
    while (ethertype == 0x8100 || ethertype == 0x88a8) && frame.len() >= l3 + 4 {
        ethertype = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]);
        l3 += 4;
    }
    match ethertype {
        0x0806 => Outer::Arp,
        0x86dd => Outer::Ipv6,
        0x0800 => {
            let ip = &frame[l3..];
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return Outer::Truncated;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20 || ip.len() < ihl {
                return Outer::Truncated;
            }
            let flags_frag = u16::from_be_bytes([ip[6], ip[7]]);
            Outer::Ipv4 {
                src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                proto: ip[9],
                id: u16::from_be_bytes([ip[4], ip[5]]),
                frag_off: flags_frag & 0x1fff,
                more_frags: flags_frag & 0x2000 != 0,
                l4: l3 + ihl,
            }
        }
        t => Outer::Other(t),
    }
}

fn is_pod_addr(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 10 && o[1] == 244
}

fn udp_ports(frame: &[u8], l4: usize) -> Option<(u16, u16)> {
    let u = frame.get(l4..l4 + 4)?;
    Some((
        u16::from_be_bytes([u[0], u[1]]),
        u16::from_be_bytes([u[2], u[3]]),
    ))
}

/// ICMP destination-unreachable / time-exceeded / parameter-problem quoting a UDP
/// datagram to or from `wg_port` (RFC 792: the quote is the IP header + 8 bytes).
fn is_icmp_error_about_wg(frame: &[u8], l4: usize, wg_port: u16) -> bool {
    let Some(icmp) = frame.get(l4..) else {
        return false;
    };
    if icmp.len() < 8 + 20 || !matches!(icmp[0], 3 | 11 | 12) {
        return false;
    }
    let inner = &icmp[8..];
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    if inner[0] >> 4 != 4 || ihl < 20 || inner[9] != 17 {
        return false;
    }
    match inner.get(ihl..ihl + 4) {
        Some(u) => {
            let sp = u16::from_be_bytes([u[0], u[1]]);
            let dp = u16::from_be_bytes([u[2], u[3]]);
            sp == wg_port || dp == wg_port
        }
        None => false,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn describe(f: &Frame, o: &Outer) -> String {
    match o {
        Outer::Ipv4 {
            src,
            dst,
            proto,
            frag_off,
            l4,
            ..
        } => {
            let ports = if matches!(proto, 6 | 17) && *frag_off == 0 {
                udp_ports(&f.data, *l4)
                    .map(|(s, d)| format!(" ports {s}->{d}"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            format!(
                "[{}] IPv4 {src} -> {dst} proto {proto}{ports} frag_off {frag_off} len {}",
                f.port,
                f.data.len()
            )
        }
        other => format!("[{}] {other:?} len {}", f.port, f.data.len()),
    }
}

/// Classifies every frame. Later IPv4 fragments carry no UDP header, so they count as
/// WireGuard when their first fragment (same src, dst, protocol, id) was WireGuard.
pub fn analyze(frames: &[Frame], wg_port: u16, canary: &[u8]) -> Report {
    let decoded: Vec<Outer> = frames.iter().map(|f| decode(&f.data)).collect();
    let mut wg_datagrams = HashSet::new();
    let mut wg_pairs = HashSet::new();
    for (f, o) in frames.iter().zip(&decoded) {
        if let Outer::Ipv4 {
            src,
            dst,
            proto: 17,
            id,
            frag_off: 0,
            l4,
            ..
        } = *o
        {
            if let Some((sp, dp)) = udp_ports(&f.data, l4) {
                if sp == wg_port || dp == wg_port {
                    wg_datagrams.insert((src, dst, id));
                    wg_pairs.insert((src, dst));
                }
            }
        }
    }
    let mut r = Report::default();
    for (f, o) in frames.iter().zip(&decoded) {
        r.total += 1;
        *r.per_port.entry(f.port.clone()).or_default() += 1;
        if find(&f.data, canary) {
            r.canary_frames += 1;
            if r.canary_examples.len() < EXAMPLES {
                r.canary_examples.push(describe(f, o));
            }
        }
        let mut other = false;
        match *o {
            Outer::Arp => r.arp += 1,
            Outer::Ipv4 {
                src,
                dst,
                proto,
                id,
                frag_off,
                more_frags,
                l4,
            } => {
                if is_pod_addr(src) || is_pod_addr(dst) {
                    r.pod_addr_outer_count += 1;
                    if r.pod_addr_outer.len() < EXAMPLES {
                        r.pod_addr_outer.push(describe(f, o));
                    }
                }
                let fragment = frag_off != 0 || more_frags;
                let wg = proto == 17
                    && if frag_off == 0 {
                        udp_ports(&f.data, l4)
                            .is_some_and(|(sp, dp)| sp == wg_port || dp == wg_port)
                    } else {
                        fragment && wg_datagrams.contains(&(src, dst, id))
                    };
                if wg {
                    r.wireguard += 1;
                } else if proto == 17 && frag_off != 0 && wg_pairs.contains(&(src, dst)) {
                    r.wireguard_unmatched_fragments += 1;
                } else if proto == 1
                    && frag_off == 0
                    && is_icmp_error_about_wg(&f.data, l4, wg_port)
                {
                    r.wireguard_icmp_errors += 1;
                } else {
                    other = true;
                }
            }
            Outer::Ipv6 | Outer::Other(_) | Outer::Truncated => other = true,
        }
        if other {
            r.other_count += 1;
            if r.other.len() < EXAMPLES {
                r.other.push(describe(f, o));
            }
        }
    }
    r
}

/// The "N packets dropped by kernel" count tcpdump prints when it stops (0 if absent).
fn dropped_by_kernel(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.trim().strip_suffix(" packets dropped by kernel"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// `tcpdump -r FILE -nn` of a capture, for a human reading a failure.
pub fn tcpdump_text(file: &Path) -> String {
    Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, id: u16, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0];
        ip.extend_from_slice(&id.to_be_bytes());
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, proto, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(l4);
        eth(0x0800, &ip)
    }

    fn udp(sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = sp.to_be_bytes().to_vec();
        u.extend_from_slice(&dp.to_be_bytes());
        u.extend_from_slice(&[0, 0, 0, 0]);
        u.extend_from_slice(payload);
        u
    }

    fn frames(v: Vec<Vec<u8>>) -> Vec<Frame> {
        v.into_iter()
            .map(|data| Frame {
                port: "n1".into(),
                data,
            })
            .collect()
    }

    #[test]
    fn classifies_wireguard_fragments_arp_and_leaks() {
        let (a, b) = ([198, 18, 0, 1], [198, 18, 0, 2]);
        let fs = frames(vec![
            eth(0x0806, &[0; 28]),
            ipv4(a, b, 17, 7, 0x2000, &udp(51820, 51820, b"ciphertext")),
            ipv4(a, b, 17, 7, 185, b"more ciphertext"),
            ipv4(a, b, 17, 8, 185, b"orphan fragment"),
            ipv4(a, [198, 18, 0, 3], 17, 8, 185, b"orphan, no wireguard seen"),
            ipv4(
                [10, 244, 1, 10],
                [10, 244, 2, 10],
                17,
                9,
                0,
                &udp(40000, 7002, b"xxCANARYxx"),
            ),
            eth(0x86dd, &[0; 40]),
        ]);
        let r = analyze(&fs, 51820, b"CANARY");
        assert_eq!(r.total, 7);
        assert_eq!(r.arp, 1);
        assert_eq!(r.wireguard, 2);
        assert_eq!(r.wireguard_unmatched_fragments, 1);
        assert_eq!(r.other_count, 3, "{r}");
        assert_eq!(r.pod_addr_outer_count, 1);
        assert_eq!(r.canary_frames, 1);
        assert!(!r.is_clean());
    }

    #[test]
    fn icmp_error_quoting_wireguard_is_not_plaintext() {
        let quoted = ipv4(
            [198, 18, 0, 1],
            [198, 18, 0, 2],
            17,
            1,
            0,
            &udp(51820, 51820, &[]),
        );
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[14..]);
        let fs = frames(vec![
            ipv4([198, 18, 0, 2], [198, 18, 0, 1], 1, 2, 0, &icmp),
            ipv4(
                [198, 18, 0, 1],
                [198, 18, 0, 2],
                17,
                1,
                0,
                &udp(51820, 51820, b"c"),
            ),
        ]);
        let r = analyze(&fs, 51820, b"CANARY");
        assert_eq!(
            (r.wireguard, r.wireguard_icmp_errors, r.other_count),
            (1, 1, 0)
        );
        assert!(r.is_clean());
    }

    #[test]
    fn reads_kernel_drops_from_tcpdump_log() {
        let log = "listening on n1, link-type EN10MB\n120 packets captured\n\
                   125 packets received by filter\n5 packets dropped by kernel\n";
        assert_eq!(dropped_by_kernel(log), 5);
        assert_eq!(dropped_by_kernel("listening on n1\n"), 0);
    }

    #[test]
    fn parses_pcap_and_rejects_garbage() {
        let mut p = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&65535u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        let frame = eth(0x0806, &[1; 28]);
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        p.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        p.extend_from_slice(&frame);
        // A truncated trailing record is ignored, not a panic.
        p.extend_from_slice(&[0; 10]);
        assert_eq!(parse_pcap(&p).unwrap(), vec![frame]);
        assert!(parse_pcap(b"not a pcap file at all, really").is_err());
        assert!(parse_pcap(&[]).is_err());
    }
}
