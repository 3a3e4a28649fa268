//! The runner in the background: [`RunnerExt::spawn`] starts a
//! [`ProvisioningRunner`] on the tokio runtime and returns a
//! [`RunnerHandle`], for its health and for a clean shutdown.
//!
//! ```no_run
//! # async fn demo(runner: dvmm::ProvisioningRunner<
//! #     std::sync::Arc<dvmm::store::memory::MemoryEventStore>, dvmm::vsphere::sim::Simulator,
//! #     std::sync::Arc<dvmm::store::memory::MemoryTimeline>, dvmm::SystemClock,
//! #     dvmm::RandomIds, std::sync::Arc<dvmm::store::memory::MemoryWorkQueue>,
//! #     std::sync::Arc<dvmm::store::memory::MemoryCheckpoints>, dvmm::TokioTimer>,
//! # ) -> Result<(), dvmm::RunnerError> {
//! use dvmm::RunnerExt;
//!
//! let handle = runner.spawn();
//! // … serve requests; a health endpoint shows handle.health() …
//! let health = handle.health();
//! println!("{} in flight, {} held", health.in_flight, health.held);
//! let report = handle.shutdown().await?; // drains in-flight work first
//! println!("{} ready, {} failed", report.ready, report.failed);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use dvmm_core::ServiceError;
use dvmm_core::clock::{Clock, IdGenerator};
use dvmm_core::ports::{CheckpointStore, EventStore, TimelineSink, VspherePort, WorkQueue};
use dvmm_core::runner::{ProvisioningRunner, RunnerHealth, RunnerReport, Timer};

/// Why a spawned runner did not hand back a report.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The runner stopped with an error (e.g. its store kept failing past
    /// `RunnerConfig::max_store_failures`).
    #[error("the runner stopped: {0}")]
    Stopped(#[source] ServiceError),
    /// The runner's task panicked or was cancelled by the runtime.
    #[error("the runner's task ended abnormally: {0}")]
    Task(String),
}

/// A runner started with [`RunnerExt::spawn`]. Dropping the handle asks the
/// runner to shut down (it still drains its in-flight work), without
/// waiting for it.
pub struct RunnerHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<RunnerReport, ServiceError>>,
    health: Arc<dyn Fn() -> RunnerHealth + Send + Sync>,
}

impl std::fmt::Debug for RunnerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerHandle")
            .field("health", &(self.health)())
            .finish_non_exhaustive()
    }
}

impl RunnerHandle {
    /// What the runner is doing now.
    pub fn health(&self) -> RunnerHealth {
        (self.health)()
    }

    /// Whether the runner has stopped (by itself, after an error, or after
    /// a shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks the runner to stop taking work, waits while it drains its
    /// in-flight provisionings (up to `RunnerConfig::shutdown_deadline`) and
    /// gives back what is left, and returns its report.
    ///
    /// # Errors
    /// [`RunnerError`] when the runner had stopped with an error, or its
    /// task ended abnormally.
    pub async fn shutdown(mut self) -> Result<RunnerReport, RunnerError> {
        if let Some(stop) = self.stop.take() {
            // Already stopped by itself if nobody listens: join tells how.
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Waits until the runner stops by itself (it only does after an error)
    /// without asking it to.
    ///
    /// # Errors
    /// As [`RunnerHandle::shutdown`].
    pub async fn stopped(mut self) -> Result<RunnerReport, RunnerError> {
        self.join().await
    }

    async fn join(&mut self) -> Result<RunnerReport, RunnerError> {
        match (&mut self.task).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(error)) => Err(RunnerError::Stopped(error)),
            Err(error) => Err(RunnerError::Task(error.to_string())),
        }
    }
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a [`ProvisioningRunner`] in the background.
pub trait RunnerExt {
    /// Spawns the runner on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does.
    fn spawn(self) -> RunnerHandle;
}

impl<S, V, T, C, I, Q, K, W> RunnerExt for ProvisioningRunner<S, V, T, C, I, Q, K, W>
where
    S: EventStore + 'static,
    V: VspherePort + 'static,
    T: TimelineSink + 'static,
    C: Clock + 'static,
    I: IdGenerator + 'static,
    Q: WorkQueue + 'static,
    K: CheckpointStore + 'static,
    W: Timer + 'static,
{
    fn spawn(self) -> RunnerHandle {
        let runner = Arc::new(self);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = runner.clone();
        let task = tokio::spawn(async move {
            running
                .run(async move {
                    // A dropped handle counts as asking to stop.
                    let _ = stopped.await;
                })
                .await
        });
        let health = Arc::new(move || runner.health());
        RunnerHandle {
            stop: Some(stop),
            task,
            health,
        }
    }
}
