//! WAL checkpoints: a thread copies committed frames into the database file
//! beside the commits, and the writer bounds the WAL between group commits.
//!
//! The writer's connection never checkpoints by itself
//! (`wal_autocheckpoint = 0`): SQLite's automatic checkpoint runs inside the
//! COMMIT that crosses its threshold, so that commit (and every request in
//! its group) waited for a copy of the whole WAL into a database file of a
//! gigabyte or more: seconds, as the store grew. A thread of its own, on its
//! own connection, runs passive checkpoints instead, which block neither the
//! writer nor a reader.
//!
//! Why that alone let the WAL grow without bound under sustained load (3.7 GB
//! in 30 s at 10,000 events/s): SQLite restarts the WAL from its beginning
//! only when a write transaction *begins* at a moment every frame is in the
//! database file. Under load the writer's transactions run back to back, so a
//! pass always finished while one was open, whose commit appended frames
//! before the next began. Watching the wal-index (2026-11-27, a fresh store,
//! 10,000 events/s offered) showed the thread keeping up (0-15,000 frames
//! behind, never more than a pass) while the WAL grew 3 GB in 40 s: no reader
//! pinned it, the copy kept pace, the restart never got its moment.
//!
//! So the writer makes that moment: between group commits, once the WAL file
//! passes `storage.wal_limit_mb`, it runs a passive checkpoint on its own
//! connection, which only has the frames since the thread's last pass left to
//! copy; the next transaction restarts the WAL, writing its frames from the
//! file's beginning again, and its commit cuts what passed the limit off the
//! file (`journal_size_limit`). So under load the file stays at about the
//! limit and is written over in place, not freed and reallocated at every
//! restart: cutting it back to a quarter of the limit (tried first) went with
//! 8 commits of 465 taking 0.25-0.5 s, against 1 of 459 with no restarts at
//! all. The thread starts no pass while the writer waits for its turn (a
//! pass under way makes the
//! writer try again after its next commit). If a reader's snapshot still
//! holds frames, the thread copies on and the writer tries again [`EVERY`]
//! later; once the WAL has reached twice the limit, the writer also waits
//! for readers in a RESTART checkpoint, at most [`PINNED_WAIT`] and once per
//! [`ESCALATE_EVERY`]: short queries drain in that wait, while a reader that
//! holds one snapshot for minutes (a long export) keeps the WAL growing
//! until it is done, at a bounded cost to the writer meanwhile.

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::EmbeddedError;

/// How often the checkpointer looks at the WAL.
const EVERY: Duration = Duration::from_millis(250);

/// Longest the writer waits for readers in one RESTART checkpoint.
const PINNED_WAIT: Duration = Duration::from_millis(100);

/// RESTART checkpoints (which wait for readers) come at most this often.
const ESCALATE_EVERY: Duration = Duration::from_secs(1);

/// The connections' usual wait for a lock (`schema::connect`), restored after a RESTART.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The checkpointer thread; stops (after a last checkpoint) when dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set while the writer wants the checkpoint lock: the thread starts no pass.
    writer_turn: Arc<AtomicBool>,
    wal: PathBuf,
    limit_bytes: u64,
    /// The WAL file's length when the writer's last checkpoint caught up: the
    /// WAL restarts at the next commit, which cuts the file back to the
    /// limit; until the length moves there is nothing to do.
    caught_up_at: Option<u64>,
    /// After a pass a reader held back, the writer leaves the copying to the thread until then.
    retry_at: Option<Instant>,
    escalated: Option<Instant>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`, whose WAL the writer
    /// (`conn`) keeps near `limit_bytes`.
    pub(super) fn start(conn: &Connection, limit_bytes: u64) -> Result<Checkpointer, EmbeddedError> {
        // Commits never checkpoint: this thread does, beside them, and the writer between them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", i64::try_from(limit_bytes).unwrap_or(i64::MAX))?;
        let path = conn.path().map(PathBuf::from).unwrap_or_default();
        let thread_conn = super::schema::connect(&path)?;
        let writer_turn = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let turn = writer_turn.clone();
        let thread = std::thread::Builder::new().name("meterline-checkpoint".into()).spawn(move || {
            // Until the writer drops the sender: a timeout is the next round.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                if turn.load(Ordering::Acquire) {
                    continue;
                }
                if let Err(e) = checkpoint(&thread_conn, Mode::Passive) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retried shortly");
                }
            }
            let _ = checkpoint(&thread_conn, Mode::Passive);
        })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread), writer_turn, wal: wal_path(&path), limit_bytes, caught_up_at: None, retry_at: None, escalated: None })
    }

    /// Between group commits, on the writer's connection (no transaction
    /// open): once the WAL file is past the limit, checkpoints it so the next
    /// transaction restarts it. Returns the time spent when it checkpointed.
    pub(super) fn bound(&mut self, conn: &Connection) -> Option<Duration> {
        let len = std::fs::metadata(&self.wal).map(|m| m.len()).unwrap_or(0);
        // At or under the limit: frames are being written over the file's
        // blocks (or it has not grown that far yet).
        if len <= self.limit_bytes || self.caught_up_at == Some(len) || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let started = Instant::now();
        self.writer_turn.store(true, Ordering::Release);
        let mut pass = checkpoint(conn, Mode::Passive);
        let pinned = matches!(&pass, Ok(p) if p.pinned());
        if pinned && len >= self.limit_bytes.saturating_mul(2) && self.escalated.is_none_or(|at| at.elapsed() >= ESCALATE_EVERY) {
            self.escalated = Some(Instant::now());
            pass = restart(conn);
        }
        match pass {
            Ok(p) if p.caught_up() => {
                self.caught_up_at = Some(len);
                self.retry_at = None;
                self.writer_turn.store(false, Ordering::Release);
            }
            // The thread's pass holds the lock: it starts no other, so a try after the next commit gets it.
            Ok(p) if p.locked_out() => {}
            // A reader's snapshot holds frames: the thread copies on meanwhile, the writer tries again shortly.
            Ok(p) => {
                tracing::debug!(wal_bytes = len, frames = p.log, checkpointed = p.checkpointed, "a reader holds WAL frames; the WAL restarts once it is done");
                self.retry_at = Some(Instant::now() + EVERY);
                self.writer_turn.store(false, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(error = %e, wal_bytes = len, "WAL checkpoint failed; retried shortly");
                self.retry_at = Some(Instant::now() + EVERY);
                self.writer_turn.store(false, Ordering::Release);
            }
        }
        Some(started.elapsed())
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The WAL file beside the database at `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// As many frames as no reader still needs; waits for nothing.
    Passive,
    /// Every frame, waiting (the busy timeout) for readers of older snapshots.
    Restart,
}

/// What `PRAGMA wal_checkpoint` answered.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Another checkpoint held the lock, or (RESTART) readers outlasted the wait.
    busy: bool,
    /// Frames in the WAL, and how many of them are in the database file now.
    log: i64,
    checkpointed: i64,
}

impl Pass {
    /// Every frame is in the database file: the next write transaction restarts the WAL.
    fn caught_up(&self) -> bool {
        !self.busy && self.checkpointed >= self.log
    }

    /// Another checkpoint held the lock, so this one did nothing (SQLite
    /// leaves both counts at -1 then).
    fn locked_out(&self) -> bool {
        self.busy && self.log < 0
    }

    /// A passive pass that stopped at a reader's snapshot.
    fn pinned(&self) -> bool {
        !self.busy && self.checkpointed < self.log
    }
}

fn checkpoint(conn: &Connection, mode: Mode) -> Result<Pass, rusqlite::Error> {
    let sql = match mode {
        Mode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
        Mode::Restart => "PRAGMA wal_checkpoint(RESTART)",
    };
    conn.query_row(sql, [], |r| Ok(Pass { busy: r.get::<_, i64>(0)? != 0, log: r.get(1)?, checkpointed: r.get(2)? }))
}

/// A RESTART checkpoint that waits for readers at most [`PINNED_WAIT`].
fn restart(conn: &Connection) -> Result<Pass, rusqlite::Error> {
    conn.busy_timeout(PINNED_WAIT)?;
    let pass = checkpoint(conn, Mode::Restart);
    conn.busy_timeout(BUSY_TIMEOUT)?;
    pass
}
