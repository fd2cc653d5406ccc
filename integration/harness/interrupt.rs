//! Ctrl-C for long-running harness programs (the demo, the bench): SIGINT and
//! SIGTERM only set a flag, and the program unwinds at its next [`checkpoint`],
//! so the drops remove agents, namespaces and files. Dying on the signal would
//! leave the namespaces behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers; `program` names the caller in the warning printed if
/// one cannot be installed.
pub fn install(program: &str) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value; the
        // handler only stores to an atomic, which is async-signal-safe (signal-safety(7)).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            eprintln!(
                "{program}: cannot install a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Where an interrupt turns into an unwind (and so into cleanup).
pub fn checkpoint() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted: cleaning up");
    }
}
