//! A bad VM name comes back from the service as a typed error that says
//! which part is wrong, so a host's form can mark that field.

use std::sync::Arc;

use dvmm::prelude::*;
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::Simulator;
use dvmm::{DomainError, NamePart};

async fn submit(
    prefix: &str,
    name: &str,
    justification: &str,
) -> Result<VmRequestId, ServiceError> {
    let sim = Simulator::default();
    let tenant = sim
        .tenant_config(TenantId::new_v4(), "acme")
        .expect("the default inventory places VMs");
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        sim,
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).expect("a valid tenant"),
    );
    service
        .submit(NewVmRequest {
            tenant_id: tenant.tenant_id,
            project_id: ProjectId::new_v4(),
            project_prefix: prefix.into(),
            requested_name: name.into(),
            size: VmSize::S,
            requested_by: UserId::new_v4(),
            justification: justification.into(),
        })
        .await
}

#[tokio::test]
async fn a_bad_requested_name_is_an_invalid_name_error_naming_that_part() {
    match submit("web", "App_01", "test").await {
        Err(ServiceError::InvalidName(error)) => {
            assert_eq!(error.part(), NamePart::RequestedName);
            assert!(matches!(
                error,
                NameError::InvalidCharacter {
                    found: 'A',
                    index: 0,
                    ..
                }
            ));
        }
        other => panic!("expected ServiceError::InvalidName, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_prefix_is_an_invalid_name_error_naming_the_prefix() {
    match submit("web-", "app01", "test").await {
        Err(ServiceError::InvalidName(error)) => {
            assert_eq!(error.part(), NamePart::ProjectPrefix);
            // The message a host shows as is still names the part.
            assert!(error.to_string().starts_with("project prefix"), "{error}");
        }
        other => panic!("expected ServiceError::InvalidName, got {other:?}"),
    }
}

#[tokio::test]
async fn other_bad_input_stays_a_domain_error() {
    let long = "x".repeat(dvmm::error::MAX_TEXT_CHARS + 1);
    match submit("web", "app01", &long).await {
        Err(ServiceError::Domain(DomainError::TooLong { field, .. })) => {
            assert_eq!(field, "justification");
        }
        other => panic!("expected a TooLong domain error, got {other:?}"),
    }
}
