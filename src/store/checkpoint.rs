//! WAL checkpoints off the commit path: the writer's connection never
//! checkpoints (`wal_autocheckpoint = 0`); a thread of its own, on its own
//! connection, copies committed WAL frames into the database file with
//! passive checkpoints, which never block the writer or a reader.
//!
//! Why: SQLite's automatic checkpoint runs inside the COMMIT that crosses
//! its threshold, so that commit (and every request in its group) waited
//! for a copy of the whole WAL into a database file of a gigabyte or more,
//! scattered writes and an fsync of it: seconds, as the store grew. Here the
//! commit only appends to the WAL and syncs it; the copy runs beside it. The
//! WAL restarts from its beginning whenever a checkpoint caught up and no
//! reader holds an older snapshot, and is truncated back to
//! [`JOURNAL_LIMIT_BYTES`] then, so it does not keep its peak size on disk.

use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::EmbeddedError;

/// How often the checkpointer looks at the WAL.
const EVERY: Duration = Duration::from_millis(250);

/// The WAL's size left on disk after it restarts.
pub(super) const JOURNAL_LIMIT_BYTES: i64 = 64 << 20;

/// The checkpointer thread; stops (after a last checkpoint) when dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`.
    pub(super) fn start(path: &Path) -> Result<Checkpointer, EmbeddedError> {
        let conn = super::schema::connect(path)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("meterline-checkpoint".into()).spawn(move || {
            // Until the writer drops the sender: a timeout is the next round.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                if let Err(e) = passive(&conn) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retried shortly");
                }
            }
            let _ = passive(&conn);
        })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
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

/// One passive checkpoint: as many frames as no reader still needs.
fn passive(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
