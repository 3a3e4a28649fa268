//! SOAP faults: decoding a `soapenv:Fault` or a vim25 `LocalizedMethodFault`
//! and mapping it onto the port's [`VsphereError`].

use dvmm_core::ports::VsphereError;

use super::reader::{Node, local_name};

/// A SOAP fault as the server sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The vim25 fault type (`NotAuthenticated`, `DuplicateName`, …), or the
    /// SOAP `faultcode` when the detail names no type.
    pub kind: String,
    /// `faultstring`, possibly empty.
    pub message: String,
    /// The fault's detail element, when present.
    pub detail: Option<Node>,
}

impl Fault {
    /// Reads a vim25 fault object (a `<fault xsi:type="…">` element or a
    /// `<…Fault>` detail element).
    pub fn from_fault_node(node: &Node, message: impl Into<String>) -> Self {
        let kind = node
            .xsi_type
            .as_deref()
            .map(str::to_owned)
            .unwrap_or_else(|| {
                node.name
                    .strip_suffix("Fault")
                    .filter(|s| !s.is_empty())
                    .unwrap_or(&node.name)
                    .to_owned()
            });
        Self {
            kind,
            message: message.into(),
            detail: Some(node.clone()),
        }
    }

    /// Reads a `LocalizedMethodFault` (task `info.error`, `missingSet/fault`).
    pub fn from_localized(node: &Node) -> Self {
        let message = node.child_text("localizedMessage").unwrap_or_default();
        match node.child("fault") {
            Some(fault) => Self::from_fault_node(fault, message),
            None => Self {
                kind: node.xsi_type.as_deref().unwrap_or("MethodFault").to_owned(),
                message: message.to_owned(),
                detail: None,
            },
        }
    }

    fn detail_text(&self, name: &str) -> Option<&str> {
        self.detail.as_ref().and_then(|d| d.child_text(name))
    }

    fn message_or_kind(&self) -> String {
        if self.message.trim().is_empty() {
            self.kind.clone()
        } else {
            self.message.clone()
        }
    }

    /// Maps the fault onto the port's error. `username` names the user in
    /// `InvalidLogin`.
    pub fn into_error(self, username: &str) -> VsphereError {
        match self.kind.as_str() {
            "InvalidLogin" | "InvalidLoginFault" => VsphereError::InvalidLogin {
                username: username.to_owned(),
            },
            "NotAuthenticated" => VsphereError::NotAuthenticated,
            "DuplicateName" => {
                let name = self.detail_text("name").unwrap_or_default().to_owned();
                let location = self
                    .detail
                    .as_ref()
                    .and_then(|d| d.child("object"))
                    .map(|o| o.text.clone())
                    .unwrap_or_default();
                VsphereError::DuplicateName { name, location }
            }
            "ManagedObjectNotFound" => {
                let obj = self.detail.as_ref().and_then(|d| d.child("obj"));
                VsphereError::NotFound {
                    kind: obj
                        .and_then(|o| o.mo_type.as_deref().map(str::to_owned))
                        .unwrap_or_else(|| "managed object".into()),
                    name: obj.map(|o| o.text.clone()).unwrap_or_default(),
                }
            }
            "InvalidPowerState" => {
                let mut message = self.message.clone();
                if message.trim().is_empty() || message.starts_with("*types.") {
                    let existing = self.detail_text("existingState").unwrap_or("unknown");
                    let requested = self.detail_text("requestedState").unwrap_or("another");
                    message = format!("VM is {existing}, the operation needs {requested}");
                }
                VsphereError::InvalidPowerState { message }
            }
            kind if kind.starts_with("Insufficient")
                || kind == "NotEnoughLicenses"
                || kind == "NoDiskSpace"
                || kind == "OutOfBounds" =>
            {
                VsphereError::InsufficientResources {
                    message: format!("{kind}: {}", self.message_or_kind()),
                }
            }
            _ => VsphereError::TaskFailed {
                message: self.message_or_kind(),
                fault: self.kind,
            },
        }
    }
}

/// Decodes a `soapenv:Fault` element.
pub fn decode_fault(fault: &Node) -> Fault {
    let message = fault
        .child_text("faultstring")
        .unwrap_or_default()
        .to_owned();
    match fault.child("detail").and_then(|d| d.children.first()) {
        Some(detail) => Fault::from_fault_node(detail, message),
        None => Fault {
            kind: fault
                .child_text("faultcode")
                .map(|c| local_name(c.as_bytes()))
                .and_then(|c| std::str::from_utf8(c).ok())
                .filter(|c| !c.is_empty())
                .unwrap_or("ServerFaultCode")
                .to_owned(),
            message,
            detail: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_to_typed_errors() {
        let fault = |kind: &str, detail: Vec<Node>| Fault {
            kind: kind.into(),
            message: String::new(),
            detail: Some(Node {
                children: detail,
                ..Node::new("x")
            }),
        };
        assert_eq!(
            fault("InvalidLogin", vec![]).into_error("bob"),
            VsphereError::InvalidLogin {
                username: "bob".into()
            }
        );
        let mut obj = Node::with_text("obj", "vm-9");
        obj.mo_type = Some("VirtualMachine".into());
        assert_eq!(
            fault("ManagedObjectNotFound", vec![obj]).into_error("u"),
            VsphereError::NotFound {
                kind: "VirtualMachine".into(),
                name: "vm-9".into()
            }
        );
        assert!(matches!(
            fault("InsufficientMemoryResourcesFault", vec![]).into_error("u"),
            VsphereError::InsufficientResources { .. }
        ));
        assert_eq!(
            fault("InvalidDeviceSpec", vec![]).into_error("u"),
            VsphereError::TaskFailed {
                fault: "InvalidDeviceSpec".into(),
                message: "InvalidDeviceSpec".into()
            }
        );
    }
}
