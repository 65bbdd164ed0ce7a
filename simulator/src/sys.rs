//! The simulator's own process: its file-descriptor limit, CPU time and peak memory.

use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};

/// Raises the soft limit on open files to the hard limit (10 000 connections need more than
/// the usual 1024). Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// CPU seconds (user + system) used by this process so far.
pub fn cpu_seconds() -> f64 {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// Peak resident memory of this process in MiB (`VmHWM`), where /proc has it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_usage_are_readable() {
        let before = getrlimit(Resource::RLIMIT_NOFILE).unwrap().0;
        assert!(raise_fd_limit() >= before);
        let spin: u64 = (0..2_000_000u64).fold(0, |a, x| a.wrapping_add(x * x));
        assert!(spin > 0 && cpu_seconds() > 0.0);
        assert!(peak_rss_mb().unwrap() > 1.0);
    }
}
