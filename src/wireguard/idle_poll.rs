//! Bounded polling before an engine thread sleeps: a user-space halt-poll.
//!
//! A request/response round trip crosses the engine four times (tun->udp and
//! udp->tun on each node), and each crossing wakes a sleeping thread. When the
//! thread's vCPU has gone idle, that wakeup is what costs: in a guest without
//! halt polling an idle vCPU halts at once, and waking it is a VM exit round
//! trip of tens of µs (measured in ARCHITECTURE.md, "Where the
//! request/response latency goes"). A thread that keeps polling its
//! descriptor for a short while before it sleeps keeps its vCPU awake and
//! takes the next packet without any wakeup.
//!
//! Polling must cost nothing when it cannot pay off, so four rules bound it:
//! - the window adapts per thread, like the kernel's cpuidle haltpoll
//!   governor: it grows while the thread's waits end within the bound (a
//!   steady exchange of packets) and shrinks when they are longer (an idle
//!   link: no CPU is burnt waiting for traffic that does not come);
//! - each turn of the loop yields the CPU (`sched_yield`), so anything
//!   runnable on this CPU runs first, and a turn that comes back late means
//!   the thread was preempted: polling stops for `COOLDOWN`;
//! - any packet thread busy more than `BUSY_PERCENT` of the time turns
//!   polling off for all: the engine is throughput-bound, its CPUs are awake
//!   anyway and a wakeup is cheap;
//! - an audit after every `AUDIT` of polling turns it off for
//!   `WASTE_COOLDOWN` when it cost more than the bound per packet caught.
//!
//! Together they keep polling to CPU time that, as far as the engine can tell,
//! nothing else wants. Measurements: ARCHITECTURE.md, "Idle polling".

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first non-zero window, and the smallest one kept when shrinking.
const START: Duration = Duration::from_micros(25);
/// A gap this long between two turns of the loop means the thread was not
/// running for a while: something else needed the CPU (or the host took it).
/// Shorter gaps are normal when polling threads and the pods share a vCPU.
const PREEMPT_GAP: Duration = Duration::from_micros(200);
/// How long polling stays off after the thread was preempted while polling.
const COOLDOWN: Duration = Duration::from_millis(10);
/// Polling is audited after this much of it: if it cost more than the bound
/// per caught packet, most polls ran out without catching anything (packets
/// come irregularly, e.g. from a sender that is itself short of CPU), and
/// polling stays off for [`WASTE_COOLDOWN`].
const AUDIT: Duration = Duration::from_millis(2);
const WASTE_COOLDOWN: Duration = Duration::from_millis(100);
/// Period over which a thread's busy share is measured and published.
const LOAD_PERIOD: Duration = Duration::from_millis(1);
/// Above this busy share (percent) of any packet thread the engine is
/// throughput-bound: its CPUs are awake anyway, so a wakeup is cheap and
/// polling would only take CPU from the packets.
const BUSY_PERCENT: u8 = 50;

/// How one wait ended, for the window's adaptation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The descriptor became readable after `polled` of polling.
    Caught { polled: Duration },
    /// Polling (of `polled`, possibly zero) found nothing; the thread then
    /// slept for `slept` before the descriptor became readable or the sleep
    /// timed out.
    Slept { polled: Duration, slept: Duration },
    /// The thread lost its CPU while polling.
    Preempted,
}

/// What the engine's packet threads share about polling: each one's busy
/// share, in percent of the last `LOAD_PERIOD` in which it waited at least
/// once, and their [`Stats`] (published once per period).
#[derive(Debug)]
pub struct PollState {
    load: Box<[AtomicU8]>,
    caught: AtomicU64,
    slept: AtomicU64,
    preempted: AtomicU64,
    polled_ns: AtomicU64,
}

impl Default for PollState {
    /// For one tun->udp and one udp->tun thread.
    fn default() -> PollState {
        PollState::new(2)
    }
}

impl PollState {
    /// For `threads` packet threads (at least one slot).
    pub fn new(threads: usize) -> PollState {
        PollState {
            load: (0..threads.max(1)).map(|_| AtomicU8::new(0)).collect(),
            caught: AtomicU64::new(0),
            slept: AtomicU64::new(0),
            preempted: AtomicU64::new(0),
            polled_ns: AtomicU64::new(0),
        }
    }

    fn busiest(&self) -> u8 {
        self.load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Both threads' stats as of their last published period.
    pub fn stats(&self) -> Stats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            caught: l(&self.caught),
            slept: l(&self.slept),
            preempted: l(&self.preempted),
            polled: Duration::from_nanos(l(&self.polled_ns)),
        }
    }

    fn add(&self, s: &Stats) {
        self.caught.fetch_add(s.caught, Ordering::Relaxed);
        self.slept.fetch_add(s.slept, Ordering::Relaxed);
        self.preempted.fetch_add(s.preempted, Ordering::Relaxed);
        let ns = u64::try_from(s.polled.as_nanos()).unwrap_or(u64::MAX);
        self.polled_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// What polling did, for the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Waits that ended while polling, ...
    pub caught: u64,
    /// ... in sleep (polling found nothing or was off), ...
    pub slept: u64,
    /// ... and polls ended because the thread lost its CPU.
    pub preempted: u64,
    /// Wall time spent polling (other tasks get the CPU in between, see the
    /// module docs).
    pub polled: Duration,
}

/// One thread's polling window.
#[derive(Debug)]
pub struct IdlePoll {
    max: Duration,
    window: Duration,
    /// Polling is off until then (after a preemption).
    off_until: Option<Instant>,
    shared: Arc<PollState>,
    /// This thread's slot in `shared.load`.
    me: usize,
    /// When the last wait ended, and the busy time since `period_start`.
    last_exit: Option<Instant>,
    period_start: Instant,
    busy: Duration,
    /// Not yet published to `shared`.
    stats: Stats,
    /// Polling time and catches since the last audit ([`AUDIT`]).
    audit_polled: Duration,
    audit_caught: u32,
}

impl IdlePoll {
    /// `max` bounds the window (zero turns polling off); `shared` is shared
    /// by the engine's packet threads, `me` is this one's slot in it.
    pub fn new(max: Duration, shared: Arc<PollState>, me: usize) -> IdlePoll {
        let me = me.min(shared.load.len() - 1);
        IdlePoll {
            max,
            window: Duration::ZERO,
            off_until: None,
            shared,
            me,
            last_exit: None,
            period_start: Instant::now(),
            busy: Duration::ZERO,
            stats: Stats::default(),
            audit_polled: Duration::ZERO,
            audit_caught: 0,
        }
    }

    /// How long to poll before sleeping, at `now`.
    pub fn window(&self, now: Instant) -> Duration {
        match self.off_until {
            Some(t) if now < t => Duration::ZERO,
            _ if self.shared.busiest() > BUSY_PERCENT => Duration::ZERO,
            _ => self.window,
        }
    }

    /// Adapts the window to how the last wait ended.
    pub fn record(&mut self, outcome: Outcome, now: Instant) {
        match outcome {
            // The window fitted: keep it.
            Outcome::Caught { polled } => {
                self.stats.caught += 1;
                self.audit_caught += 1;
                self.audit(polled, now);
            }
            Outcome::Slept { polled, slept } => {
                self.stats.slept += 1;
                self.audit(polled, now);
                if self.off_until.is_some_and(|t| now < t) {
                    // Off: start again from the bottom afterwards.
                    self.window = Duration::ZERO;
                } else if polled + slept <= self.max {
                    // A longer window would have caught it.
                    self.window = (self.window * 2).clamp(START, self.max);
                } else if self.window / 2 >= START {
                    self.window /= 2;
                } else {
                    self.window = Duration::ZERO;
                }
            }
            Outcome::Preempted => {
                self.stats.preempted += 1;
                self.window = Duration::ZERO;
                self.off_until = Some(now + COOLDOWN);
            }
        }
    }

    /// Turns polling off for a while when it has not been paying for itself.
    fn audit(&mut self, polled: Duration, now: Instant) {
        self.audit_polled += polled;
        if self.audit_polled < AUDIT {
            return;
        }
        if self.audit_polled > self.max * self.audit_caught.max(1) {
            self.window = Duration::ZERO;
            self.off_until = Some(now + WASTE_COOLDOWN);
        }
        self.audit_polled = Duration::ZERO;
        self.audit_caught = 0;
    }

    /// Waits until `fd` is readable, polling first for the current window and
    /// then sleeping up to `timeout`; `Ok(false)` when the sleep timed out.
    /// A poll ends early once `stop` is set.
    pub fn wait_readable(
        &mut self,
        fd: RawFd,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> io::Result<bool> {
        let start = Instant::now();
        if let Some(t) = self.last_exit {
            self.busy += start.saturating_duration_since(t);
        }
        let ready = self.poll_then_sleep(fd, timeout, stop, start);
        let now = Instant::now();
        self.last_exit = Some(now);
        let period = now.saturating_duration_since(self.period_start);
        if period >= LOAD_PERIOD {
            let percent = (self.busy.as_nanos() * 100 / period.as_nanos()).min(100) as u8;
            self.shared.load[self.me].store(percent, Ordering::Relaxed);
            self.shared.add(&std::mem::take(&mut self.stats));
            self.period_start = now;
            self.busy = Duration::ZERO;
        }
        ready
    }

    fn poll_then_sleep(
        &mut self,
        fd: RawFd,
        timeout: Duration,
        stop: &AtomicBool,
        start: Instant,
    ) -> io::Result<bool> {
        let window = self.window(start);
        let mut polled = Duration::ZERO;
        if !window.is_zero() {
            let mut last = start;
            loop {
                let ready = super::wait_readable(fd, Duration::ZERO)?;
                let now = Instant::now();
                polled = now - start;
                if ready {
                    self.stats.polled += polled;
                    self.record(Outcome::Caught { polled }, now);
                    return Ok(true);
                }
                if now - last > PREEMPT_GAP {
                    self.stats.polled += polled;
                    self.record(Outcome::Preempted, now);
                    return super::wait_readable(fd, timeout);
                }
                if polled >= window || stop.load(Ordering::Relaxed) {
                    break;
                }
                last = now;
                std::thread::yield_now();
            }
            self.stats.polled += polled;
        }
        let slept_from = Instant::now();
        let ready = super::wait_readable(fd, timeout)?;
        let now = Instant::now();
        self.record(
            Outcome::Slept {
                polled,
                slept: now - slept_from,
            },
            now,
        );
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const MAX: Duration = Duration::from_micros(200);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// A window grown to [`MAX`] by short waits.
    fn grown(shared: Arc<PollState>) -> (IdlePoll, Instant) {
        grown_at(shared, 0)
    }

    /// [`grown`] for the thread in slot `me`.
    fn grown_at(shared: Arc<PollState>, me: usize) -> (IdlePoll, Instant) {
        let mut p = IdlePoll::new(MAX, shared, me);
        let t = Instant::now();
        for _ in 0..4 {
            p.record(slept(0, 10), t);
        }
        (p, t)
    }

    fn slept(polled: u64, slept: u64) -> Outcome {
        Outcome::Slept {
            polled: us(polled),
            slept: us(slept),
        }
    }

    #[test]
    fn grows_while_waits_end_within_the_bound_and_stays_when_it_catches() {
        let mut p = IdlePoll::new(MAX, Arc::default(), 0);
        let t = Instant::now();
        assert_eq!(p.window(t), Duration::ZERO, "starts off");
        let mut seen = Vec::new();
        for _ in 0..5 {
            let w = p.window(t).as_micros() as u64;
            p.record(slept(w, 150 - w.min(150)), t);
            seen.push(p.window(t).as_micros());
        }
        assert_eq!(seen, [25, 50, 100, 200, 200], "doubles up to the bound");
        p.record(Outcome::Caught { polled: us(120) }, t);
        assert_eq!(p.window(t), MAX);
    }

    #[test]
    fn shrinks_to_zero_on_an_idle_link() {
        let (mut p, t) = grown(Arc::default());
        assert_eq!(p.window(t), MAX);
        let mut seen = Vec::new();
        for _ in 0..5 {
            p.record(slept(p.window(t).as_micros() as u64, 1_000_000), t);
            seen.push(p.window(t).as_micros());
        }
        assert_eq!(seen, [100, 50, 25, 0, 0]);
    }

    #[test]
    fn polling_that_rarely_catches_turns_off() {
        let (mut p, t) = grown(Arc::default());
        // Paying: every poll catches its packet after 150 µs, for 4 ms.
        for _ in 0..30 {
            p.record(Outcome::Caught { polled: us(150) }, t);
        }
        assert_eq!(p.window(t), MAX);
        // Wasting: 1 catch in 10 polls, the others run out at the bound and
        // their packet comes just after (which alone would keep the window).
        for i in 0..10 {
            if i == 5 {
                p.record(Outcome::Caught { polled: us(100) }, t);
            } else {
                p.record(slept(200, 0), t);
            }
        }
        assert_eq!(p.window(t), Duration::ZERO);
        assert_eq!(p.window(t + WASTE_COOLDOWN - us(1)), Duration::ZERO);
        p.record(slept(0, 10), t + WASTE_COOLDOWN);
        assert_eq!(p.window(t + WASTE_COOLDOWN), START);
    }

    #[test]
    fn preemption_turns_polling_off_for_the_cooldown() {
        let (mut p, t) = grown(Arc::default());
        p.record(Outcome::Preempted, t);
        assert_eq!(p.window(t), Duration::ZERO);
        assert_eq!(p.window(t + COOLDOWN - us(1)), Duration::ZERO);
        // Afterwards it grows again from the start, only when waits are short.
        p.record(slept(0, 10), t + COOLDOWN);
        assert_eq!(p.window(t + COOLDOWN), START);
    }

    #[test]
    fn a_busy_packet_thread_turns_polling_off_for_both() {
        let shared = Arc::new(PollState::default());
        let (p, t) = grown(shared.clone());
        assert_eq!(p.window(t), MAX);
        // The other thread published that it is busy 80 % of the time.
        shared.load[1].store(80, Ordering::Relaxed);
        assert_eq!(p.window(t), Duration::ZERO);
        shared.load[1].store(BUSY_PERCENT, Ordering::Relaxed);
        assert_eq!(p.window(t), MAX);
    }

    #[test]
    fn with_several_queues_any_busy_packet_thread_turns_polling_off() {
        // Three queues: six packet threads; this one is slot 4.
        let shared = Arc::new(PollState::new(6));
        let (p, t) = grown_at(shared.clone(), 4);
        assert_eq!(p.window(t), MAX);
        shared.load[5].store(80, Ordering::Relaxed);
        assert_eq!(p.window(t), Duration::ZERO);
        shared.load[5].store(0, Ordering::Relaxed);
        // A slot out of range is clamped to the last one, not a panic.
        let q = IdlePoll::new(MAX, shared.clone(), 9);
        assert_eq!(q.me, 5);
    }

    #[test]
    fn waits_publish_the_busy_share() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let stop = AtomicBool::new(false);
        let shared = Arc::new(PollState::default());
        let mut p = IdlePoll::new(MAX, shared.clone(), 1);
        let mut buf = [0u8; 4];
        // Work (here: sleeping outside the wait) between immediate waits.
        for _ in 0..3 {
            a.send(b"x").unwrap();
            assert!(p
                .wait_readable(b.as_raw_fd(), Duration::from_secs(1), &stop)
                .unwrap());
            b.recv(&mut buf).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        a.send(b"x").unwrap();
        assert!(p
            .wait_readable(b.as_raw_fd(), Duration::from_secs(1), &stop)
            .unwrap());
        b.recv(&mut buf).unwrap();
        assert!(shared.load[1].load(Ordering::Relaxed) > BUSY_PERCENT);
        // Then a long wait with nothing to do.
        assert!(!p
            .wait_readable(b.as_raw_fd(), Duration::from_millis(5), &stop)
            .unwrap());
        assert!(shared.load[1].load(Ordering::Relaxed) < BUSY_PERCENT);
        let st = shared.stats();
        assert_eq!(
            st.caught + st.slept + st.preempted,
            5,
            "every wait counted: {st:?}"
        );
    }

    #[test]
    fn zero_bound_never_polls() {
        let mut p = IdlePoll::new(Duration::ZERO, Arc::default(), 0);
        let t = Instant::now();
        for _ in 0..10 {
            p.record(slept(0, 1), t);
        }
        assert_eq!(p.window(t), Duration::ZERO);
    }

    #[test]
    fn wait_catches_data_while_polling_and_sleeps_when_idle() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let stop = AtomicBool::new(false);
        // A steady exchange has grown the window to its bound.
        let mut p = IdlePoll::new(Duration::from_millis(20), Arc::default(), 0);
        p.window = p.max;
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            a.send(b"y").unwrap();
            a
        });
        let ready = p
            .wait_readable(b.as_raw_fd(), Duration::from_secs(1), &stop)
            .unwrap();
        let a = sender.join().unwrap();
        assert!(ready);
        let preempted = p.off_until.is_some();
        // On a busy machine the poll may lose its CPU, which must end it.
        assert!(
            preempted || (p.window == p.max && p.shared.stats().polled >= Duration::from_millis(1)),
            "caught by the poll: {p:?}"
        );
        b.recv(&mut [0u8; 4]).unwrap();
        // Nothing arrives: the poll ends, the sleep times out and says so, and
        // the long wait shrinks the window.
        let mut p = IdlePoll::new(Duration::from_millis(20), Arc::default(), 0);
        p.window = p.max;
        assert!(!p
            .wait_readable(b.as_raw_fd(), Duration::from_millis(30), &stop)
            .unwrap());
        assert!(p.window < p.max, "{p:?}");
        drop(a);
    }
}
