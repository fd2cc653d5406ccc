//! Where the agent's memory goes during start: one DEBUG line per phase with
//! the resident set now (`VmRSS`) and its peak so far (`VmHWM`), both read
//! from `/proc/self/status` (proc(5)). The memory bench (issue 6) reads these
//! lines from the agent log to say which phase set the peak.
//!
//! Reading the file costs one small allocation and no page of its own worth
//! counting; nothing here changes what the agent does.

use tracing::debug;

/// The two `/proc/self/status` figures, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// Parses the `VmRSS` and `VmHWM` lines of a `/proc/PID/status` text
/// (`VmRSS:\t   1234 kB`); `None` if either is missing or malformed.
pub fn parse_status(status: &str) -> Option<MemorySample> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(MemorySample {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
    })
}

/// This process's figures now; `None` without procfs.
pub fn sample() -> Option<MemorySample> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Logs `phase` (one word, `[a-z_]`) with the figures, at DEBUG.
pub fn phase(phase: &'static str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    if let Some(s) = sample() {
        debug!(
            phase,
            vm_rss_kib = s.rss_kib,
            vm_hwm_kib = s.hwm_kib,
            "memory"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_peak_from_proc_status() {
        let status = "Name:\tveil-agent\nVmPeak:\t  999999 kB\nVmHWM:\t   47204 kB\n\
                      VmRSS:\t   33075 kB\nRssAnon:\t   20000 kB\n";
        assert_eq!(
            parse_status(status),
            Some(MemorySample {
                rss_kib: 33075,
                hwm_kib: 47204
            })
        );
    }

    #[test]
    fn missing_or_malformed_fields_give_none() {
        assert_eq!(parse_status("VmRSS:\t 10 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\t ten kB\nVmHWM:\t 10 kB\n"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn this_process_has_figures_and_the_peak_is_at_least_the_current() {
        let s = sample().expect("/proc/self/status has VmRSS and VmHWM");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
    }
}
