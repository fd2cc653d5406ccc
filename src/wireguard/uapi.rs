//! The WireGuard cross-platform userspace API (<https://www.wireguard.com/xplatform/>)
//! on a Unix socket, so that the stock `wg show` / `wg showconf` work against
//! the engine exactly as against wireguard-go.
//!
//! The protocol is line based: a request is `get=1` or `set=1` (followed by
//! `key=value` lines for set) and ends with an empty line; the reply is
//! `key=value` lines, then `errno=N` and an empty line. Keys are lowercase hex.
//!
//! Only `get` is served. The interface is owned by veil-agent, which rewrites
//! the whole peer set from cluster state; a `set` would be silently undone, so
//! it is refused with `errno=1` (EPERM) instead.
//!
//! The server runs on its own thread and handles one client at a time with
//! short timeouts and a size cap: a slow or hostile client can delay other
//! `wg` invocations by a second or two, but never the packet path.

use super::PeerStats;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Errors in a UAPI request. These are replied to the client, never panicked on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    #[error("empty UAPI request")]
    Empty,
    #[error("UAPI request line {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("unknown UAPI operation {0:?} (expected get=1 or set=1)")]
    UnknownOperation(String),
    #[error("UAPI get request has unexpected extra line {0:?}")]
    TrailingLine(String),
    #[error("UAPI request exceeds {0} bytes")]
    TooLarge(usize),
    #[error("UAPI request is not UTF-8")]
    NotUtf8,
}

impl UapiError {
    /// The errno put on the wire: EINVAL for malformed requests (as wireguard-go).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Get,
    /// A configuration change; its lines are kept only to log what was refused.
    Set {
        lines: usize,
    },
}

/// Largest request we read before giving up on a client (a `set` for thousands of
/// peers would be larger, but we refuse sets anyway).
pub const MAX_REQUEST: usize = 256 * 1024;

/// Parses the lines of one request (without the terminating empty line).
pub fn parse_request(lines: &[&str]) -> Result<Request, UapiError> {
    let (first, rest) = lines.split_first().ok_or(UapiError::Empty)?;
    let (key, value) = first
        .split_once('=')
        .ok_or_else(|| UapiError::NotKeyValue(truncate(first)))?;
    match (key, value) {
        ("get", "1") => match rest.first() {
            Some(extra) => Err(UapiError::TrailingLine(truncate(extra))),
            None => Ok(Request::Get),
        },
        ("set", "1") => {
            if let Some(bad) = rest.iter().find(|l| !l.contains('=')) {
                return Err(UapiError::NotKeyValue(truncate(bad)));
            }
            Ok(Request::Set { lines: rest.len() })
        }
        _ => Err(UapiError::UnknownOperation(truncate(first))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What `get=1` reports about one peer.
#[derive(Clone, Debug)]
pub struct PeerView {
    pub stats: PeerStats,
    pub persistent_keepalive: Option<u16>,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn endpoint_string(ep: SocketAddr) -> String {
    // `SocketAddr`'s Display already brackets v6 ("[fd00::1]:51820"), the form `wg` parses.
    match ep {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())).to_string(),
            None => ep.to_string(),
        },
        SocketAddr::V4(_) => ep.to_string(),
    }
}

/// Formats the complete reply to `get=1`, including `errno=0` and the final
/// empty line. Pure, so the exact wire format is unit-tested.
pub fn format_get(private_key: &[u8; 32], listen_port: u16, peers: &[PeerView]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", hex(private_key));
    let _ = writeln!(out, "listen_port={listen_port}");
    for p in peers {
        let s = &p.stats;
        // public_key must come first: it starts a new peer section for the parser.
        let _ = writeln!(out, "public_key={}", hex(&s.public_key));
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = s.endpoint {
            let _ = writeln!(out, "endpoint={}", endpoint_string(ep));
        }
        let (sec, nsec) = s
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", s.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", s.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for net in &s.allowed_ips {
            let _ = writeln!(out, "allowed_ip={}", net.trunc());
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// Formats an error reply.
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// What the server needs from the engine to answer `get`.
pub trait UapiSource {
    fn private_key(&self) -> [u8; 32];
    fn listen_port(&self) -> u16;
    fn peer_views(&self) -> Vec<PeerView>;
}

/// Per-client budget: `wg` writes its request at once and reads the reply, so a
/// client still talking after this long is stuck or hostile and is cut off.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// A reader that fails with `TimedOut` once a fixed deadline has passed, so a
/// client trickling one byte at a time cannot hold the server forever.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Reads one request's lines; `Ok(None)` on a clean EOF before any line.
fn read_request<R: BufRead>(
    reader: &mut R,
    line: &mut String,
) -> Result<Option<Vec<String>>, UapiError> {
    let mut lines = Vec::new();
    let mut total = 0usize;
    loop {
        line.clear();
        // Cap each read so one endless line cannot grow memory without bound.
        let mut limited = std::io::Read::take(&mut *reader, (MAX_REQUEST - total + 1) as u64);
        let n = match limited.read_line(line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(UapiError::NotUtf8)
            }
            // A client that timed out or reset mid-request gets no reply.
            Err(_) => return Ok(None),
        };
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                // EOF before the empty line: treat what we have as the request,
                // as `wg` always terminates its requests properly.
                Ok(Some(lines))
            };
        }
        total += n;
        if total > MAX_REQUEST {
            return Err(UapiError::TooLarge(MAX_REQUEST));
        }
        let trimmed = line.trim_end_matches('\n');
        if trimmed.is_empty() {
            if lines.is_empty() {
                // Stray empty line between requests: wireguard-go skips it too.
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(trimmed.to_owned());
    }
}

/// Serves one client connection until EOF, error or `budget` has passed.
pub fn serve_client<S: UapiSource>(stream: UnixStream, source: &S, iface: &str, budget: Duration) {
    let _ = stream.set_write_timeout(Some(budget));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(iface, error = %e, "UAPI: cannot clone client stream");
            return;
        }
    };
    let mut reader = BufReader::new(DeadlineReader {
        stream,
        deadline: Instant::now() + budget,
    });
    let mut line = String::new();
    loop {
        let reply = match read_request(&mut reader, &mut line) {
            Ok(None) => return,
            Ok(Some(lines)) => {
                let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
                match parse_request(&refs) {
                    Ok(Request::Get) => format_get(
                        &source.private_key(),
                        source.listen_port(),
                        &source.peer_views(),
                    ),
                    Ok(Request::Set { lines }) => {
                        tracing::warn!(
                            iface,
                            lines,
                            "UAPI: refusing set request: the interface is managed by \
                             veil-agent from cluster state; change the cluster instead"
                        );
                        format_errno(libc::EPERM)
                    }
                    Err(e) => {
                        tracing::warn!(iface, error = %e, "UAPI: malformed request");
                        let _ = writer.write_all(format_errno(e.errno()).as_bytes());
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(iface, error = %e, "UAPI: malformed request");
                let _ = writer.write_all(format_errno(e.errno()).as_bytes());
                return;
            }
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> PeerView {
        PeerView {
            stats: PeerStats {
                public_key: [0xab; 32],
                endpoint: Some("[::ffff:198.18.0.2]:51820".parse().unwrap()),
                allowed_ips: vec![
                    "10.244.2.0/24".parse().unwrap(),
                    "fd00:10:244:2::7/64".parse().unwrap(),
                ],
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123)),
                rx_bytes: 10,
                tx_bytes: 20,
                has_session: true,
                session_key: Some([0xcd; 32]),
            },
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn get_reply_format() {
        let mut v2 = view();
        v2.stats.public_key = [1; 32];
        v2.stats.endpoint = Some("[fd00::2]:51820".parse().unwrap());
        v2.stats.allowed_ips.clear();
        v2.stats.last_handshake = None;
        v2.persistent_keepalive = None;
        let text = format_get(&[0x0f; 32], 51820, &[view(), v2]);
        let expected = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={}\nprotocol_version=1\nendpoint=198.18.0.2:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123\n\
             tx_bytes=20\nrx_bytes=10\npersistent_keepalive_interval=25\n\
             allowed_ip=10.244.2.0/24\nallowed_ip=fd00:10:244:2::/64\n\
             public_key={}\nprotocol_version=1\nendpoint=[fd00::2]:51820\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=20\nrx_bytes=10\npersistent_keepalive_interval=0\n\
             errno=0\n\n",
            "0f".repeat(32),
            "ab".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(text, expected);
        assert_eq!(format_get(&[0; 32], 1, &[]).matches('\n').count(), 4);
    }

    #[test]
    fn request_parsing() {
        assert_eq!(parse_request(&["get=1"]), Ok(Request::Get));
        assert_eq!(
            parse_request(&["set=1", "private_key=00", "replace_peers=true"]),
            Ok(Request::Set { lines: 2 })
        );
        assert_eq!(parse_request(&[]), Err(UapiError::Empty));
        assert!(matches!(
            parse_request(&["get"]),
            Err(UapiError::NotKeyValue(_))
        ));
        assert!(matches!(
            parse_request(&["get=2"]),
            Err(UapiError::UnknownOperation(_))
        ));
        assert!(matches!(
            parse_request(&["delete=1"]),
            Err(UapiError::UnknownOperation(_))
        ));
        assert!(matches!(
            parse_request(&["get=1", "x=y"]),
            Err(UapiError::TrailingLine(_))
        ));
        assert!(matches!(
            parse_request(&["set=1", "garbage"]),
            Err(UapiError::NotKeyValue(_))
        ));
        // Error messages never echo unbounded client input.
        let long = format!("{}=1", "x".repeat(10_000));
        match parse_request(&[long.as_str()]) {
            Err(UapiError::UnknownOperation(s)) => assert_eq!(s.len(), 64),
            other => panic!("unexpected {other:?}"),
        }
    }

    struct Fixed;
    impl UapiSource for Fixed {
        fn private_key(&self) -> [u8; 32] {
            [7; 32]
        }
        fn listen_port(&self) -> u16 {
            4242
        }
        fn peer_views(&self) -> Vec<PeerView> {
            vec![view()]
        }
    }

    fn exchange(request: &[u8]) -> String {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || serve_client(server, &Fixed, "test0", CLIENT_DEADLINE));
        let mut w = client.try_clone().expect("clone");
        let request = request.to_vec();
        // The server may hang up before an oversized request is fully written.
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&request);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut out = String::new();
        let mut c = client;
        c.read_to_string(&mut out).expect("read reply");
        t.join().expect("server thread");
        writer.join().expect("writer thread");
        out
    }

    #[test]
    fn server_conversation() {
        let get = exchange(b"get=1\n\n");
        assert!(get.starts_with(&format!(
            "private_key={}\nlisten_port=4242\n",
            "07".repeat(32)
        )));
        assert!(get.ends_with("errno=0\n\n"));
        // Two requests on one connection are both answered.
        let two = exchange(b"get=1\n\nset=1\nlisten_port=1\n\n");
        assert!(two.contains("errno=0\n\n"));
        assert!(two.ends_with("errno=1\n\n"));
        assert_eq!(exchange(b"bogus\n\n"), "errno=22\n\n");
        assert_eq!(exchange(b"\xff\xfe\n\n"), "errno=22\n\n");
        assert_eq!(exchange(b""), "");
        let mut huge = b"set=1\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST + 10));
        assert_eq!(exchange(&huge), "errno=22\n\n");
    }

    #[test]
    fn slow_client_is_cut_off() {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            serve_client(server, &Fixed, "test0", Duration::from_millis(300))
        });
        let mut c = client;
        // Half a request, then silence (the connection stays open).
        c.write_all(b"get=1\n").expect("write");
        t.join().expect("server thread");
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // The incomplete request is not answered; the connection is closed.
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        assert_eq!(out, "");
    }
}
