//! [`ScriptedTransport`]: an in-process [`Transport`] that answers from a
//! script, for unit tests of every failure path without a server.
//!
//! Each method has a queue of [`Step`]s (one per call, in order); a call
//! whose queue is empty gets the fallback's step. Every request is recorded.
//! Like [`HttpTransport`](super::http::HttpTransport), a step that takes
//! longer than the call's deadline fails with
//! [`VsphereError::Transport`].
//!
//! ```
//! use dvmm_vsphere::transport::scripted::{ScriptedTransport, Step};
//! use dvmm_core::ports::VsphereError;
//!
//! let script = ScriptedTransport::new();
//! script
//!     .push("Login", Step::fault("InvalidLogin"))
//!     .push("Login", Step::Error(VsphereError::Transport { message: "reset".into() }));
//! assert!(script.requests().is_empty());
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::ports::VsphereError;

use super::{BoxFuture, Call, Transport};
use crate::soap::{Response, escape_into, read_response};

/// What the scripted server does with one call.
#[derive(Clone, Debug)]
pub enum Step {
    /// Answers with this SOAP document (a payload or a fault).
    Answer(String),
    /// Fails with this error, as the HTTP transport would.
    Error(VsphereError),
    /// Waits, then does the inner step.
    After(Duration, Box<Step>),
    /// Never answers: the call ends at its deadline (or when dropped).
    Hang,
}

impl Step {
    /// A `{method}Response` whose body is `inner` (raw XML).
    pub fn ok(method: &str, inner: &str) -> Self {
        Step::Answer(envelope(&format!(
            r#"<{method}Response xmlns="urn:vim25">{inner}</{method}Response>"#
        )))
    }

    /// A SOAP fault whose detail is the vim25 fault `kind`.
    pub fn fault(kind: &str) -> Self {
        let mut escaped = String::new();
        escape_into(&mut escaped, kind);
        Step::Answer(envelope(&format!(
            "<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{escaped}</faultstring>\
             <detail><{escaped}Fault xmlns=\"urn:vim25\" xsi:type=\"{escaped}\"></{escaped}Fault></detail>\
             </soapenv:Fault>"
        )))
    }

    /// A transport failure (refused, reset…) with that message.
    pub fn transport(message: &str) -> Self {
        Step::Error(VsphereError::Transport {
            message: message.to_owned(),
        })
    }

    /// This step after a delay.
    pub fn after(self, delay: Duration) -> Self {
        Step::After(delay, Box::new(self))
    }
}

fn envelope(body: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
            r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" "#,
            r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{}"#,
            r#"</soapenv:Body></soapenv:Envelope>"#
        ),
        body
    )
}

/// One request the scripted server received.
#[derive(Clone)]
pub struct Recorded {
    /// The vim25 method.
    pub method: &'static str,
    /// The request envelope.
    pub body: String,
    /// Whether the stack marked it safe to repeat.
    pub idempotent: bool,
    /// Its deadline.
    pub deadline: Duration,
}

impl fmt::Debug for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorded")
            .field("method", &self.method)
            .field("body_bytes", &self.body.len())
            .field("idempotent", &self.idempotent)
            .finish()
    }
}

type Fallback = Arc<dyn Fn(&Call) -> Step + Send + Sync>;

#[derive(Default)]
struct Script {
    queues: HashMap<String, VecDeque<Step>>,
    fallback: Option<Fallback>,
    log: Vec<Recorded>,
}

/// A scripted vCenter. Clones share the script and the record.
#[derive(Clone, Default)]
pub struct ScriptedTransport {
    script: Arc<Mutex<Script>>,
}

impl fmt::Debug for ScriptedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedTransport")
            .field("requests", &self.lock().log.len())
            .finish_non_exhaustive()
    }
}

impl ScriptedTransport {
    /// An empty script: every call fails with a `Protocol` error naming the
    /// method until steps or a fallback are added.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `step` for the next call of `method` that has no earlier step.
    pub fn push(&self, method: &str, step: Step) -> &Self {
        self.lock()
            .queues
            .entry(method.to_owned())
            .or_default()
            .push_back(step);
        self
    }

    /// What calls without a queued step get.
    pub fn fallback(&self, answer: impl Fn(&Call) -> Step + Send + Sync + 'static) -> &Self {
        self.lock().fallback = Some(Arc::new(answer));
        self
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    /// How many requests of `method` were received.
    pub fn count(&self, method: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    /// The methods received, in order.
    pub fn methods(&self) -> Vec<&'static str> {
        self.lock().log.iter().map(|r| r.method).collect()
    }

    fn next_step(&self, call: &Call) -> Step {
        let mut script = self.lock();
        script.log.push(Recorded {
            method: call.method,
            body: call.body.clone(),
            idempotent: call.idempotent,
            deadline: call.deadline,
        });
        if let Some(step) = script
            .queues
            .get_mut(call.method)
            .and_then(VecDeque::pop_front)
        {
            return step;
        }
        match script.fallback.clone() {
            Some(fallback) => {
                drop(script);
                fallback(call)
            }
            None => Step::Error(VsphereError::Protocol {
                message: format!("no scripted answer for {}", call.method),
            }),
        }
    }
}

async fn perform(mut step: Step) -> Result<Response, VsphereError> {
    loop {
        match step {
            Step::Answer(xml) => {
                return read_response(xml.as_bytes()).map_err(VsphereError::from);
            }
            Step::Error(e) => return Err(e),
            Step::After(delay, next) => {
                tokio::time::sleep(delay).await;
                step = *next;
            }
            Step::Hang => std::future::pending::<()>().await,
        }
    }
}

impl Transport for ScriptedTransport {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        let step = self.next_step(call);
        Box::pin(async move {
            match tokio::time::timeout(call.deadline, perform(step)).await {
                Ok(result) => result,
                Err(_) => Err(VsphereError::Transport {
                    message: format!(
                        "no complete answer to {} within its deadline of {:?}",
                        call.method, call.deadline
                    ),
                }),
            }
        })
    }
}
