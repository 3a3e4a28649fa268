//! What the simulated vCenter contains before any VM is cloned: datacenters
//! with their clusters, datastores, networks, templates and folders.
//!
//! Every type has public fields and a small builder, so a test can start from
//! [`Inventory::default`] and tweak one value, or build a custom inventory:
//!
//! ```
//! use dvmm_vsphere::sim::{Inventory, NetworkKind, SimDatacenter};
//! use dvmm_core::VmResources;
//!
//! let inventory = Inventory::empty().with_datacenter(
//!     SimDatacenter::new("Lab")
//!         .with_cluster("Lab_C0")
//!         .with_datastore("nfs-01", 500)
//!         .with_network("tenant-a", NetworkKind::Distributed)
//!         .with_template("rocky-9", VmResources { cpu: 2, memory_mib: 2048, disk_gib: 20 }),
//! );
//! assert_eq!(inventory.datacenters[0].datastores[0].free_gib, 500);
//! ```

use dvmm_core::VmResources;

/// Name of the default inventory's datacenter.
pub const DEFAULT_DATACENTER: &str = "DC0";
/// Name of the default inventory's cluster.
pub const DEFAULT_CLUSTER: &str = "DC0_C0";
/// Name of the default inventory's datastore.
pub const DEFAULT_DATASTORE: &str = "LocalDS_0";
/// Free space of the default datastore, in GiB (10 TiB).
pub const DEFAULT_DATASTORE_FREE_GIB: u64 = 10 * 1024;
/// Name of the default inventory's standard port group.
pub const DEFAULT_NETWORK: &str = "VM Network";
/// Name of the default inventory's distributed port group.
pub const DEFAULT_DISTRIBUTED_NETWORK: &str = "DC0_DVPG0";
/// Name of the default inventory's template.
pub const DEFAULT_TEMPLATE: &str = "ubuntu-22.04-template";
/// Hardware of the default template: 1 vCPU, 1024 MiB, 10 GiB disk.
pub const DEFAULT_TEMPLATE_RESOURCES: VmResources = VmResources {
    cpu: 1,
    memory_mib: 1024,
    disk_gib: 10,
};

/// Everything the simulated vCenter manages, apart from the VMs it clones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// The datacenters, looked up by name.
    pub datacenters: Vec<SimDatacenter>,
}

impl Inventory {
    /// An inventory with no datacenter at all (every `create_vm` fails with
    /// `NotFound { kind: "datacenter" }` until one is added).
    pub fn empty() -> Self {
        Self {
            datacenters: Vec::new(),
        }
    }

    /// Adds a datacenter.
    #[must_use]
    pub fn with_datacenter(mut self, datacenter: SimDatacenter) -> Self {
        self.datacenters.push(datacenter);
        self
    }

    /// The datacenter of that name, for tweaking.
    pub fn datacenter_mut(&mut self, name: &str) -> Option<&mut SimDatacenter> {
        self.datacenters.iter_mut().find(|dc| dc.name == name)
    }
}

impl Default for Inventory {
    /// Datacenter `DC0` with cluster `DC0_C0`, datastore `LocalDS_0`
    /// (10 TiB free), networks `VM Network` (standard) and `DC0_DVPG0`
    /// (distributed) and the template `ubuntu-22.04-template` (1 vCPU,
    /// 1024 MiB, 10 GiB): the names vcsim uses, so configurations written for
    /// one work on the other.
    fn default() -> Self {
        Self::empty().with_datacenter(
            SimDatacenter::new(DEFAULT_DATACENTER)
                .with_cluster(DEFAULT_CLUSTER)
                .with_datastore(DEFAULT_DATASTORE, DEFAULT_DATASTORE_FREE_GIB)
                .with_network(DEFAULT_NETWORK, NetworkKind::Standard)
                .with_network(DEFAULT_DISTRIBUTED_NETWORK, NetworkKind::Distributed)
                .with_template(DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_RESOURCES),
        )
    }
}

/// A datacenter and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimDatacenter {
    /// Datacenter name.
    pub name: String,
    /// Clusters.
    pub clusters: Vec<SimCluster>,
    /// Datastores.
    pub datastores: Vec<SimDatastore>,
    /// Port groups.
    pub networks: Vec<SimNetwork>,
    /// Templates VMs are cloned from.
    pub templates: Vec<SimTemplate>,
    /// VM folders that exist from the start, as paths below the datacenter's
    /// VM folder (`acme/web`). Folders named by a `VmSpec` are created on
    /// demand, so this only matters for introspection.
    pub folders: Vec<String>,
}

impl SimDatacenter {
    /// An empty datacenter.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            clusters: Vec::new(),
            datastores: Vec::new(),
            networks: Vec::new(),
            templates: Vec::new(),
            folders: Vec::new(),
        }
    }

    /// Adds a cluster without resource pools (only its root pool).
    #[must_use]
    pub fn with_cluster(mut self, name: impl Into<String>) -> Self {
        self.clusters.push(SimCluster::new(name));
        self
    }

    /// Adds a cluster with resource pools below its root pool.
    #[must_use]
    pub fn with_cluster_and_pools<P: Into<String>>(
        mut self,
        name: impl Into<String>,
        resource_pools: impl IntoIterator<Item = P>,
    ) -> Self {
        let mut cluster = SimCluster::new(name);
        cluster.resource_pools = resource_pools.into_iter().map(Into::into).collect();
        self.clusters.push(cluster);
        self
    }

    /// Adds a datastore with `free_gib` GiB free.
    #[must_use]
    pub fn with_datastore(mut self, name: impl Into<String>, free_gib: u64) -> Self {
        self.datastores.push(SimDatastore {
            name: name.into(),
            free_gib,
        });
        self
    }

    /// Adds a port group.
    #[must_use]
    pub fn with_network(mut self, name: impl Into<String>, kind: NetworkKind) -> Self {
        self.networks.push(SimNetwork {
            name: name.into(),
            kind,
        });
        self
    }

    /// Adds a template.
    #[must_use]
    pub fn with_template(mut self, name: impl Into<String>, resources: VmResources) -> Self {
        self.templates.push(SimTemplate {
            name: name.into(),
            resources,
        });
        self
    }

    /// Adds a VM folder (path below the datacenter's VM folder).
    #[must_use]
    pub fn with_folder(mut self, path: impl Into<String>) -> Self {
        self.folders.push(path.into());
        self
    }
}

/// A cluster. A `VmSpec` without a resource pool lands in its root pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimCluster {
    /// Cluster name.
    pub name: String,
    /// Resource pool paths below the cluster's root pool (`tenants/acme`),
    /// matched against `VmSpec::resource_pool` with surrounding `/` ignored.
    pub resource_pools: Vec<String>,
}

impl SimCluster {
    /// A cluster with only its root resource pool.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            resource_pools: Vec::new(),
        }
    }
}

/// A datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimDatastore {
    /// Datastore name.
    pub name: String,
    /// Free space in GiB. A clone whose disk is larger fails with
    /// `InsufficientResources`. Clones are modelled as thin-provisioned:
    /// they do not use up this space.
    pub free_gib: u64,
}

/// Whether a port group lives on a standard or a distributed switch; the
/// SOAP client backs the NIC differently for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetworkKind {
    /// A standard switch port group (`Network`).
    Standard,
    /// A distributed port group (`DistributedVirtualPortgroup`).
    Distributed,
}

/// A port group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimNetwork {
    /// Port group name.
    pub name: String,
    /// Switch kind.
    pub kind: NetworkKind,
}

/// A template VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimTemplate {
    /// Template name.
    pub name: String,
    /// Its hardware; a clone keeps the larger of this disk and the requested
    /// one, since vSphere can grow a disk but never shrink it.
    pub resources: VmResources,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_inventory_has_the_vcsim_names() {
        let inventory = Inventory::default();
        let dc = &inventory.datacenters[0];
        assert_eq!(dc.name, "DC0");
        assert_eq!(dc.clusters[0].name, "DC0_C0");
        assert_eq!(dc.datastores[0].name, "LocalDS_0");
        assert_eq!(
            dc.networks
                .iter()
                .map(|n| (n.name.as_str(), n.kind))
                .collect::<Vec<_>>(),
            [
                ("VM Network", NetworkKind::Standard),
                ("DC0_DVPG0", NetworkKind::Distributed)
            ]
        );
        assert_eq!(dc.templates[0].name, "ubuntu-22.04-template");
        assert_eq!(
            dc.templates[0].resources,
            VmResources {
                cpu: 1,
                memory_mib: 1024,
                disk_gib: 10
            }
        );
    }

    #[test]
    fn builder_and_tweaks() {
        let mut inventory = Inventory::default().with_datacenter(
            SimDatacenter::new("DC1")
                .with_cluster_and_pools("C1", ["tenants/acme"])
                .with_folder("acme"),
        );
        assert_eq!(inventory.datacenters.len(), 2);
        assert_eq!(
            inventory.datacenters[1].clusters[0].resource_pools,
            ["tenants/acme"]
        );
        inventory
            .datacenter_mut("DC0")
            .expect("DC0 exists")
            .datastores[0]
            .free_gib = 5;
        assert_eq!(inventory.datacenters[0].datastores[0].free_gib, 5);
        assert!(inventory.datacenter_mut("nope").is_none());
        assert!(Inventory::empty().datacenters.is_empty());
    }
}
