//! A test-harness device for vcsim, never product behaviour: vcsim runs no
//! guest and records no customization events, so a provisioning against
//! plain vcsim would wait for a customization outcome that never comes.
//! [`play_customizations`] watches every VM below a folder from its own
//! session and, when one powers on, posts `CustomizationStartedEvent` and
//! `CustomizationSucceeded` about it through `EventManager.PostEvent` (which
//! vcsim accepts), as vCenter would for a guest that customizes at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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
    loop {
        let updates = methods::wait_for_updates(session, collector, &version, 5).await?;
        if let Some(v) = updates.version {
            version = v;
        }
        for change in updates.changes {
            if change.path == "name" {
                if let Some(val) = &change.val {
                    names.insert(change.obj.clone(), val.text.clone());
                }
                continue;
            }
            let on = change.val.as_ref().and_then(|v| PowerState::parse(&v.text))
                == Some(PowerState::PoweredOn);
            if on && served.insert(change.obj.clone()) {
                let name = names.get(&change.obj).cloned().unwrap_or_default();
                for kind in ["CustomizationStartedEvent", "CustomizationSucceeded"] {
                    methods::post_vm_event(session, &change.obj, &name, kind, None).await?;
                }
            }
        }
    }
}
