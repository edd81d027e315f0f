//! Pod and container records in sled, the daemon's source of truth. Every transition is written here
//! before it is acted on (an intent state such as `Creating`) and after (the result), so a restarted
//! daemon can reconcile what it finds with what it was doing.
//!
//! Trees: `pods` (id → JSON [`PodRecord`]), `containers` (id → JSON [`ContainerRecord`]), `names` (CRI
//! name reservation → id, so two pods or containers never share a name).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not parse (written by an incompatible version or corrupted).
    #[error("state record {key}: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The name is reserved by another pod or container.
    #[error("name {name:?} is reserved for {id}")]
    NameTaken {
        /// The name.
        name: String,
        /// The holder.
        id: String,
    },
}

/// Lifecycle of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// RunPodSandbox is in progress (intent).
    Creating,
    /// The VM and agent run.
    Ready,
    /// Stopped, failed or found without a VM after a restart.
    NotReady,
}

/// Lifecycle of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// CreateContainer is in progress (intent).
    Creating,
    /// Created in the guest, not started.
    Created,
    /// Its init process runs.
    Running,
    /// Its init process ended (or its VM is gone).
    Exited,
}

/// A pod sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRecord {
    /// Sandbox id (64 hex digits).
    pub id: String,
    /// CRI name reservation key.
    pub name_key: String,
    /// The CRI PodSandboxConfig, protobuf-encoded.
    pub config: Vec<u8>,
    /// State.
    pub state: PodState,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// vCPUs the VM was sized with.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Image block slots in use: slot → image id.
    pub slots: BTreeMap<u32, String>,
    /// Why the pod is not ready, if it is not.
    pub reason: String,
    /// Host resources (VM socket, pod network) have been released.
    pub released: bool,
    /// The pod network: written before CNI ADD (intent) and with its result after; what teardown
    /// needs, also after a crash.
    #[serde(default)]
    pub network: Option<crate::network::NetworkRecord>,
    /// The pod's host cgroups: written before they are created; removed with the pod's resources.
    #[serde(default)]
    pub cgroups: Option<crate::cgroups::PodCgroups>,
    /// The CRI runtime handler the pod was run with (echoed in its status).
    #[serde(default)]
    pub runtime_handler: String,
    /// VM or native (records written before native pods existed are VM pods).
    #[serde(default)]
    pub kind: crate::pod::PodKind,
    /// A native pod's directory and cgroup on the node, recorded before its agent starts.
    #[serde(default)]
    pub native: Option<crate::pod::native::NativeRecord>,
}

/// A container.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container id (64 hex digits).
    pub id: String,
    /// Its pod.
    pub pod_id: String,
    /// CRI name reservation key.
    pub name_key: String,
    /// The CRI ContainerConfig, protobuf-encoded.
    pub config: Vec<u8>,
    /// The image id (digest) it runs.
    pub image_id: String,
    /// The image reference it was created from, as the client gave it.
    pub image_ref: String,
    /// The OCI runtime spec sent to the agent.
    pub spec_json: Vec<u8>,
    /// Signal that stops it (StopContainer).
    pub stop_signal: i32,
    /// Block slot of its image in the pod VM.
    pub slot: u32,
    /// State.
    pub state: ContainerState,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// Start time, ns (0 if not started).
    pub started_at: i64,
    /// Exit time, ns (0 if not exited).
    pub finished_at: i64,
    /// Exit code.
    pub exit_code: i32,
    /// CRI reason: Completed, Error, OOMKilled, ...
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Current resources (updated by UpdateContainerResources), protobuf-encoded
    /// LinuxContainerResources.
    pub resources: Vec<u8>,
    /// The absolute CRI log file (`<pod log_directory>/<log_path>`), empty without one.
    #[serde(default)]
    pub log_path: String,
    /// The identity its process runs with, as the guest resolved it (None before it was created).
    #[serde(default)]
    pub user: Option<ContainerUser>,
}

/// A container process's identity (CRI `ContainerStatus.user`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// Host resources of a pod that could not be released when it stopped, was removed or failed to start
/// (a CNI DEL that keeps failing, a cgroup that cannot be removed): kept and retried in the background
/// until they are released, so the pod itself never blocks Stop, Remove or a daemon start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// The pod's id.
    pub pod_id: String,
    /// `<namespace>/<name>` of the pod, for messages.
    pub pod_name: String,
    /// The pod network to tear down (CNI DEL, namespace).
    pub network: Option<crate::network::NetworkRecord>,
    /// The host cgroups to remove.
    pub cgroups: Option<crate::cgroups::PodCgroups>,
    /// A native pod's leftovers to sweep (processes, mounts, cgroups, directory).
    #[serde(default)]
    pub native: Option<crate::pod::native::NativeRecord>,
    /// Why the last attempt failed.
    pub last_error: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the first attempt failed, ns since the epoch.
    pub since: i64,
    /// When to try next, ns since the epoch (backing off after each failure).
    #[serde(default)]
    pub retry_at: i64,
}

impl ContainerRecord {
    /// The CRI config it was created from.
    pub fn cri_config(&self) -> k8s_cri::v1::ContainerConfig {
        prost::Message::decode(self.config.as_slice()).unwrap_or_default()
    }
}

impl PodRecord {
    /// The CRI config it was created from.
    pub fn cri_config(&self) -> k8s_cri::v1::PodSandboxConfig {
        prost::Message::decode(self.config.as_slice()).unwrap_or_default()
    }
}

/// The pod and container store.
#[derive(Clone)]
pub struct StateStore {
    pods: sled::Tree,
    containers: sled::Tree,
    names: sled::Tree,
    releases: sled::Tree,
}

fn load<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(value).map_err(|source| StateError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}

impl StateStore {
    /// Opens the trees in `db`.
    pub fn open(db: &sled::Db) -> Result<StateStore, StateError> {
        Ok(StateStore {
            pods: db.open_tree("pods")?,
            containers: db.open_tree("containers")?,
            names: db.open_tree("names")?,
            releases: db.open_tree("releases")?,
        })
    }

    /// Reserves `name` for `id`; reserving again for the same id is a no-op.
    pub fn reserve_name(&self, name: &str, id: &str) -> Result<(), StateError> {
        match self
            .names
            .compare_and_swap(name, None as Option<&[u8]>, Some(id.as_bytes()))?
        {
            Ok(()) => Ok(()),
            Err(e) if e.current.as_deref() == Some(id.as_bytes()) => Ok(()),
            Err(e) => Err(StateError::NameTaken {
                name: name.into(),
                id: String::from_utf8_lossy(&e.current.unwrap_or_default()).into_owned(),
            }),
        }
    }

    /// Releases `name` if `id` holds it.
    pub fn release_name(&self, name: &str, id: &str) -> Result<(), StateError> {
        let _ = self
            .names
            .compare_and_swap(name, Some(id.as_bytes()), None as Option<&[u8]>)?;
        Ok(())
    }

    /// Releases every name whose holder has no pod or container record (a crash between reserving
    /// the name and writing the record, or between deleting the record and releasing the name).
    /// Returns how many were released.
    pub fn prune_names(&self) -> Result<usize, StateError> {
        let mut pruned = 0;
        for kv in self.names.iter() {
            let (name, id) = kv?;
            let orphan = !self.pods.contains_key(&id)? && !self.containers.contains_key(&id)?;
            if orphan
                && self
                    .names
                    .compare_and_swap(&name, Some(id), None as Option<&[u8]>)?
                    .is_ok()
            {
                pruned += 1;
            }
        }
        self.names.flush()?;
        Ok(pruned)
    }

    /// Writes a pod record and flushes it to disk.
    pub fn put_pod(&self, pod: &PodRecord) -> Result<(), StateError> {
        self.pods.insert(&pod.id, encode(pod))?;
        self.pods.flush()?;
        Ok(())
    }

    /// A pod by id.
    pub fn pod(&self, id: &str) -> Result<Option<PodRecord>, StateError> {
        self.pods
            .get(id)?
            .map(|v| load(id.as_bytes(), &v))
            .transpose()
    }

    /// Every pod. A record that does not parse (an incompatible version, corruption) is logged and
    /// skipped, never deleted: one bad record must not stop the daemon or hide the other pods.
    pub fn pods(&self) -> Result<Vec<PodRecord>, StateError> {
        load_all(&self.pods, "pod")
    }

    /// Deletes a pod record.
    pub fn delete_pod(&self, id: &str) -> Result<(), StateError> {
        self.pods.remove(id)?;
        self.pods.flush()?;
        Ok(())
    }

    /// Writes a container record and flushes it to disk.
    pub fn put_container(&self, c: &ContainerRecord) -> Result<(), StateError> {
        self.containers.insert(&c.id, encode(c))?;
        self.containers.flush()?;
        Ok(())
    }

    /// A container by id.
    pub fn container(&self, id: &str) -> Result<Option<ContainerRecord>, StateError> {
        self.containers
            .get(id)?
            .map(|v| load(id.as_bytes(), &v))
            .transpose()
    }

    /// Every container (records that do not parse are logged and skipped, as in [`Self::pods`]).
    pub fn containers(&self) -> Result<Vec<ContainerRecord>, StateError> {
        load_all(&self.containers, "container")
    }

    /// The containers of a pod.
    pub fn pod_containers(&self, pod_id: &str) -> Result<Vec<ContainerRecord>, StateError> {
        Ok(self
            .containers()?
            .into_iter()
            .filter(|c| c.pod_id == pod_id)
            .collect())
    }

    /// Deletes a container record.
    pub fn delete_container(&self, id: &str) -> Result<(), StateError> {
        self.containers.remove(id)?;
        self.containers.flush()?;
        Ok(())
    }
}

impl StateStore {
    /// Records host resources to release later (replacing an earlier record of the pod).
    pub fn put_release(&self, r: &ReleaseRecord) -> Result<(), StateError> {
        self.releases.insert(&r.pod_id, encode(r))?;
        self.releases.flush()?;
        Ok(())
    }

    /// Every pending release.
    pub fn releases(&self) -> Result<Vec<ReleaseRecord>, StateError> {
        load_all(&self.releases, "release")
    }

    /// Drops a pod's pending release (its resources are released).
    pub fn delete_release(&self, pod_id: &str) -> Result<(), StateError> {
        self.releases.remove(pod_id)?;
        self.releases.flush()?;
        Ok(())
    }
}

/// Every parsable record of `tree`; unparsable ones are logged (by key) and skipped.
fn load_all<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    what: &str,
) -> Result<Vec<T>, StateError> {
    let mut out = Vec::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        match load(&k, &v) {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!("skipping the unreadable {what} record: {e}"),
        }
    }
    Ok(out)
}

/// Resolves an id or a unique prefix of one (crictl accepts truncated ids) among `ids`.
pub fn resolve_prefix<'a>(ids: impl Iterator<Item = &'a str>, wanted: &str) -> Option<String> {
    let mut found = None;
    for id in ids {
        if id == wanted {
            return Some(id.to_string());
        }
        if id.starts_with(wanted) {
            if found.is_some() {
                return None;
            }
            found = Some(id.to_string());
        }
    }
    found
}

/// Whether `labels` has every key/value of `selector`.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str) -> PodRecord {
        PodRecord {
            id: id.into(),
            name_key: format!("{id}_ns"),
            config: vec![1, 2],
            state: PodState::Creating,
            created_at: 1,
            vcpus: 1,
            mem_mib: 256,
            slots: BTreeMap::from([(0, "sha256:x".into())]),
            reason: String::new(),
            released: false,
            network: None,
            cgroups: None,
            runtime_handler: String::new(),
            kind: Default::default(),
            native: None,
        }
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let store = StateStore::open(&db).unwrap();
            store.put_pod(&pod("a")).unwrap();
            let mut b = pod("b");
            b.state = PodState::Ready;
            store.put_pod(&b).unwrap();
            store.delete_pod("a").unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let store = StateStore::open(&db).unwrap();
        let pods = store.pods().unwrap();
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].state, PodState::Ready);
        assert_eq!(pods[0].slots.get(&0).unwrap(), "sha256:x");
        assert!(store.pod("a").unwrap().is_none());
    }

    #[test]
    fn names_are_reserved_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = StateStore::open(&db).unwrap();
        store.reserve_name("web_default_uid_0", "a").unwrap();
        store.reserve_name("web_default_uid_0", "a").unwrap();
        let err = store.reserve_name("web_default_uid_0", "b").unwrap_err();
        assert!(
            matches!(err, StateError::NameTaken { ref id, .. } if id == "a"),
            "{err}"
        );
        // Only the holder releases.
        store.release_name("web_default_uid_0", "b").unwrap();
        assert!(store.reserve_name("web_default_uid_0", "b").is_err());
        store.release_name("web_default_uid_0", "a").unwrap();
        store.reserve_name("web_default_uid_0", "b").unwrap();
        // "b" has no record: a restart releases its name; names of existing records stay.
        store.put_pod(&pod("c")).unwrap();
        store.reserve_name("c_ns", "c").unwrap();
        assert_eq!(store.prune_names().unwrap(), 1);
        store.reserve_name("web_default_uid_0", "d").unwrap();
        assert!(store.reserve_name("c_ns", "e").is_err());
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = StateStore::open(&db).unwrap();
        db.open_tree("pods").unwrap().insert("bad", b"{").unwrap();
        store.put_pod(&pod("good")).unwrap();
        assert!(matches!(store.pod("bad"), Err(StateError::Corrupt { .. })));
        // Listing skips it (the daemon must start and serve the other pods) and keeps it stored.
        let pods = store.pods().unwrap();
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].id, "good");
        assert!(db.open_tree("pods").unwrap().contains_key("bad").unwrap());
    }

    #[test]
    fn prefixes_resolve_only_when_unique() {
        let ids = ["abc123", "abd456", "ffff"];
        assert_eq!(
            resolve_prefix(ids.iter().copied(), "abc").as_deref(),
            Some("abc123")
        );
        assert_eq!(resolve_prefix(ids.iter().copied(), "ab"), None);
        assert_eq!(
            resolve_prefix(ids.iter().copied(), "ffff").as_deref(),
            Some("ffff")
        );
        assert_eq!(resolve_prefix(ids.iter().copied(), "x"), None);
    }
}
