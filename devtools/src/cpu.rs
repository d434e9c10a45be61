//! CPU time by process group, read from `/proc` (Linux), for benchmarks that report what each
//! part of the platform costs per event: a component's process, every PostgreSQL process, the
//! Kafka broker, and the benchmark itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Which processes make one line of the report.
#[derive(Clone, Debug)]
pub enum Group {
    /// One process.
    Pid(u32),
    /// Every process whose `comm` is this name (PostgreSQL's server and backends: `postgres`).
    Comm(&'static str),
    /// Every process whose command line holds this (the broker's main class, `kafka.Kafka`).
    CommandLine(&'static str),
}

/// The CPU time (user + system) of every group at one moment, and the host's busy time.
#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    by_group: BTreeMap<String, Duration>,
    host_busy: Duration,
}

/// What each group used between two snapshots.
#[derive(Clone, Debug)]
pub struct Usage {
    pub elapsed: Duration,
    pub by_group: BTreeMap<String, Duration>,
    /// Every process on the host, from `/proc/stat` (a check on the sum of the groups).
    pub host_busy: Duration,
}

/// The kernel's clock ticks per second for `/proc` times (`USER_HZ`: 100 on every Linux
/// architecture this runs on; `getconf CLK_TCK` says otherwise where it differs).
fn ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

fn ticks(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / ticks_per_second() as f64)
}

/// User + system ticks from one `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields count from the last `)`.
pub fn stat_ticks(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of the whole host from `/proc/stat`'s `cpu` line (everything but idle and iowait).
pub fn host_busy_ticks(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = values.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Some(busy)
}

fn process_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn matching_pids(group: &Group) -> Vec<u32> {
    if let Group::Pid(pid) = group {
        return vec![*pid];
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| match group {
            Group::Comm(name) => std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == *name),
            Group::CommandLine(part) => {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == part.as_bytes()))
            }
            Group::Pid(_) => unreachable!(),
        })
        .collect()
}

/// Reads the CPU time of every named group now. A process of a group that ends between two
/// snapshots takes its time with it (pooled connections and components do not end mid-run).
pub fn snapshot(groups: &[(String, Group)]) -> Snapshot {
    let by_group =
        groups.iter().map(|(name, group)| (name.clone(), ticks(matching_pids(group).into_iter().filter_map(process_ticks).sum()))).collect();
    let host_busy = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(host_busy_ticks).map(ticks).unwrap_or_default();
    Snapshot { at: Instant::now(), by_group, host_busy }
}

impl Snapshot {
    /// What each group used since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> Usage {
        let by_group = self
            .by_group
            .iter()
            .map(|(name, now)| (name.clone(), now.saturating_sub(earlier.by_group.get(name).copied().unwrap_or_default())))
            .collect();
        Usage { elapsed: self.at - earlier.at, by_group, host_busy: self.host_busy.saturating_sub(earlier.host_busy) }
    }
}

impl Usage {
    /// The sum over the named groups.
    pub fn total(&self, names: &[&str]) -> Duration {
        names.iter().filter_map(|n| self.by_group.get(*n)).sum()
    }

    /// CPU seconds per second of wall time: cores kept busy.
    pub fn cores(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_ticks(line), Some(325));
        assert_eq!(stat_ticks("1 (x) S 1"), None);
        assert_eq!(stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn host_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 30 2 3 7 0 0\ncpu0 50 2 25 500 15 1 1 3 0 0\n";
        assert_eq!(host_busy_ticks(stat), Some(100 + 5 + 50 + 2 + 3 + 7));
    }

    #[test]
    fn this_process_uses_cpu_time() {
        let groups = [("self".to_owned(), Group::Pid(std::process::id()))];
        let before = snapshot(&groups);
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let usage = snapshot(&groups).since(&before);
        assert!(usage.by_group["self"] >= Duration::from_millis(100), "{usage:?}");
        assert!(usage.host_busy >= Duration::from_millis(100), "{usage:?}");
    }
}
