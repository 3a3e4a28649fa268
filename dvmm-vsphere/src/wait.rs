//! Waiting on the PropertyCollector: a private collector with one filter,
//! `WaitForUpdatesEx` long-polls, and a predicate over the object's
//! properties. No sleeps: the server holds each call until something
//! changes. Dropping a wait (e.g. on cancellation or timeout) destroys the
//! collector and with it the filter.

use std::sync::Arc;
use std::time::Duration;

use dvmm_core::ports::VsphereError;
use tokio::time::Instant;

use crate::methods;
use crate::session::Session;
use crate::soap::Node;
use crate::types::{MoRef, TaskInfo, TaskState};

/// A filter on one object (or a few), alive until dropped or closed.
#[derive(Debug)]
pub struct PropertyWait {
    session: Arc<Session>,
    collector: Option<MoRef>,
    targets: Vec<(MoRef, Vec<&'static str>)>,
    version: String,
}

impl PropertyWait {
    /// Creates a private collector and a filter on `obj`'s `paths`.
    ///
    /// # Errors
    /// Faults and transport errors.
    pub async fn open(
        session: Arc<Session>,
        obj: MoRef,
        paths: &[&'static str],
    ) -> Result<Self, VsphereError> {
        Self::open_many(session, vec![(obj, paths.to_vec())]).await
    }

    /// Creates a private collector with a filter on each of several
    /// objects, each with its own paths: one collector, so one long poll
    /// serves them all.
    ///
    /// # Errors
    /// Faults and transport errors.
    pub async fn open_many(
        session: Arc<Session>,
        targets: Vec<(MoRef, Vec<&'static str>)>,
    ) -> Result<Self, VsphereError> {
        let mut wait = Self {
            session,
            collector: None,
            targets,
            version: String::new(),
        };
        wait.create().await?;
        Ok(wait)
    }

    async fn create(&mut self) -> Result<(), VsphereError> {
        let collector = methods::create_property_collector(&self.session).await?;
        // Set before the filter so a failure below still cleans up.
        self.collector = Some(collector.clone());
        // One filter per object: vcsim 0.24 drops the connection of a
        // wait whose single filter spans objects of different types.
        for (obj, paths) in &self.targets {
            methods::create_filter(&self.session, &collector, obj, paths).await?;
        }
        self.version.clear();
        Ok(())
    }

    /// The next batch of changes of the object (the first call returns its
    /// current state). Waits at most `max_wait` on the server; an empty batch
    /// means nothing changed in that time.
    ///
    /// # Errors
    /// Faults and transport errors.
    pub async fn next(
        &mut self,
        max_wait: Duration,
    ) -> Result<Vec<(String, Option<Node>)>, VsphereError> {
        let first = self.targets.first().map(|(obj, _)| obj.clone());
        Ok(self
            .next_changes(max_wait)
            .await?
            .into_iter()
            .filter(|c| Some(&c.obj) == first.as_ref())
            .map(|c| (c.path, c.val))
            .collect())
    }

    /// Like [`PropertyWait::next`], for every watched object: the changes
    /// in the server's order, each with its object. A zero `max_wait` takes
    /// what the server has without waiting.
    ///
    /// # Errors
    /// Faults and transport errors.
    pub async fn next_changes(
        &mut self,
        max_wait: Duration,
    ) -> Result<Vec<methods::Change>, VsphereError> {
        let Some(collector) = self.collector.clone() else {
            return Err(VsphereError::Protocol {
                message: "property wait used after close".into(),
            });
        };
        // Zero asks for what the collector has now, without waiting.
        let seconds = if max_wait.is_zero() {
            0
        } else {
            let seconds = max_wait.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
            seconds.min(self.session.options().wait_max_seconds.max(1))
        };
        let result =
            methods::wait_for_updates(&self.session, &collector, &self.version, seconds).await;
        let updates = match result {
            Ok(u) => u,
            // A re-login replaced the session and its session-scoped collector:
            // start over on the new session.
            Err(VsphereError::NotFound { kind, .. }) if kind == "PropertyCollector" => {
                self.collector = None;
                self.create().await?;
                return Ok(Vec::new());
            }
            // CancelWaitForUpdates cut it short: nothing to report yet.
            Err(VsphereError::TaskFailed { fault, .. }) if fault == "RequestCanceled" => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        if let Some(version) = updates.version {
            self.version = version;
        }
        Ok(updates
            .changes
            .into_iter()
            .filter(|c| self.targets.iter().any(|(obj, _)| *obj == c.obj))
            .collect())
    }

    /// The private collector (until closed).
    pub fn collector(&self) -> Option<&MoRef> {
        self.collector.as_ref()
    }

    /// Destroys the collector now.
    pub async fn close(mut self) {
        if let Some(collector) = self.collector.take()
            && let Err(e) = methods::destroy_property_collector(&self.session, &collector).await
        {
            tracing::debug!(error = %e, "could not destroy a property collector");
        }
    }
}

impl Drop for PropertyWait {
    fn drop(&mut self) {
        let Some(collector) = self.collector.take() else {
            return;
        };
        // Cancelled mid-wait: clean up in the background when a runtime is
        // there (the server drops it with the session otherwise).
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let session = self.session.clone();
            handle.spawn(async move {
                let _ = methods::destroy_property_collector(&session, &collector).await;
            });
        }
    }
}

/// Waits until `done` holds for the state built by `apply` from the object's
/// property changes, or `timeout` passes (`Ok(false)`).
///
/// # Errors
/// Faults and transport errors.
pub async fn wait_until<S>(
    session: Arc<Session>,
    obj: MoRef,
    paths: &[&'static str],
    timeout: Duration,
    state: &mut S,
    apply: impl Fn(&mut S, &str, Option<&Node>),
    done: impl Fn(&S) -> bool,
) -> Result<bool, VsphereError> {
    // A spec built in code may carry any duration; `Instant + Duration`
    // panics on overflow, so a deadline too far to represent means "none".
    let start = Instant::now();
    let deadline = start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut wait = PropertyWait::open(session, obj, paths).await?;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Ok(false);
        }
        let next = tokio::time::timeout(left + Duration::from_millis(50), wait.next(left)).await;
        match next {
            Err(_) => break Ok(false),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(changes)) => {
                for (path, val) in &changes {
                    apply(state, path, val.as_ref());
                }
                if done(state) {
                    break Ok(true);
                }
            }
        }
    };
    wait.close().await;
    outcome
}

const TASK_PATHS: &[&str] = &["info.state", "info.result", "info.error", "info.startTime"];

/// Waits for a task to finish and returns its result (`info.result`).
///
/// The task is read once first: vcsim (and vCenter for quick tasks) often has
/// finished it by the time the call returns, which saves a collector. Only a
/// running task gets a filter.
///
/// Waits at most `timeout` (capped by the session's
/// [`SoapOptions::task_timeout`](crate::SoapOptions::task_timeout)).
///
/// # Errors
/// The task's fault mapped onto [`VsphereError`], or `Timeout`.
pub async fn wait_for_task(
    session: &Arc<Session>,
    task: &MoRef,
    operation: &str,
    timeout: Duration,
) -> Result<Option<Node>, VsphereError> {
    wait_for_task_info(session, task, operation, timeout)
        .await
        .map(|info| info.result)
}

/// Like [`wait_for_task`], returning the finished task's info (its start
/// time included).
///
/// # Errors
/// The task's fault mapped onto [`VsphereError`], or `Timeout`.
pub async fn wait_for_task_info(
    session: &Arc<Session>,
    task: &MoRef,
    operation: &str,
    timeout: Duration,
) -> Result<TaskInfo, VsphereError> {
    let started = Instant::now();
    let result = wait_for_task_untimed(session, task, operation, timeout).await;
    metrics::histogram!(
        dvmm_core::telemetry::PROVISIONING_STEP_DURATION,
        "step" => operation.to_owned()
    )
    .record(started.elapsed().as_secs_f64());
    result
}

async fn wait_for_task_untimed(
    session: &Arc<Session>,
    task: &MoRef,
    operation: &str,
    timeout: Duration,
) -> Result<TaskInfo, VsphereError> {
    let mut info = TaskInfo::default();
    let contents =
        methods::retrieve_properties(session, "Task", TASK_PATHS, std::slice::from_ref(task))
            .await?;
    for content in &contents {
        for (path, val) in &content.props {
            info.apply(path, Some(val));
        }
    }
    if !info.state.is_some_and(TaskState::is_terminal) {
        let finished = wait_until(
            session.clone(),
            task.clone(),
            TASK_PATHS,
            timeout.min(session.options().task_timeout),
            &mut info,
            |info, path, val| info.apply(path, val),
            |info| info.state.is_some_and(TaskState::is_terminal),
        )
        .await?;
        if !finished {
            return Err(VsphereError::Timeout {
                operation: format!("{operation} ({task})"),
            });
        }
    }
    match info.state {
        Some(TaskState::Success) => Ok(info),
        _ => {
            Err(info
                .error
                .map(|f| f.into_error(""))
                .unwrap_or_else(|| VsphereError::TaskFailed {
                    fault: "Unknown".into(),
                    message: format!("{operation} failed without an error"),
                }))
        }
    }
}
