//! A pod test's bed: the guest artifacts, a registry with the pod image pushed, a temporary directory
//! whose `certs.d` declares the registry as plain http, and the test's own CNI network; plus what a
//! failed pod test prints (the daemon log and the guests' consoles) and the usual image pull.

use std::path::{Path, PathBuf};

use image_service::testing::{self, Registry};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use tonic::transport::Channel;

use crate::cni::TestNetwork;
use crate::guest::{native_prerequisites, pod_prerequisites};
use crate::image::push_pod_image;

/// Everything a pod test needs before it starts the daemon. Dropping it removes the network, the
/// registry and the directory.
pub struct PodBed {
    /// The guest directory (kernel and initramfs).
    pub guest: PathBuf,
    /// The pod image's reference (`<registry>/<repo>:latest`).
    pub image: String,
    /// The registry serving it.
    pub reg: Registry,
    // Dropped before the directory it lives in.
    net: TestNetwork,
    dir: tempfile::TempDir,
}

impl PodBed {
    /// The bed of `test` with the pod image pushed as `repo`; None (the test prints why it skips)
    /// when KVM, the guest files, the registry tools or CNI are missing.
    pub fn new(test: &str, repo: &str) -> Option<PodBed> {
        Self::with(pod_prerequisites(test)?, test, repo)
    }

    /// The bed of a test of native pods (no KVM needed, the agent binary is).
    pub fn native(test: &str, repo: &str) -> Option<PodBed> {
        Self::with(native_prerequisites(test)?, test, repo)
    }

    fn with(guest: PathBuf, test: &str, repo: &str) -> Option<PodBed> {
        let reg = Registry::start(None).unwrap();
        let dir = testing::tempdir();
        let net = TestNetwork::new(dir.path(), test)?;
        let image = push_pod_image(&reg, dir.path(), repo);
        testing::write_hosts(&dir.path().join("certs.d"), &reg.host, &reg.host).unwrap();
        Some(PodBed {
            guest,
            image,
            reg,
            net,
            dir,
        })
    }

    /// The test's directory (the daemon's state, socket and logs go below it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test's CNI network.
    pub fn net(&self) -> &TestNetwork {
        &self.net
    }
}

/// Prints the tail of the daemon log and of every pod's guest console (or native agent log) under `dir`: what a failed pod
/// test needs to be understood.
pub fn dump_failure(dir: &Path, daemon_log: &Path) {
    let log = std::fs::read_to_string(daemon_log).unwrap_or_default();
    eprintln!("daemon log (tail):\n{}", tail(&log, 20_000));
    let pods = std::fs::read_dir(dir.join("state/pods"));
    for pod in pods.into_iter().flatten().flatten() {
        // A VM's console, or a native pod's agent log.
        for name in ["console.log", "agent.log"] {
            let Ok(log) = std::fs::read_to_string(pod.path().join(name)) else {
                continue;
            };
            eprintln!("{name} of {}:\n{}", pod.path().display(), tail(&log, 6000));
        }
    }
}

fn tail(s: &str, bytes: usize) -> &str {
    let mut start = s.len().saturating_sub(bytes);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Pulls `image` through the CRI ImageService on `chan`, panicking on failure.
pub async fn pull(chan: Channel, image: &str) {
    ImageServiceClient::new(chan)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("PullImage");
}
