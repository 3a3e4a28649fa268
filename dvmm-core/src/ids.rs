//! Identifier newtypes.
//!
//! Every identifier is its own type so a tenant id can never be passed where a
//! request id is expected. The UUID-backed ids serialize as plain UUID strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new random (version 4) id, for hosts that mint their own
            /// ids (users, projects, tenants) without a `uuid` dependency.
            /// The service mints its ids through its
            /// [`IdGenerator`](crate::IdGenerator) instead.
            pub fn new_v4() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Padded to the caller's width: `Uuid`'s own `Display` ignores it.
                f.pad(self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A tenant: the unit of isolation (own folder, own vCenter settings, own events).
    TenantId
);
uuid_id!(
    /// A project inside a tenant.
    ProjectId
);
uuid_id!(
    /// A user of the host application (requester, approver).
    UserId
);
uuid_id!(
    /// A self-service VM request; also the id of its event stream.
    VmRequestId
);
uuid_id!(
    /// A VM managed by dvmm; also the id of its event stream. It is written
    /// into the vSphere VM so a rerun after a crash can recognise its own VM.
    VmId
);
uuid_id!(
    /// Ties together every event caused by one user action.
    CorrelationId
);
uuid_id!(
    /// The unique id of one event; stores use it to recognise a re-append.
    EventId
);

/// The vSphere managed-object id of a virtual machine, such as `vm-1042`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmwareVmId(String);

impl VmwareVmId {
    /// Wraps a managed-object id as vCenter reported it.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The managed-object id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmwareVmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings_and_json() {
        let id = VmRequestId::from_uuid(Uuid::from_u128(0x1234));
        let parsed: VmRequestId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00000000-0000-0000-0000-000000001234\"");
        assert_eq!(serde_json::from_str::<VmRequestId>(&json).unwrap(), id);
        assert!("not-a-uuid".parse::<TenantId>().is_err());
    }

    #[test]
    fn new_v4_ids_are_random_version_4_uuids() {
        let a = UserId::new_v4();
        let b = UserId::new_v4();
        assert_ne!(a, b);
        assert_eq!(a.as_uuid().get_version_num(), 4);
    }

    #[test]
    fn display_pads_to_the_requested_width() {
        let id = TenantId::from_uuid(Uuid::from_u128(0x1234));
        assert_eq!(
            format!("[{id:>40}]"),
            "[    00000000-0000-0000-0000-000000001234]"
        );
        assert_eq!(format!("{id}"), "00000000-0000-0000-0000-000000001234");
        assert_eq!(format!("[{:<9}]", VmwareVmId::new("vm-1")), "[vm-1     ]");
    }

    #[test]
    fn vmware_id_is_transparent() {
        let id = VmwareVmId::new("vm-1042");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"vm-1042\"");
        assert_eq!(id.as_str(), "vm-1042");
    }
}
