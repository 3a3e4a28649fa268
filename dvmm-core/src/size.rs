//! VM sizes: the names users pick from (`S` … `XL`) and the table that
//! says, per tenant, what each means in CPU, memory and disk.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A named VM size. What each size means is configuration ([`SizeTable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VmSize {
    /// Small.
    S,
    /// Medium.
    M,
    /// Large.
    L,
    /// Extra large.
    XL,
}

impl VmSize {
    /// Every size, smallest first.
    pub const ALL: [VmSize; 4] = [VmSize::S, VmSize::M, VmSize::L, VmSize::XL];

    /// The size's name (`"S"`, `"M"`, `"L"`, `"XL"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            VmSize::S => "S",
            VmSize::M => "M",
            VmSize::L => "L",
            VmSize::XL => "XL",
        }
    }
}

impl fmt::Display for VmSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The text was not one of the known sizes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM size {0:?}; expected one of S, M, L, XL")]
pub struct UnknownSize(pub String);

impl FromStr for VmSize {
    type Err = UnknownSize;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "S" => Ok(VmSize::S),
            "M" => Ok(VmSize::M),
            "L" => Ok(VmSize::L),
            "XL" => Ok(VmSize::XL),
            _ => Err(UnknownSize(s.to_owned())),
        }
    }
}

/// Limits that keep a size sane: vSphere accepts more, but a value outside
/// these is almost certainly a typo in configuration.
pub mod limits {
    /// Most vCPUs a size may have.
    pub const MAX_CPU: u32 = 256;
    /// Fewest MiB of memory.
    pub const MIN_MEMORY_MIB: u64 = 256;
    /// Most MiB of memory (24 TiB, vSphere 8's maximum).
    pub const MAX_MEMORY_MIB: u64 = 24 * 1024 * 1024;
    /// Most GiB of disk (62 TiB, the VMDK maximum).
    pub const MAX_DISK_GIB: u64 = 62 * 1024;
}

/// CPU, memory and disk of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmResources {
    /// Number of virtual CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Size of the first disk in GiB.
    pub disk_gib: u64,
}

/// A resource value is zero, absurd, or not accepted by vSphere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    /// The field, e.g. `cpu` or `sizes.M.memory_mib`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl VmResources {
    /// Checks the values; `field_prefix` (e.g. `sizes.M`) goes into the error.
    ///
    /// # Errors
    /// A [`ResourceError`] naming the bad field.
    pub fn validate(&self, field_prefix: &str) -> Result<(), ResourceError> {
        let field = |name: &str| {
            if field_prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{field_prefix}.{name}")
            }
        };
        if self.cpu == 0 || self.cpu > limits::MAX_CPU {
            return Err(ResourceError {
                field: field("cpu"),
                reason: format!(
                    "must be between 1 and {}, got {}",
                    limits::MAX_CPU,
                    self.cpu
                ),
            });
        }
        if !(limits::MIN_MEMORY_MIB..=limits::MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ResourceError {
                field: field("memory_mib"),
                reason: format!(
                    "must be between {} and {} MiB, got {}",
                    limits::MIN_MEMORY_MIB,
                    limits::MAX_MEMORY_MIB,
                    self.memory_mib
                ),
            });
        }
        if !self.memory_mib.is_multiple_of(4) {
            return Err(ResourceError {
                field: field("memory_mib"),
                reason: format!("must be a multiple of 4 MiB, got {}", self.memory_mib),
            });
        }
        if self.disk_gib == 0 || self.disk_gib > limits::MAX_DISK_GIB {
            return Err(ResourceError {
                field: field("disk_gib"),
                reason: format!(
                    "must be between 1 and {} GiB, got {}",
                    limits::MAX_DISK_GIB,
                    self.disk_gib
                ),
            });
        }
        Ok(())
    }
}

/// What each [`VmSize`] means. Defaults: S = 1 vCPU / 2048 MiB / 20 GiB,
/// M = 2 / 4096 / 40, L = 4 / 8192 / 80, XL = 8 / 16384 / 160.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SizeTable(BTreeMap<VmSize, VmResources>);

impl Default for SizeTable {
    fn default() -> Self {
        let r = |cpu, memory_mib, disk_gib| VmResources {
            cpu,
            memory_mib,
            disk_gib,
        };
        Self(BTreeMap::from([
            (VmSize::S, r(1, 2048, 20)),
            (VmSize::M, r(2, 4096, 40)),
            (VmSize::L, r(4, 8192, 80)),
            (VmSize::XL, r(8, 16384, 160)),
        ]))
    }
}

impl SizeTable {
    /// The defaults with the given sizes replaced.
    ///
    /// # Errors
    /// A [`ResourceError`] naming `sizes.<SIZE>.<field>` when a value is bad.
    pub fn with_overrides(
        overrides: impl IntoIterator<Item = (VmSize, VmResources)>,
    ) -> Result<Self, ResourceError> {
        let mut table = Self::default();
        for (size, resources) in overrides {
            resources.validate(&format!("sizes.{size}"))?;
            table.0.insert(size, resources);
        }
        Ok(table)
    }

    /// The resources of a size.
    pub fn resources(&self, size: VmSize) -> VmResources {
        // Every size is present: the table starts from the full default set.
        self.0
            .get(&size)
            .copied()
            .unwrap_or_else(|| SizeTable::default().0[&size])
    }
}

impl<'de> Deserialize<'de> for SizeTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let overrides = BTreeMap::<VmSize, VmResources>::deserialize(deserializer)?;
        SizeTable::with_overrides(overrides).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_case_insensitively_and_reject_unknown() {
        assert_eq!("m".parse::<VmSize>().unwrap(), VmSize::M);
        assert_eq!("XL".parse::<VmSize>().unwrap(), VmSize::XL);
        let err = "XXL".parse::<VmSize>().unwrap_err();
        assert!(err.to_string().contains("S, M, L, XL"));
    }

    #[test]
    fn default_size_table_matches_the_documented_one() {
        let t = SizeTable::default();
        let m = t.resources(VmSize::M);
        assert_eq!((m.cpu, m.memory_mib, m.disk_gib), (2, 4096, 40));
        let xl = t.resources(VmSize::XL);
        assert_eq!((xl.cpu, xl.memory_mib, xl.disk_gib), (8, 16384, 160));
    }

    #[test]
    fn absurd_resources_are_rejected_with_the_field() {
        let err = SizeTable::with_overrides([(
            VmSize::S,
            VmResources {
                cpu: 0,
                memory_mib: 2048,
                disk_gib: 20,
            },
        )])
        .unwrap_err();
        assert_eq!(err.field, "sizes.S.cpu");
        let err = VmResources {
            cpu: 1,
            memory_mib: 1001,
            disk_gib: 1,
        }
        .validate("")
        .unwrap_err();
        assert_eq!(err.field, "memory_mib");
    }
}
