//! SIGINT, SIGTERM and SIGHUP stop a realisation cleanly instead of killing firn
//! mid-way: the handler only records the signal, and the worker (given [`interrupted`]
//! as its interrupt check) stops its builds, cleans up and returns. Builders die with
//! firn anyway (they have `PR_SET_PDEATHSIG`). A signal handler can only reach
//! process-wide state, so this is the one place that has any.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;

/// The signal that interrupted us (0: none yet).
static INTERRUPT_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(sig: libc::c_int) {
    INTERRUPT_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Install the handlers.
pub fn install_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Whether an interrupt arrived.
pub fn interrupted() -> bool {
    INTERRUPT_SIGNAL.load(Ordering::SeqCst) != 0
}

/// The name of the signal that interrupted the run (`SIGINT`, `SIGTERM`, `SIGHUP`).
pub fn signal_name() -> Option<&'static str> {
    match INTERRUPT_SIGNAL.load(Ordering::SeqCst) {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => None,
    }
}
