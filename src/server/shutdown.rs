//! Shutdown requests (SIGTERM, Ctrl-C, or a test): the first starts the drain, the second ends it
//! at once.

use std::sync::Arc;

use tokio::sync::watch;

/// Counts shutdown requests. Cloning is shallow.
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<u32>>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_modify(|requests| *requests += 1);
    }
}

pub struct ShutdownSignal(watch::Receiver<u32>);

impl ShutdownSignal {
    pub(super) async fn requested(&mut self, times: u32) {
        if self
            .0
            .wait_for(|requests| *requests >= times)
            .await
            .is_err()
        {
            // Every trigger is gone: nobody can ask any more, so this never resolves.
            std::future::pending::<()>().await;
        }
    }
}

pub fn shutdown_channel() -> (ShutdownTrigger, ShutdownSignal) {
    let (sender, receiver) = watch::channel(0);
    (ShutdownTrigger(Arc::new(sender)), ShutdownSignal(receiver))
}
