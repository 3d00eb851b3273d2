//! CPU time by process from `/proc`, so the bench can say what one pair (and one raw admit) costs each process on the shared cores.

use std::path::Path;

/// Which process a reading is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The bench itself: the HTTP clients (and, once reaped, `redis-benchmark`).
    Bench,
    Ingest,
    Redis,
    Broker,
}

pub const ALL: [Who; 4] = [Who::Bench, Who::Ingest, Who::Redis, Who::Broker];

impl Who {
    pub fn name(self) -> &'static str {
        match self {
            Who::Bench => "bench clients",
            Who::Ingest => "ingest",
            Who::Redis => "redis",
            Who::Broker => "broker",
        }
    }
}

/// The processes watched, by pid (`None` where one was not found).
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub ingest: Option<u32>,
    pub redis: Option<u32>,
    pub broker: Option<u32>,
}

/// CPU seconds used so far, per process in [`ALL`]'s order; the bench's own
/// includes its reaped children (`redis-benchmark`, `redis-cli`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading(pub [f64; 4]);

impl Reading {
    pub fn since(&self, earlier: &Reading) -> Reading {
        Reading(std::array::from_fn(|i| self.0[i] - earlier.0[i]))
    }
}

/// `utime + stime` and `cutime + cstime` of `/proc/<pid>/stat`, in clock ticks.
fn ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).ok()?;
    // The fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let n = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    Some((n(14)? + n(15)?, n(16)? + n(17)?))
}

fn tick_hz() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Now's reading of every watched process.
pub fn read(pids: &Pids) -> Reading {
    let hz = tick_hz();
    let own = ticks("self").map_or(0.0, |(own, children)| (own + children) as f64 / hz);
    let of = |pid: Option<u32>| pid.and_then(|p| ticks(&p.to_string())).map_or(0.0, |(t, _)| t as f64 / hz);
    Reading([own, of(pids.ingest), of(pids.redis), of(pids.broker)])
}

/// The first process whose command line contains every one of `needles`.
pub fn find(needles: &[&str]) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (pid != me && needles.iter().all(|n| cmdline.contains(n))).then_some(pid)
    })
}
