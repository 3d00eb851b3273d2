//! The seam between ingest and wherever accepted events become durable: Kafka
//! in the distributed deployment, the embedded store in the all-in-one binary.

use futures::future::BoxFuture;
use meterline_schemas::wire::Envelope;

use crate::IngestError;
use crate::producer::EventProducer;

/// Where validated events go. A 2xx answer is given only after `append`
/// returned `Ok` for the request's events.
pub trait EventLog: Send + Sync + std::fmt::Debug {
    /// Makes every event durable, or returns `Err` (and the request is
    /// answered 503, so the client retries the batch unchanged).
    fn append(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>>;

    /// True when `append` can be expected to succeed.
    fn ready(&self) -> BoxFuture<'_, bool>;
}

impl EventLog for EventProducer {
    fn append(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            let outgoing = self.outgoing(&events).await?;
            // Encoded, the parsed events are not needed while the broker
            // acks: a slow broker should not hold every request's parse.
            drop(events);
            self.send_all(outgoing).await
        })
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(EventProducer::ready(self))
    }
}

/// A commit's event goes through the same log as `POST /v1/events`.
#[derive(Debug, Clone)]
pub struct LogMeter(pub std::sync::Arc<dyn EventLog>);

impl meterline_limits::Meter for LogMeter {
    fn meter(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.append(events).await.map_err(|e| e.to_string()) })
    }
}
