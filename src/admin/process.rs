//! The process's own figures for `/metrics` (CPU, memory, descriptors, start time), read from
//! `/proc/self` when asked, as Prometheus's client libraries do (same metric names).

/// What `/proc/self` says now; a figure that cannot be read is `None` and left out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
}

impl ProcessStats {
    pub fn read() -> ProcessStats {
        let mut stats = ProcessStats {
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|entries| entries.count() as u64),
            max_fds: crate::shard::open_file_limit(),
            ..ProcessStats::default()
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            stats.read_stat(&stat, boot_time_seconds());
        }
        stats
    }

    /// Fields of `/proc/self/stat` (proc(5)): the command name is in parentheses and may hold
    /// spaces, so fields are counted from the last `)`: field 3 (state) is the first after it.
    fn read_stat(&mut self, stat: &str, boot_time_seconds: Option<u64>) {
        let Some((_, after_name)) = stat.rsplit_once(')') else { return };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |number: usize| fields.get(number - 3).and_then(|value| value.parse::<u64>().ok());
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if ticks_per_second > 0 {
            let ticks = ticks_per_second as f64;
            if let (Some(user), Some(system)) = (field(14), field(15)) {
                self.cpu_seconds = Some((user + system) as f64 / ticks);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time_seconds) {
                self.start_time_seconds = Some(boot as f64 + start as f64 / ticks);
            }
        }
        self.threads = field(20);
        self.virtual_memory_bytes = field(23);
        if page_bytes > 0 {
            self.resident_memory_bytes = field(24).map(|pages| pages * page_bytes as u64);
        }
    }
}

/// The machine's boot time, seconds since the Unix epoch (`btime` in `/proc/stat`).
fn boot_time_seconds() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|line| line.strip_prefix("btime ")).and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_end_of_the_command_name() {
        // A command name with a space and a parenthesis, then fields 3..=24 as proc(5) numbers them.
        let stat = "42 (mbws (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456 30";
        let mut stats = ProcessStats::default();
        stats.read_stat(stat, Some(1_000_000));
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        assert_eq!(stats.cpu_seconds, Some(300.0 / ticks));
        assert_eq!(stats.threads, Some(7));
        assert_eq!(stats.start_time_seconds, Some(1_000_000.0 + 1000.0 / ticks));
        assert_eq!((stats.virtual_memory_bytes, stats.resident_memory_bytes), (Some(123_456), Some(30 * page)));
    }

    #[test]
    fn this_process_has_figures() {
        let stats = ProcessStats::read();
        assert!(stats.resident_memory_bytes.is_some_and(|bytes| bytes > 0), "{stats:?}");
        assert!(stats.open_fds.is_some_and(|fds| fds >= 3), "{stats:?}");
    }
}
