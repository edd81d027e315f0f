//! A pull's steps seen from outside, against a real Debian `docker-registry`: the progress each step
//! reports, an image already built only committed under its new reference, a layer already stored
//! reported cached, and an image config that does not parse refused as a bad image (with its typed cause)
//! leaving nothing behind. Each test prints "SKIPPED <test>: <reason>" when the tools are missing.

use std::error::Error as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use image_service::testing::{self, busybox_base, OciLayout, Registry, TarBuilder};
use image_service::{Credentials, Digest, ErrorKind, ImageService, Progress};
use serde_json::json;

fn service(dir: &Path, registry: &str) -> ImageService {
    testing::plain_http_service(dir, registry, None)
}

/// Records what a pull reports: events in order, and the bytes downloaded.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    bytes: Mutex<u64>,
}

impl Recorder {
    fn push(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl Progress for Recorder {
    fn resolved(&self, layers: usize, bytes: u64) {
        self.push(format!("resolved {layers} layers {bytes} bytes"));
    }
    fn bytes(&self, n: u64) {
        *self.bytes.lock().unwrap() += n;
    }
    fn layer_done(&self, digest: &Digest, size: u64, cached: bool) {
        self.push(format!("layer {digest} {size} cached={cached}"));
    }
    fn stage(&self, stage: &str) {
        self.push(format!("stage {stage}"));
    }
}

/// Stores a compressed layer blob; returns its descriptor.
fn layer(layout: &OciLayout, tar: &[u8]) -> serde_json::Value {
    let data = testing::gzip(tar);
    layout.blob("application/vnd.oci.image.layer.v1.tar+gzip", &data)
}

#[tokio::test]
async fn each_step_reports_its_progress_and_a_built_image_is_only_committed_again() {
    image_service::require_registry_tools!(
        "each_step_reports_its_progress_and_a_built_image_is_only_committed_again"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    let top = TarBuilder::default()
        .file("etc/top", 0o644, b"top\n")
        .finish();
    let two = layout.image("amd64", &[(&base, "gzip"), (&top, "gzip")], "");
    let one = layout.image("amd64", &[(&base, "gzip")], "app");
    layout.tag(&two, "two");
    layout.tag(&one, "one");
    for tag in ["two", "one"] {
        reg.push(layout.path(), tag, &format!("steps/app:{tag}"), false)
            .unwrap();
    }
    let svc = service(dir.path(), &reg.host);
    let pull = |tag: String| {
        let svc = svc.clone();
        async move {
            let p = Arc::new(Recorder::default());
            let rec = svc
                .pull(
                    &tag,
                    &Credentials::default(),
                    Some(p.clone() as Arc<dyn Progress>),
                )
                .await
                .unwrap();
            (rec, p)
        }
    };

    let (rec, p) = pull(format!("{}/steps/app:two", reg.host)).await;
    let sizes: Vec<u64> = two_layer_sizes(&layout, &two);
    let mut events = p.events();
    assert_eq!(
        events[0],
        format!("resolved 2 layers {} bytes", sizes.iter().sum::<u64>())
    );
    // The layers finish in any order (fetched in parallel).
    events[1..3].sort();
    let mut layers: Vec<String> = rec
        .layers
        .iter()
        .zip(&sizes)
        .map(|(d, s)| format!("layer {d} {s} cached=false"))
        .collect();
    layers.sort();
    assert_eq!(events[1..3], layers[..]);
    assert_eq!(
        events[3..],
        ["stage unpacking", "stage building ext4 image", "stage done"]
    );
    assert_eq!(*p.bytes.lock().unwrap(), sizes.iter().sum::<u64>());

    // The same image by its digest: only the commit step runs.
    let (again, p) = pull(rec.repo_digests[0].clone()).await;
    assert_eq!(again.id, rec.id);
    assert_eq!(p.events(), ["stage done"]);
    assert_eq!(svc.stats().images_built, 1);

    // Another image on the same base layer: that layer is found in the store.
    let (other, p) = pull(format!("{}/steps/app:one", reg.host)).await;
    assert_ne!(other.id, rec.id);
    assert_eq!(other.layers, rec.layers[..1]);
    assert_eq!(
        p.events()[1],
        format!("layer {} {} cached=true", rec.layers[0], sizes[0])
    );
    assert_eq!(*p.bytes.lock().unwrap(), 0);
    assert_eq!(svc.stats().images_built, 2);
    assert_eq!(svc.stats().blobs_fetched, 4, "two configs and two layers");
}

/// The compressed sizes of the layers of image manifest `desc` in `layout`.
fn two_layer_sizes(layout: &OciLayout, desc: &serde_json::Value) -> Vec<u64> {
    testing::layer_digests(layout, desc)
        .iter()
        .map(|d| {
            let d: Digest = d.parse().unwrap();
            std::fs::metadata(layout.path().join("blobs/sha256").join(d.hex()))
                .unwrap()
                .len()
        })
        .collect()
}

#[tokio::test]
async fn an_unparsable_config_is_a_bad_image_and_leaves_nothing() {
    image_service::require_registry_tools!(
        "an_unparsable_config_is_a_bad_image_and_leaves_nothing"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    let l = layer(&layout, &base);
    // Valid JSON (a registry may check that much), not an image configuration.
    let config = layout.blob(
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture": 64, "os": ["linux"]}"#,
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [l],
    });
    let m = layout.blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    layout.tag(&m, "v1");
    reg.push(layout.path(), "v1", "badconfig/app:v1", false)
        .unwrap();
    let svc = service(dir.path(), &reg.host);

    let err = svc
        .pull(
            &format!("{}/badconfig/app:v1", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.to_string().starts_with("bad image: image config: "),
        "{err}"
    );
    let source = err.source().expect("the parse error is the source");
    assert!(source.is::<serde_json::Error>(), "{source:?}");
    assert!(svc.list().unwrap().is_empty(), "no record");
    let images = dir.path().join("state/images");
    assert!(
        testing::files_under(&images.join("content/blobs")).is_empty(),
        "the failed pull deleted the manifest and config it stored"
    );
    assert!(testing::files_under(&images.join("blocks")).is_empty());
    assert_eq!(svc.stats().blobs_fetched, 1, "only the config was fetched");
}
