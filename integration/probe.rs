//! `veil-probe`: a small, std-only traffic probe for the namespace tests and the demo.
//!
//! ```text
//! veil-probe tcp-server PORT
//! veil-probe udp-server PORT
//! veil-probe tcp-client IP PORT --bytes N --canary STR [--timeout-ms T]
//! veil-probe udp-client IP PORT --count N --canary STR --timeout-ms T [--size S] [--retries R]
//! veil-probe rr-server PORT
//! veil-probe rr-client IP PORT --count N [--size S] [--warmup W] [--timeout-ms T]
//! ```
//!
//! `rr-client` is the benchmark's request/response latency probe: one TCP
//! connection (Nagle off on both ends), `--count` sequential round trips of
//! `--size` bytes against `rr-server` (or `tcp-server`), each reply checked; it
//! prints the round-trip time percentiles in microseconds.
//!
//! Servers echo. Clients send payloads that carry the canary (so a capture on the
//! underlay can prove it never saw it in the clear), check that every byte came back
//! intact, print one summary line on stdout and exit 0 only on full success.
//! Every client is bounded in time: a dead path makes it fail, never hang.

use std::collections::BTreeSet;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

/// Every record of a TCP payload starts with the canary and its byte offset, so any
/// segment of more than a few hundred bytes carries the canary in full.
const RECORD: usize = 256;
/// UDP datagram header inside the payload: canary, then a 4-byte sequence number.
const SEQ_LEN: usize = 4;
const MAX_UDP: usize = 65507;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: veil-probe tcp-server PORT | udp-server PORT | \
     tcp-client IP PORT --bytes N --canary STR [--timeout-ms T] | \
     udp-client IP PORT --count N --canary STR --timeout-ms T [--size S] [--retries R] | \
     rr-server PORT | rr-client IP PORT --count N [--size S] [--warmup W] [--timeout-ms T]"
        .to_string()
}

fn run(args: &[String]) -> Result<(), String> {
    let (cmd, rest) = args.split_first().ok_or_else(usage)?;
    match cmd.as_str() {
        "tcp-server" => tcp_server(parse_port(rest.first())?),
        "rr-server" => rr_server(parse_port(rest.first())?),
        "rr-client" => {
            let (addr, opts) = parse_target(rest)?;
            let count: u32 = opts.required("--count")?;
            let size: usize = opts.optional("--size", 64)?;
            let warmup: u32 = opts.optional("--warmup", 100)?;
            let timeout = Duration::from_millis(opts.optional("--timeout-ms", 30_000)?);
            rr_client(addr, count, size, warmup, timeout)
        }
        "udp-server" => udp_server(parse_port(rest.first())?),
        "tcp-client" => {
            let (addr, opts) = parse_target(rest)?;
            let bytes: u64 = opts.required("--bytes")?;
            let canary = opts.canary()?;
            let timeout = Duration::from_millis(opts.optional("--timeout-ms", 10_000)?);
            tcp_client(addr, bytes, &canary, timeout)
        }
        "udp-client" => {
            let (addr, opts) = parse_target(rest)?;
            let count: u32 = opts.required("--count")?;
            let canary = opts.canary()?;
            let timeout = Duration::from_millis(opts.required("--timeout-ms")?);
            let size: usize = opts.optional("--size", canary.len() + SEQ_LEN)?;
            let retries: u32 = opts.optional("--retries", 0)?;
            udp_client(addr, count, &canary, timeout, size, retries)
        }
        _ => Err(format!("unknown command {cmd:?}; {}", usage())),
    }
}

fn parse_port(arg: Option<&String>) -> Result<u16, String> {
    let arg = arg.ok_or_else(usage)?;
    arg.parse()
        .map_err(|e| format!("invalid port {arg:?}: {e}"))
}

/// `--name value` pairs after the positional arguments.
struct Opts<'a>(&'a [String]);

impl Opts<'_> {
    fn get(&self, name: &str) -> Result<Option<&str>, String> {
        let mut it = self.0.iter();
        while let Some(flag) = it.next() {
            if !flag.starts_with("--") {
                return Err(format!("unexpected argument {flag:?}; {}", usage()));
            }
            let value = it
                .next()
                .ok_or_else(|| format!("option {flag} needs a value"))?;
            if flag == name {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    fn required<T: std::str::FromStr>(&self, name: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        let v = self
            .get(name)?
            .ok_or_else(|| format!("missing {name}; {}", usage()))?;
        v.parse().map_err(|e| format!("invalid {name} {v:?}: {e}"))
    }

    fn optional<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name)? {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| format!("invalid {name} {v:?}: {e}")),
        }
    }

    fn canary(&self) -> Result<Vec<u8>, String> {
        let c: String = self.required("--canary")?;
        if c.is_empty() || c.len() > RECORD - 8 {
            return Err(format!(
                "--canary must be 1..={} bytes, got {}",
                RECORD - 8,
                c.len()
            ));
        }
        Ok(c.into_bytes())
    }
}

fn parse_target(rest: &[String]) -> Result<(SocketAddr, Opts<'_>), String> {
    if rest.len() < 2 {
        return Err(usage());
    }
    let ip: IpAddr = rest[0]
        .parse()
        .map_err(|e| format!("invalid IP {:?}: {e}", rest[0]))?;
    let port = parse_port(Some(&rest[1]))?;
    Ok((SocketAddr::new(ip, port), Opts(&rest[2..])))
}

fn tcp_server(port: u16) -> Result<(), String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind tcp port {port}: {e}"))?;
    eprintln!("tcp-server listening on {port}");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = echo_tcp(stream) {
                        eprintln!("tcp-server: connection ended: {e}");
                    }
                });
            }
            Err(e) => eprintln!("tcp-server: accept: {e}"),
        }
    }
    Ok(())
}

fn echo_tcp(mut stream: TcpStream) -> io::Result<()> {
    // A client that vanishes must not pin a thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // Half-close from the client: everything has been echoed.
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

fn udp_server(port: u16) -> Result<(), String> {
    let sock =
        UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind udp port {port}: {e}"))?;
    eprintln!("udp-server listening on {port}");
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Err(e) = sock.send_to(&buf[..n], from) {
                    eprintln!("udp-server: reply to {from}: {e}");
                }
            }
            Err(e) => eprintln!("udp-server: recv: {e}"),
        }
    }
}

/// The byte at `offset` of a TCP payload: records of canary, offset, filler.
fn fill_tcp(canary: &[u8], start: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let off = start + i as u64;
        let rec = off / RECORD as u64;
        let pos = (off % RECORD as u64) as usize;
        *b = if pos < canary.len() {
            canary[pos]
        } else if pos < canary.len() + 8 {
            rec.to_be_bytes()[pos - canary.len()]
        } else {
            // Filler that differs per record, so a misplaced segment is noticed.
            (rec as u8).wrapping_mul(31).wrapping_add(pos as u8)
        };
    }
}

/// FNV-1a, printed so two runs can be compared by eye.
fn fnv1a(hash: u64, data: &[u8]) -> u64 {
    data.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn tcp_client(
    addr: SocketAddr,
    bytes: u64,
    canary: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut reader = stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let mut writer = stream;
    // Short socket timeouts let both halves notice the overall deadline.
    let tick = Some(Duration::from_millis(200));
    reader.set_read_timeout(tick).map_err(|e| e.to_string())?;
    writer.set_write_timeout(tick).map_err(|e| e.to_string())?;

    let canary_w = canary.to_vec();
    let sender = thread::spawn(move || -> Result<u64, String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        let mut hash = FNV_INIT;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            fill_tcp(&canary_w, sent, &mut buf[..n]);
            let mut done = 0;
            while done < n {
                if Instant::now() > deadline {
                    return Err(format!("send timed out after {sent} bytes"));
                }
                match writer.write(&buf[done..n]) {
                    Ok(0) => return Err("connection closed while sending".into()),
                    Ok(k) => done += k,
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            hash = fnv1a(hash, &buf[..n]);
            sent += n as u64;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(hash)
    });

    let mut received = 0u64;
    let mut hash = FNV_INIT;
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let result = loop {
        if Instant::now() > deadline {
            break Err(format!(
                "timed out after {:?}: {received}/{bytes} bytes echoed",
                timeout
            ));
        }
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if received + n as u64 > bytes {
                    break Err(format!(
                        "echo longer than sent: {} > {bytes}",
                        received + n as u64
                    ));
                }
                fill_tcp(canary, received, &mut want[..n]);
                if buf[..n] != want[..n] {
                    let at = buf[..n]
                        .iter()
                        .zip(&want[..n])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    break Err(format!("echo corrupted at byte {}", received + at as u64));
                }
                hash = fnv1a(hash, &buf[..n]);
                received += n as u64;
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => break Err(format!("receive: {e} after {received}/{bytes} bytes")),
        }
    };
    // The reader's deadline bounds the sender too (its writes time out).
    let sent_hash = match sender.join() {
        Ok(r) => r,
        Err(_) => Err("sender thread panicked".into()),
    };
    result?;
    let sent_hash = sent_hash?;
    if received != bytes {
        return Err(format!("echo short: {received}/{bytes} bytes"));
    }
    if sent_hash != hash {
        return Err(format!(
            "digest mismatch: sent {sent_hash:016x}, echoed {hash:016x}"
        ));
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ok tcp bytes={bytes} secs={secs:.3} mbit_per_s={:.1} digest={hash:016x}",
        (bytes as f64 * 8.0) / secs.max(1e-9) / 1e6
    );
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn udp_datagram(canary: &[u8], seq: u32, size: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(size);
    d.extend_from_slice(canary);
    d.extend_from_slice(&seq.to_be_bytes());
    let mut i = 0u8;
    while d.len() < size {
        d.push(i ^ seq as u8);
        i = i.wrapping_add(1);
    }
    d
}

fn udp_client(
    addr: SocketAddr,
    count: u32,
    canary: &[u8],
    timeout: Duration,
    size: usize,
    retries: u32,
) -> Result<(), String> {
    let min = canary.len() + SEQ_LEN;
    if size < min || size > MAX_UDP {
        return Err(format!("--size must be {min}..={MAX_UDP}, got {size}"));
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
    } else {
        "[::]:0".parse().map_err(|e| format!("{e}"))?
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    sock.connect(addr)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;

    let start = Instant::now();
    let mut missing: BTreeSet<u32> = (0..count).collect();
    let mut buf = vec![0u8; MAX_UDP];
    let mut errors = 0u32;
    // Takes one echo off the socket; false when none was waiting.
    let mut take = |missing: &mut BTreeSet<u32>, errors: &mut u32| -> bool {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let d = &buf[..n];
                if n >= min && d.starts_with(canary) {
                    let mut s = [0u8; SEQ_LEN];
                    s.copy_from_slice(&d[canary.len()..min]);
                    let seq = u32::from_be_bytes(s);
                    if missing.contains(&seq) && d == udp_datagram(canary, seq, size) {
                        missing.remove(&seq);
                    }
                }
                true
            }
            Err(e) if is_timeout(&e) => false,
            // ICMP errors (unreachable, frag-needed) surface as errors on a connected
            // socket; they are counted and the datagram stays missing.
            Err(_) => {
                *errors += 1;
                true
            }
        }
    };
    for _round in 0..=retries {
        // Echoes are drained while sending: left queued, a burst of large echoes
        // would overflow the socket's receive buffer and look like loss on the path.
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let round: Vec<u32> = missing.iter().copied().collect();
        for seq in round {
            if sock.send(&udp_datagram(canary, seq, size)).is_err() {
                errors += 1;
            }
            while take(&mut missing, &mut errors) {}
            // Pace a little so a burst does not overflow a queue on the path.
            if count > 16 {
                thread::sleep(Duration::from_micros(200));
            }
        }
        sock.set_nonblocking(false).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        while !missing.is_empty() && Instant::now() < deadline {
            take(&mut missing, &mut errors);
        }
        if missing.is_empty() {
            break;
        }
    }
    let received = count - missing.len() as u32;
    println!(
        "udp received={received} sent={count} size={size} errors={errors} secs={:.3}",
        start.elapsed().as_secs_f64()
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {count} datagrams did not come back",
            missing.len()
        ))
    }
}

/// The echo server for `rr-client`: like `tcp-server`, with Nagle off, so a reply
/// leaves as soon as it is written (the request/response latency must not include
/// the 40 ms delayed-ACK interplay of Nagle's algorithm, RFC 896 / RFC 1122 4.2.3.2).
fn rr_server(port: u16) -> Result<(), String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind tcp port {port}: {e}"))?;
    eprintln!("rr-server listening on {port}");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    let r = stream.set_nodelay(true).and_then(|()| echo_tcp(stream));
                    if let Err(e) = r {
                        eprintln!("rr-server: connection ended: {e}");
                    }
                });
            }
            Err(e) => eprintln!("rr-server: accept: {e}"),
        }
    }
    Ok(())
}

/// Largest request `rr-client` sends: one echo must fit the server's read buffer.
const MAX_RR: usize = 64 * 1024;

/// The request of round trip `seq`: its sequence number, then filler that
/// depends on it, so a stale or misplaced reply is detected.
fn rr_request(seq: u32, buf: &mut [u8]) {
    let s = seq.to_be_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = if i < SEQ_LEN {
            s[i]
        } else {
            (i as u8).wrapping_mul(7) ^ (seq as u8)
        };
    }
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest-rank method.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rr_client(
    addr: SocketAddr,
    count: u32,
    size: usize,
    warmup: u32,
    timeout: Duration,
) -> Result<(), String> {
    if !(SEQ_LEN..=MAX_RR).contains(&size) {
        return Err(format!("--size must be {SEQ_LEN}..={MAX_RR}, got {size}"));
    }
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    let start = Instant::now();
    let deadline = start + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    // Short socket timeouts let the loop notice the overall deadline.
    let tick = Some(Duration::from_millis(200));
    stream.set_read_timeout(tick).map_err(|e| e.to_string())?;
    stream.set_write_timeout(tick).map_err(|e| e.to_string())?;
    let mut req = vec![0u8; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count as usize);
    for seq in 0..warmup.saturating_add(count) {
        rr_request(seq, &mut req);
        let t = Instant::now();
        let mut done = 0;
        while done < size {
            if Instant::now() > deadline {
                return Err(format!("timed out sending round trip {seq}"));
            }
            match stream.write(&req[done..]) {
                Ok(0) => return Err("connection closed while sending".into()),
                Ok(k) => done += k,
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(format!("send round trip {seq}: {e}")),
            }
        }
        let mut got = 0;
        while got < size {
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for reply {seq} ({got}/{size} bytes)"
                ));
            }
            match stream.read(&mut resp[got..]) {
                Ok(0) => return Err(format!("connection closed during round trip {seq}")),
                Ok(k) => got += k,
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(format!("receive round trip {seq}: {e}")),
            }
        }
        let rtt = t.elapsed();
        if resp != req {
            return Err(format!("reply {seq} does not match its request"));
        }
        if seq >= warmup {
            samples.push(rtt);
        }
    }
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        "ok rr count={count} size={size} p50_us={:.1} p99_us={:.1} mean_us={mean:.1} max_us={:.1} secs={:.3}",
        us(percentile(&samples, 50.0)),
        us(percentile(&samples, 99.0)),
        us(percentile(&samples, 100.0)),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_micros(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn rr_requests_differ_per_round_trip() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        rr_request(1, &mut a);
        rr_request(2, &mut b);
        assert_ne!(a, b);
        assert_eq!(&a[..SEQ_LEN], &1u32.to_be_bytes());
    }
}
