//! The per-tenant concurrency cap on ClickHouse reads: one semaphore per
//! tenant, made on first use. One tenant's dashboard firing many heavy
//! reads at once fills its own slots and is refused (`503
//! overloaded_tenant`), not queued without end in front of ClickHouse,
//! where it would take the cores other tenants, ingest and the aggregator need.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::QueryError;

/// At most `permits` reads per tenant at once; a read over the cap waits up
/// to `wait` for a slot (a short bounded wait: a dashboard's panels arrive
/// together and each read is usually well under a second), then is refused.
#[derive(Debug)]
pub struct TenantGate {
    permits: usize,
    wait: Duration,
    /// Tenants come from authenticated keys, so the map is bounded by the config.
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantGate {
    pub fn new(permits: usize, wait: Duration) -> TenantGate {
        TenantGate { permits, wait, tenants: Mutex::new(HashMap::new()) }
    }

    fn semaphore(&self, tenant: &str) -> Arc<Semaphore> {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still whole.
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.entry(tenant.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.permits))).clone()
    }

    /// A slot for one of `tenant`'s reads, held until dropped.
    pub async fn enter(&self, tenant: &str) -> Result<OwnedSemaphorePermit, QueryError> {
        let semaphore = self.semaphore(tenant);
        let refused = || QueryError::Overloaded { tenant: tenant.to_owned(), permits: self.permits };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out, or closed (never: no one closes it).
            _ => Err(refused()),
        }
    }

    /// Runs `read` holding one of `tenant`'s slots.
    pub async fn read<T>(&self, tenant: &str, read: impl Future<Output = Result<T, QueryError>>) -> Result<T, QueryError> {
        let _slot = self.enter(tenant).await?;
        read.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_over_its_cap_is_refused_after_the_wait_and_others_are_not() {
        let gate = TenantGate::new(2, Duration::from_millis(20));
        let held = (gate.enter("acme").await.expect("first"), gate.enter("acme").await.expect("second"));
        let err = gate.enter("acme").await.expect_err("over the cap");
        assert!(matches!(err, QueryError::Overloaded { ref tenant, permits: 2 } if tenant == "acme"), "{err}");
        let _globex = gate.enter("globex").await.expect("another tenant has its own slots");
        drop(held.0);
        let _freed = gate.enter("acme").await.expect("a slot freed");
    }

    #[tokio::test]
    async fn a_read_over_the_cap_gets_a_slot_freed_within_the_wait() {
        let gate = Arc::new(TenantGate::new(1, Duration::from_secs(5)));
        let slot = gate.enter("acme").await.expect("first");
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.read("acme", async { Ok(7) }).await }
        });
        drop(slot);
        assert_eq!(waiting.await.expect("task").expect("read"), 7);
    }
}
