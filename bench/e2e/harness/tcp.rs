//! The kernel's TCP segment count, to tell which way a run's clients and
//! broker fell.
//!
//! With client NODELAY off, a device's small publishes wait in its kernel
//! until the broker's kernel acknowledges what is in flight (Nagle). Linux
//! acknowledges a small pushed segment as soon as the application has read
//! it all, unless the connection counts as interactive, and otherwise delays
//! the ACK for up to tens of milliseconds. A broker that reads each segment
//! promptly therefore gets one message per segment and an ACK for each
//! (short latency, more CPU per message for both sides), and one that does
//! not gets several messages per segment; a run settles into one or the
//! other early on. Segments per delivered message show which it was.

/// Segments received by every TCP socket of this network namespace so far
/// (`Tcp: InSegs` in `/proc/net/snmp`). The harness and the system talk over
/// loopback, so each segment either side sends is counted once here.
pub fn segments_received() -> Option<u64> {
    in_segs(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// `InSegs` from the text of `/proc/net/snmp`: a `Tcp:` line of names, then
/// one of values.
pub fn in_segs(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "InSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}
