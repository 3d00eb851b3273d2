//! The embedded store: one SQLite database in the data directory holding the
//! events, both rollup tables, the alerts and the limits (plans, counters,
//! holds, reservations), written by one writer thread in group commits.
//!
//! Exactly-once is structural here: a request's events, the rollup rows that
//! sum them and the alert changes they cause are written in one SQLite
//! transaction, committed (`synchronous = FULL`, so on disk) before any of the
//! requests in the group is answered 2xx. A crash before the commit loses the
//! whole group, which no client was told was accepted; a crash after it loses
//! nothing. Retries of a committed event find its key in `events` and are
//! dropped, over the whole retention (not only the 35-day window).
//!
//! The decisions are the distributed pipeline's own code:
//! [`Decision::of`](meterline_domain::Decision::of) for dedupe,
//! [`price`](meterline_domain::price) for cost and revenue,
//! [`window_start`](meterline_domain::window_start) for the windows, and the
//! alerts [`AlertBook`](meterline_domain::AlertBook) for the runaway rules.
//! Only the log (a channel to this thread instead of Kafka) and the store
//! (SQLite instead of ClickHouse) differ.
//!
//! Limits state changes the same way: every reservation, commit, release and
//! plan write is an operation the writer runs inside the group commit, and
//! every new event is counted against its limits in the transaction that
//! stores it, so a counter never disagrees with the events.
//!
//! One job per module: `schema` (migrations, connections), `writer` (the
//! group-commit thread), `checkpoint` (WAL checkpoints beside it, and the WAL kept under `storage.wal_limit_mb` between commits), `jobs` (what its queue carries), `events` (the
//! dedupe record and inserts), `rollups` (per-commit sums and their
//! upserts), `alerts` (evaluation and the stored alerts), `ledger` (the
//! limits tables' steps), `counting` (events against limits, housekeeping),
//! `limits` (the `LimitStore` over all that), `reconcile` (counters
//! against their events, read in one snapshot) and `billing` (the Stripe
//! sync's mappings and pushed state); this file is the handle the
//! server and queries hold.

mod alerts;
mod billing;
mod checkpoint;
mod counting;
mod events;
mod jobs;
mod ledger;
mod limits;
mod phases;

/// Describes the writer's metrics; call after the recorder is installed.
pub(crate) use phases::describe as describe_writer_metrics;
mod reconcile;
mod retention;
mod rollups;
mod schema;
mod writer;

use meterline_schemas::wire::Envelope;
use meterline_sql::{Sql, Value as Bound};
use rusqlite::Connection;
use rusqlite::types::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

use crate::EmbeddedError;
use crate::config::Config;
use jobs::{Job, Op};
use schema::{connect, migrate};
use writer::Writer;

pub use alerts::{ALERT_COLUMNS, alert_row};
pub use billing::{EmbeddedBilling, SqliteLedger};
pub use limits::EmbeddedLimits;
pub use reconcile::{open_read_only, reconcile};
pub use schema::{DAILY_TABLE, DIMS_TABLE};

/// The database file inside the data directory.
pub const DB_FILE: &str = "meterline.db";

/// The embedded store: the writer's queue and a few read connections.
pub struct Embedded {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    path: PathBuf,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded").field("path", &self.path).field("readers", &self.readers.len()).finish_non_exhaustive()
    }
}

impl Embedded {
    /// Opens (creating and migrating) the database in `dir` and starts the
    /// writer thread. Must be called inside a tokio runtime: the writer uses it
    /// for webhook notifications and timers.
    pub fn open(dir: &Path, config: &Config) -> Result<(Embedded, std::thread::JoinHandle<()>), EmbeddedError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);
        let mut conn = connect(&path)?;
        migrate(&mut conn)?;
        let readers = (0..config.storage.read_connections).map(|_| connect(&path).map(Mutex::new)).collect::<Result<Vec<_>, _>>()?;
        let (jobs, rx) = mpsc::channel(config.server.max_in_flight_requests.max(1));
        let mut writer = Writer::new(conn, config)?;
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new().name("meterline-writer".into()).spawn(move || writer.run(rx, &runtime))?;
        Ok((Embedded { jobs, readers: Arc::new(readers), next_reader: AtomicUsize::new(0), path }, thread))
    }

    /// Queues `events` for the next group commit and waits for it.
    pub async fn append(&self, events: Vec<Envelope>) -> Result<(), EmbeddedError> {
        let (reply, done) = oneshot::channel();
        self.jobs.send(Job::Events { events, reply }).await.map_err(|_| EmbeddedError::WriterStopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EmbeddedError::Commit(e)),
            Err(_) => Err(EmbeddedError::WriterStopped),
        }
    }

    /// Runs `f` in the writer's next group commit, in queue order with the
    /// events; its result arrives once that commit is durable.
    pub(crate) async fn transact<T, F>(&self, f: F) -> Result<T, EmbeddedError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, EmbeddedError> + Send + 'static,
    {
        let (op, done) = Op::new(f);
        self.jobs.send(Job::Limits(op)).await.map_err(|_| EmbeddedError::WriterStopped)?;
        done.await.map_err(|_| EmbeddedError::WriterStopped)?
    }

    /// True while the writer thread runs.
    pub fn writer_running(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Runs `f` on a read connection, off the async threads.
    pub async fn read<T, F>(&self, f: F) -> Result<T, EmbeddedError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = self.readers.clone();
        let at = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
        tokio::task::spawn_blocking(move || {
            let conn = readers[at].lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| EmbeddedError::WriterStopped)?
        .map_err(EmbeddedError::from)
    }
}

/// A statement's bound values as SQLite takes them, in order.
pub(crate) fn binds(q: &Sql) -> impl rusqlite::Params + '_ {
    rusqlite::params_from_iter(q.binds.iter().map(value))
}

/// A bound value as SQLite takes it.
fn value(v: &Bound) -> Value {
    match v {
        Bound::Str(s) => Value::Text(s.clone()),
        Bound::Int(n) => Value::Integer(*n),
        // No statement here binds an array; as text it would match nothing.
        Bound::Strs(list) => Value::Text(list.join(",")),
    }
}
