//! The election record as a `coordination.k8s.io/v1` Lease, written with the resourceVersion
//! read (a replace; 409 Conflict when someone wrote in between).

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::{LeaseBackend, LeaseError, LeaseRecord, Versioned};

/// The Lease `name` in `namespace`.
#[derive(Clone)]
pub struct KubeLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
}

impl KubeLease {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn lease(&self, record: &LeaseRecord, version: Option<&str>) -> Lease {
        let micro = |t: SystemTime| {
            k8s_openapi::jiff::Timestamp::try_from(t)
                .ok()
                .map(MicroTime)
        };
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.map(str::to_owned),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: record.holder.clone(),
                acquire_time: record.acquire_time.and_then(micro),
                renew_time: record.renew_time.and_then(micro),
                lease_duration_seconds: Some(
                    i32::try_from(record.lease_duration.as_secs()).unwrap_or(i32::MAX),
                ),
                lease_transitions: Some(i32::try_from(record.transitions).unwrap_or(i32::MAX)),
                ..Default::default()
            }),
        }
    }
}

/// The record a Lease carries; a Lease without a spec or with nonsense numbers reads as
/// free (never renewed), as client-go treats it.
pub fn record_of(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    let time = |t: Option<MicroTime>| t.map(|MicroTime(ts)| SystemTime::from(ts));
    LeaseRecord {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        acquire_time: time(spec.acquire_time),
        renew_time: time(spec.renew_time),
        lease_duration: Duration::from_secs(
            spec.lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
        ),
        transitions: spec
            .lease_transitions
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
    }
}

fn versioned(lease: &Lease) -> Versioned {
    Versioned {
        record: record_of(lease),
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn api_error(operation: &'static str) -> impl Fn(kube::Error) -> LeaseError {
    move |source| match &source {
        kube::Error::Api(status) if status.code == 409 => LeaseError::Conflict,
        _ => LeaseError::Kubernetes { operation, source },
    }
}

impl LeaseBackend for KubeLease {
    async fn get(&self) -> Result<Option<Versioned>, LeaseError> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(api_error("reading the Lease"))?;
        Ok(lease.as_ref().map(versioned))
    }

    async fn create(&self, record: &LeaseRecord) -> Result<Versioned, LeaseError> {
        let created = self
            .api
            .create(&PostParams::default(), &self.lease(record, None))
            .await
            .map_err(api_error("creating the Lease"))?;
        Ok(versioned(&created))
    }

    async fn update(&self, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
        let replaced = self
            .api
            .replace(
                &self.name,
                &PostParams::default(),
                &self.lease(record, Some(version)),
            )
            .await
            .map_err(api_error("updating the Lease"))?;
        Ok(versioned(&replaced))
    }

    fn describe(&self) -> String {
        format!("Lease {}/{}", self.namespace, self.name)
    }
}
