//! What the writer's queue carries: an ingest request's events, or a limits
//! operation to run inside the same group-commit transaction; either is
//! answered only after the COMMIT that made it durable.

use meterline_schemas::wire::Envelope;
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::EmbeddedError;

/// One entry of the writer's queue, committed in queue order.
pub(super) enum Job {
    /// An ingest request's events (or a reservation commit's metered event).
    Events { events: Vec<Envelope>, reply: oneshot::Sender<Result<(), String>> },
    /// A limits operation: admit, commit, release, plan and subscription writes.
    Limits(Op),
}

impl Job {
    /// How much of a group commit's budget the job takes.
    pub(super) fn weight(&self) -> usize {
        match self {
            Job::Events { events, .. } => events.len(),
            Job::Limits(_) => 1,
        }
    }
}

/// An operation with its reply channel inside; `None` when it will not run.
type Erased = Box<dyn FnOnce(Option<&Connection>) -> Ran + Send>;

/// A typed operation on the limits tables with its caller's reply channel,
/// erased so that operations of every answer type share the one queue.
pub(super) struct Op {
    run: Erased,
}

/// An operation that has run (or never will), its answer held until the
/// commit decides it: nothing may be answered before it is durable.
pub(super) struct Ran {
    /// False: the operation failed, and its savepoint is rolled back.
    pub(super) ok: bool,
    answer: Box<dyn FnOnce(Result<(), String>) + Send>,
}

impl Ran {
    /// Answers the caller: the operation's own result if `commit` succeeded.
    pub(super) fn answer(self, commit: Result<(), String>) {
        (self.answer)(commit)
    }
}

impl Op {
    /// `f` and the receiver of its result, delivered after the commit.
    pub(super) fn new<T, F>(f: F) -> (Op, oneshot::Receiver<Result<T, EmbeddedError>>)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, EmbeddedError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let run = move |conn: Option<&Connection>| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(EmbeddedError::Commit("the group commit failed before this operation ran; nothing of it was stored".into())),
            };
            let ok = result.is_ok();
            let answer = move |commit: Result<(), String>| {
                // A caller that gave up has nothing left to tell.
                let _ = reply.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(EmbeddedError::Commit(e)),
                });
            };
            Ran { ok, answer: Box::new(answer) }
        };
        (Op { run: Box::new(run) }, answer)
    }

    /// Runs the operation on the writer's open transaction.
    pub(super) fn run(self, conn: &Connection) -> Ran {
        (self.run)(Some(conn))
    }

    /// The operation will not run: its commit failed first.
    pub(super) fn abandon(self) -> Ran {
        (self.run)(None)
    }
}

/// A job's answer, waiting for the commit.
pub(super) enum Pending {
    Events(oneshot::Sender<Result<(), String>>),
    Limits(Ran),
}

impl Pending {
    /// A job the commit never reached: answered with the commit's failure.
    pub(super) fn unreached(job: Job) -> Pending {
        match job {
            Job::Events { reply, .. } => Pending::Events(reply),
            Job::Limits(op) => Pending::Limits(op.abandon()),
        }
    }

    pub(super) fn answer(self, commit: Result<(), String>) {
        match self {
            Pending::Events(reply) => {
                let _ = reply.send(commit);
            }
            Pending::Limits(ran) => ran.answer(commit),
        }
    }
}
