//! Where the writer's time goes: each group commit's time split by phase,
//! recorded in `meterline_embedded_writer_phase_seconds{phase}` and logged
//! when a commit is slow, so a stall at scale names its phase.

use metrics::{describe_histogram, histogram};
use std::time::{Duration, Instant};

/// Seconds per commit spent in each phase (retention: per step; checkpoint: per WAL checkpoint the writer ran between commits).
pub const PHASE_SECONDS: &str = "meterline_embedded_writer_phase_seconds";

/// A commit slower than this is logged with its phases.
const SLOW: Duration = Duration::from_secs(1);

/// The phases of a group commit; the `phase` label's values.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    Dedupe,
    Insert,
    Count,
    LimitsOps,
    Rollups,
    Housekeeping,
    Alerts,
    Commit,
    Retention,
    /// The writer's own WAL checkpoint between commits (`checkpoint`).
    Checkpoint,
}

const PHASES: [Phase; 10] =
    [Phase::Dedupe, Phase::Insert, Phase::Count, Phase::LimitsOps, Phase::Rollups, Phase::Housekeeping, Phase::Alerts, Phase::Commit, Phase::Retention, Phase::Checkpoint];

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Dedupe => "dedupe",
            Phase::Insert => "insert",
            Phase::Count => "count",
            Phase::LimitsOps => "limits_ops",
            Phase::Rollups => "rollups",
            Phase::Housekeeping => "housekeeping",
            Phase::Alerts => "alerts",
            Phase::Commit => "commit",
            Phase::Retention => "retention",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

/// Describes the histogram (once per recorder is enough; repeats are harmless).
pub(crate) fn describe() {
    describe_histogram!(PHASE_SECONDS, "Time the embedded writer spent per group commit in each phase (retention: per step; checkpoint: per WAL checkpoint between commits), by phase.");
}

/// One commit's time per phase.
#[derive(Debug, Default)]
pub(super) struct Phases {
    spent: [Duration; PHASES.len()],
}

impl Phases {
    /// Runs `f`, adding its time to `phase`.
    pub(super) fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.spent[phase as usize] += started.elapsed();
        out
    }

    /// Adds time measured elsewhere to `phase`.
    pub(super) fn add(&mut self, phase: Phase, spent: Duration) {
        self.spent[phase as usize] += spent;
    }

    /// Records the phases that ran, and logs them when the commit was slow.
    pub(super) fn record(&self, rows: usize, total: Duration) {
        for phase in PHASES {
            let spent = self.spent[phase as usize];
            if !spent.is_zero() {
                histogram!(PHASE_SECONDS, "phase" => phase.as_str()).record(spent.as_secs_f64());
            }
        }
        if total >= SLOW {
            tracing::warn!(rows, total_ms = total.as_millis() as u64, phases = %self, "slow embedded commit");
        } else {
            tracing::debug!(rows, total_ms = total.as_millis() as u64, phases = %self, "embedded commit");
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for phase in PHASES {
            let spent = self.spent[phase as usize];
            if !spent.is_zero() {
                write!(f, "{}={:.1}ms ", phase.as_str(), spent.as_secs_f64() * 1_000.0)?;
            }
        }
        Ok(())
    }
}
