//! Giving a stopped pod's host resources back (its VM socket, its network: CNI DEL and namespace, its
//! host cgroups), and retrying in the background what could not be given back. A pod whose CNI DEL
//! keeps failing (a plugin binary removed after the pod ran, a plugin bug) must never block
//! StopPodSandbox, RemovePodSandbox or a daemon start: what failed is recorded in the state store
//! ([`ReleaseRecord`]), reported (a warning naming the pod and the cause, the
//! `podvisor_pending_releases` gauge and `podvisor_release_failures` counter), and retried with backoff.

use std::time::Duration;

use super::{now_ns, Manager, SandboxError};
use crate::cgroups::PodCgroups;
use crate::network::NetworkRecord;
use crate::pod::native::NativeRecord;
use crate::state::{PodRecord, ReleaseRecord};

/// First retry delay; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between two attempts of one pod.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the retrier looks for releases that are due.
const POLL: Duration = Duration::from_secs(1);

fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// `<namespace>/<name>` of a pod, for messages.
fn pod_name(record: &PodRecord) -> String {
    let m = record.cri_config().metadata.unwrap_or_default();
    format!("{}/{}", m.namespace, m.name)
}

impl Manager {
    /// Gives back what pod `record` holds on the host. Whatever fails is handed to the background
    /// retrier (and reported): the pod's own state can move on. Returns whether everything was
    /// released now; Err only when the state store fails.
    pub(super) async fn release_or_defer(&self, record: &PodRecord) -> Result<bool, SandboxError> {
        let sock = self.vsock_path(&record.id);
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pod = %record.id, "removing {}: {e}", sock.display()),
        }
        let network = record.network.clone();
        let cgroups = record.cgroups.clone();
        let native = record.native.clone();
        match self
            .release(network.as_ref(), cgroups.clone(), native.as_ref())
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                let now = now_ns();
                let pending = ReleaseRecord {
                    pod_id: record.id.clone(),
                    pod_name: pod_name(record),
                    network,
                    cgroups,
                    native,
                    last_error: e.to_string(),
                    attempts: 1,
                    since: now,
                    retry_at: now + backoff(1).as_nanos() as i64,
                };
                crate::metrics::METRICS.release_failed();
                tracing::warn!(
                    pod = %record.id,
                    name = %pending.pod_name,
                    "host resources of the pod were not released (retrying in the background): {e}"
                );
                self.store().put_release(&pending)?;
                Ok(false)
            }
        }
    }

    /// Releases a pod network and host cgroups, after sweeping what a native pod left on the node;
    /// each is tried even if another fails, and the first failure is returned.
    async fn release(
        &self,
        network: Option<&NetworkRecord>,
        cgroups: Option<PodCgroups>,
        native: Option<&NativeRecord>,
    ) -> Result<(), SandboxError> {
        // Its processes first: they may hold the network namespace and the cgroups.
        let swept = match native {
            Some(native) => crate::pod::native::sweep(&self.config().native.agent, native)
                .await
                .map_err(SandboxError::from),
            None => Ok(()),
        };
        let network = match network {
            Some(network) => self
                .inner
                .network
                .teardown(network)
                .await
                .map_err(SandboxError::from),
            None => Ok(()),
        };
        let cgroups = match cgroups {
            Some(cgroups) => crate::pod::blocking("cgroup", move || cgroups.remove())
                .await
                .map_err(SandboxError::from),
            None => Ok(()),
        };
        swept.and(network).and(cgroups)
    }

    /// Retries the pending releases that are due; returns how many remain.
    pub async fn retry_releases(&self) -> Result<usize, SandboxError> {
        let store = self.store();
        let mut remaining = 0;
        for mut pending in store.releases()? {
            if pending.retry_at > now_ns() {
                remaining += 1;
                continue;
            }
            match self
                .release(
                    pending.network.as_ref(),
                    pending.cgroups.clone(),
                    pending.native.as_ref(),
                )
                .await
            {
                Ok(()) => {
                    tracing::info!(
                        pod = %pending.pod_id,
                        name = %pending.pod_name,
                        attempts = pending.attempts + 1,
                        "released the host resources of a removed pod"
                    );
                    store.delete_release(&pending.pod_id)?;
                }
                Err(e) => {
                    pending.attempts = pending.attempts.saturating_add(1);
                    pending.last_error = e.to_string();
                    pending.retry_at = now_ns() + backoff(pending.attempts).as_nanos() as i64;
                    crate::metrics::METRICS.release_failed();
                    tracing::warn!(
                        pod = %pending.pod_id,
                        name = %pending.pod_name,
                        attempts = pending.attempts,
                        "host resources of the pod still not released: {e}"
                    );
                    store.put_release(&pending)?;
                    remaining += 1;
                }
            }
        }
        Ok(remaining)
    }

    /// Retries pending releases in the background for as long as the daemon runs.
    pub fn spawn_release_retrier(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.retry_releases().await {
                    tracing::error!("retrying pending releases: {e}");
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
