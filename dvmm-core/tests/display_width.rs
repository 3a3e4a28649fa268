//! `Display` of the values hosts print in tables honours width, fill and
//! alignment (`{:<12}`), as `str`'s does.

use dvmm_core::config::Secret;
use dvmm_core::spec::{NamePart, VmName};
use dvmm_core::{TimelineEntryType, VmRequestStatus, VmSize, VmStatus};

#[test]
fn request_statuses_pad() {
    assert_eq!(
        format!("[{:<12}]", VmRequestStatus::Ready),
        "[Ready       ]"
    );
    assert_eq!(format!("[{:>9}]", VmRequestStatus::Pending), "[  Pending]");
    assert_eq!(format!("[{:*^9}]", VmRequestStatus::Failed), "[*Failed**]");
    // Without a width, nothing changes.
    assert_eq!(VmRequestStatus::Provisioning.to_string(), "Provisioning");
}

#[test]
fn vm_statuses_pad() {
    assert_eq!(format!("[{:<10}]", VmStatus::Running), "[Running   ]");
}

#[test]
fn timeline_entry_types_pad() {
    let ty = TimelineEntryType::Approved;
    let plain = ty.to_string();
    assert_eq!(format!("[{ty:<20}]"), format!("[{plain:<20}]"));
    assert_eq!(format!("{ty:<20}").len(), 20.max(plain.len()));
}

#[test]
fn names_sizes_and_parts_pad() {
    let name = VmName::new("web", "app01").unwrap();
    assert_eq!(format!("[{name:<12}]"), "[web-app01   ]");
    assert_eq!(format!("[{:>4}]", VmSize::M), "[   M]");
    assert_eq!(format!("[{:<3}]", VmSize::XL), "[XL ]");
    assert_eq!(
        format!("[{:<16}]", NamePart::ProjectPrefix),
        "[project prefix  ]"
    );
    assert_eq!(format!("[{:<5}]", Secret::new("hunter2")), "[***  ]");
}

#[test]
fn precision_truncates_like_str() {
    let name = VmName::new("web", "app01").unwrap();
    assert_eq!(format!("{name:.3}"), "web");
}
