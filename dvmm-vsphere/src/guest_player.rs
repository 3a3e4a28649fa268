//! A test-harness device for vcsim, never product behaviour: vcsim runs no
//! guest and records no customization events, so a provisioning against
//! plain vcsim would wait for a customization outcome that never comes.
//! [`play_customizations`] watches every VM below a folder from its own
//! session and, when one powers on, posts `CustomizationStartedEvent` and
//! `CustomizationSucceeded` about it through `EventManager.PostEvent` (which
//! vcsim accepts), as vCenter would for a guest that customizes at once.
//!
//! The long poll alone can miss a power-on on vcsim 0.24: its first
//! `WaitForUpdatesEx` reads the current state and only then starts
//! collecting changes, so a VM that powers on in between is reported off
//! and never again. A player whose guest never acts leaves that VM's wait
//! to time out with no outcome anywhere (the SOAP bench saw it at 32 in
//! flight). Players therefore also read the power states again
//! ([`powered_on_below`]) after the first answer and then every so often.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::methods;
use crate::session::{Session, this};
use crate::types::{MoRef, PowerState};

/// Plays customizing guests for every VM below the folder at inventory path
/// `folder_path` (e.g. `DC0/vm`), until the returned task is aborted. It
/// survives a restart of the server (it looks the folder up again and
/// starts over, serving the new server's VMs), and serves each VM once per
/// connection.
pub fn play_customizations(
    session: Arc<Session>,
    folder_path: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = serve(&session, &folder_path).await {
                tracing::debug!(error = %e, "guest player: starting over");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// How often a player reads every VM's power state again besides its long
/// poll (see the module docs).
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);

/// The VMs below `folder` (recursively) that are powered on now: two reads,
/// the VMs, then their power states.
///
/// # Errors
/// Faults and transport errors (a VM removed between the two reads is a
/// fault; the next read does without it).
pub async fn powered_on_below(
    session: &Session,
    folder: &MoRef,
) -> Result<Vec<MoRef>, dvmm_core::ports::VsphereError> {
    let vms: Vec<MoRef> = methods::vm_names_below(session, folder, None)
        .await?
        .into_iter()
        .map(|(vm, _)| vm)
        .collect();
    if vms.is_empty() {
        return Ok(Vec::new());
    }
    let states =
        methods::retrieve_properties(session, "VirtualMachine", &["runtime.powerState"], &vms)
            .await?;
    Ok(states
        .into_iter()
        .filter(|o| {
            o.prop("runtime.powerState")
                .and_then(|v| PowerState::parse(&v.text))
                == Some(PowerState::PoweredOn)
        })
        .filter_map(|o| o.obj)
        .collect())
}

async fn serve(session: &Session, folder_path: &str) -> Result<(), dvmm_core::ports::VsphereError> {
    let mut served = HashSet::new();
    let served = &mut served;
    let Some(folder) = methods::find_by_inventory_path(session, folder_path).await? else {
        return Ok(());
    };
    let collector = methods::create_property_collector(session).await?;
    let outcome = watch(session, &collector, &folder, served).await;
    let _ = methods::destroy_property_collector(session, &collector).await;
    outcome
}

async fn watch(
    session: &Session,
    collector: &MoRef,
    folder: &MoRef,
    served: &mut HashSet<MoRef>,
) -> Result<(), dvmm_core::ports::VsphereError> {
    session
        .call("CreateFilter", false, Duration::ZERO, |_, env| {
            this(env, collector);
            env.open("spec")
                .open("propSet")
                .text("type", "VirtualMachine")
                .text("pathSet", "runtime.powerState")
                .text("pathSet", "name")
                .close("propSet")
                .open("objectSet")
                .moref("obj", &folder.kind, &folder.value)
                .text("skip", "true")
                .open_typed("selectSet", "TraversalSpec")
                .text("name", "folderTree")
                .text("type", "Folder")
                .text("path", "childEntity")
                .text("skip", "false")
                .open("selectSet")
                .text("name", "folderTree")
                .close("selectSet")
                .close("selectSet")
                .close("objectSet")
                .close("spec")
                .text("partialUpdates", "false");
        })
        .await?;
    let mut version = String::new();
    let mut names = std::collections::HashMap::<MoRef, String>::new();
    // Read again after the first answer (see the module docs).
    let mut resync_at: Option<Instant> = None;
    loop {
        let updates = methods::wait_for_updates(session, collector, &version, 1).await?;
        if let Some(v) = updates.version {
            version = v;
        }
        let mut on = Vec::new();
        for change in updates.changes {
            if change.path == "name" {
                if let Some(val) = &change.val {
                    names.insert(change.obj.clone(), val.text.clone());
                }
                continue;
            }
            if change.val.as_ref().and_then(|v| PowerState::parse(&v.text))
                == Some(PowerState::PoweredOn)
            {
                on.push(change.obj);
            }
        }
        if resync_at.is_none_or(|at| at.elapsed() >= RESYNC_EVERY) {
            on.extend(powered_on_below(session, folder).await?);
            resync_at = Some(Instant::now());
        }
        for vm in on {
            if served.insert(vm.clone()) {
                let name = names.get(&vm).cloned().unwrap_or_default();
                for kind in ["CustomizationStartedEvent", "CustomizationSucceeded"] {
                    methods::post_vm_event(session, &vm, &name, kind, None).await?;
                }
            }
        }
    }
}
