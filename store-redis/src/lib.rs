//! Meterline's limits store over Redis: plans, subscriptions, counters, holds and reservations, each change one atomic Lua step.
//!
//! # Key layout
//!
//! Every key of tenant `T` starts with the hash tag `{ml:T}`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{ml:T}:plans` | hash | plan id -> `PlanView` JSON |
//! | `{ml:T}:subs` | hash | `Subject::key()` -> `SubscriptionView` JSON |
//! | `{ml:T}:u:<counter>` | string (integer) | counted usage; expires at the counter's `keep_until` |
//! | `{ml:T}:h:<counter>` | string (integer) | the sum of live holds; same expiry |
//! | `{ml:T}:r:<key>` | hash | a reservation, `<key>` its id before the first `.` (`rsv_<32 hex>`, the metered event's idempotency key); kept until `expires_at + KEEP_AFTER_EXPIRY_MS`, without expiry while committed and not yet counted, and `KEEP_AFTER_EXPIRY_MS` after it is counted |
//! | `{ml:T}:exp` | sorted set | keys of held reservations by `expires_at_ms`: the sweep's index |
//! | `{ml:T}:idem:<idempotency key>` | string | a reserve's idempotency key -> reservation key; the record's expiry |
//! | `{ml:T}:n:<counter>:<ratio>:<limit name>` | string | a limit threshold's fired-marker; expires with the counter |
//! | `{ml:T}:la:<subject key>` | string | the time (Unix secs) of the subject's latest limit alert, so the next is later |
//! | `{ml:T}:applied` | hash | log source (`topic/partition`) -> the last counted position's marker |
//! | `{ml}:progress` | hash | log source -> offset, across tenants (not in a tenant's slot) |
//!
//! A reservation is a hash (`id`, `state`, `created_at_ms`, `expires_at_ms`,
//! `counted`, `fp`, `holds`, `idem`), not a JSON string: a script rewriting
//! JSON would go through Lua's cjson, which reads numbers as doubles and
//! writes them with 14 significant digits, losing nano-dollars. `holds` is
//! one `amount keep_until counter` line per hold (counters never hold a
//! control character; one that does is refused before it is stored).
//!
//! # Slots
//!
//! The tag is the tenant, not the subject: an admission reads and writes the
//! user's counters, the customer's, the reservation and the idempotency index
//! at once, and a script may only touch keys of one slot. On Redis Cluster the
//! tenants spread over the shards; one tenant's limits traffic is bounded by
//! the one shard holding its slot. Scripts build their keys from the tenant's
//! prefix and name one of them as `KEYS[1]`, which routes the call.
//!
//! # Integer precision
//!
//! Amounts are `i64` (nano-dollars up to ~9.2e18). Redis Lua numbers are
//! doubles, exact only to 2^53, so amounts never become Lua numbers: they
//! travel as decimal text, Redis adds them (`INCRBY`/`DECRBY`, 64-bit), and
//! the one comparison (the admission rule, `book::admits`) splits each value
//! into `hi * 10^9 + lo`, both parts exact in a double. Admission is exact
//! over the whole `i64` range. A counter whose sum would pass `i64::MAX`
//! (9.2e9 dollars in nano-dollars) fails the script at that `INCRBY`, and
//! Redis does not roll back the script's earlier writes; no real counter
//! comes near it.
//!
//! # Expiry
//!
//! Holds past their expiry are dropped lazily: every script that reads
//! balances or changes a reservation first sweeps up to 100 due entries of
//! `exp`. A backlog beyond that (over 100 holds expiring between two calls of
//! one tenant) only over-counts holds until later calls sweep it, never under.

mod client;
mod counting;
mod keys;
mod reconcile;
mod record;
mod store;
mod subscriptions;

pub use client::RedisLimits;
pub use counting::Applied;
