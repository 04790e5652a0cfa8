//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//!
//! A replica becomes leader when the Lease is free or expired, renews it every third of its
//! duration, and stops leading — the process exits, to be restarted as a follower — when a
//! renewal fails or another holder appears. Writes happen only while leading. On a graceful
//! shutdown the leader gives the Lease up, so a standby takes over at its next attempt rather
//! than after the Lease runs out (a rolling upgrade is not a lease duration without a leader).
//!
//! The operator leads for its whole life ([`Leadership::acquire`], [`Leadership::keep`]); the
//! webhook serves on every replica and only gates the writes that must happen once
//! ([`follow`]: a flag that is set while this replica holds the Lease).
//!
//! Expiry is judged against this replica's clock; replicas whose clocks differ by more than a
//! renewal interval may both lead for a moment (the writes they gate are idempotent).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::Lease,
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use serde::Deserialize;

/// Leader election settings (`leaderElection` in the operator's and the webhook's configuration).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElection {
    /// Whether to elect a leader (off only for a single replica).
    pub enabled: bool,
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// How long a lease lasts without renewal, in seconds.
    pub lease_seconds: u32,
}

impl LeaderElection {
    /// Election on the Lease `name` in `palisade-system`, lasting 15 s.
    pub fn named(name: &str) -> Self {
        LeaderElection {
            enabled: true,
            lease_name: name.into(),
            lease_namespace: "palisade-system".into(),
            lease_seconds: 15,
        }
    }
}

/// This replica's identity in a Lease: the pod's name (`POD_NAME`, from the downward API), else
/// the host name, with the process id so two processes on one host differ.
pub fn identity(program: &str) -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| program.to_owned());
    format!("{host}-{}", std::process::id())
}

/// A held lease.
pub struct Leadership {
    api: Api<Lease>,
    name: String,
    identity: String,
    seconds: u32,
}

/// Why leadership was lost or could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed a Lease call.
    #[error("lease request failed: {0}")]
    Kube(#[from] kube::Error),
    /// Another replica took the lease.
    #[error("lease {0} is now held by {1}")]
    Lost(String, String),
    /// A renewal did not finish in time.
    #[error("lease {0} could not be renewed in time")]
    RenewTimeout(String),
}

impl Leadership {
    /// Waits until this replica holds the lease.
    pub async fn acquire(
        client: Client,
        cfg: &LeaderElection,
        identity: String,
    ) -> Result<Self, LeaderError> {
        let api: Api<Lease> = Api::namespaced(client, &cfg.lease_namespace);
        let me = Leadership {
            api,
            name: cfg.lease_name.clone(),
            identity,
            seconds: cfg.lease_seconds,
        };
        loop {
            if me.try_take().await? {
                tracing::info!(lease = %me.name, identity = %me.identity, "leading");
                return Ok(me);
            }
            tokio::time::sleep(me.retry_every()).await;
        }
    }

    fn retry_every(&self) -> Duration {
        Duration::from_secs(u64::from(self.seconds.max(3) / 3))
    }

    async fn try_take(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)))
                < now
        });
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != self.identity);
        lease.spec = Some(self.spec(now, transitions));
        // Replace carries the resourceVersion we read: a concurrent taker gets a conflict.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn spec(
        &self,
        now: Timestamp,
        transitions: i32,
    ) -> k8s_openapi::api::coordination::v1::LeaseSpec {
        k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.seconds).unwrap_or(15)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Renews the lease until it is lost; returns why. A renewal that takes longer than a
    /// third of the lease counts as lost: by the time it could succeed, another replica may
    /// hold the lease.
    pub async fn keep(&self) -> LeaderError {
        loop {
            tokio::time::sleep(self.retry_every()).await;
            match tokio::time::timeout(self.retry_every(), self.renew()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e,
                Err(_) => return LeaderError::RenewTimeout(self.name.clone()),
            }
        }
    }

    /// Gives the lease up when this replica still holds it: no holder and a one-second duration,
    /// as client-go's `ReleaseOnCancel` leaves it. A conflict means someone else wrote the Lease
    /// meanwhile, so it is theirs and stays as it is.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let mut lease = self.api.get(&self.name).await?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %self.name, "lease released");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn renew(&self) -> Result<(), LeaderError> {
        let mut lease = self.api.get(&self.name).await?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity {
            return Err(LeaderError::Lost(self.name.clone(), holder));
        }
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

/// Takes the Lease whenever it is free, keeps it while it can, and says in `leading` whether this
/// replica holds it; `on_lead` runs each time leadership starts (to catch up with what a
/// previous leader may have left). Runs until `shutdown` resolves, then gives the Lease up.
/// API errors only delay the next attempt: a replica that cannot reach the Lease is no leader.
pub async fn follow(
    client: Client,
    cfg: LeaderElection,
    identity: String,
    leading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    on_lead: impl Fn() + Send,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use std::sync::atomic::Ordering;
    if !cfg.enabled {
        leading.store(true, Ordering::SeqCst);
        on_lead();
        shutdown.await;
        return;
    }
    let retry = Duration::from_secs(u64::from(cfg.lease_seconds.max(3) / 3));
    let run = async {
        loop {
            let held = match Leadership::acquire(client.clone(), &cfg, identity.clone()).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the lease");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            leading.store(true, Ordering::SeqCst);
            on_lead();
            let lost = held.keep().await;
            leading.store(false, Ordering::SeqCst);
            tracing::warn!(error = %lost, "no longer leading");
        }
    };
    tokio::select! {
        _ = run => {}
        () = shutdown => {}
    }
    if leading.swap(false, Ordering::SeqCst) {
        let me = Leadership {
            api: Api::namespaced(client, &cfg.lease_namespace),
            name: cfg.lease_name.clone(),
            identity,
            seconds: cfg.lease_seconds,
        };
        if let Err(e) = me.release().await {
            tracing::warn!(error = %e, "could not release the lease; a standby takes over when it runs out");
        }
    }
}
