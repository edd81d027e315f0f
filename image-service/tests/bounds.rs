//! Bounded inputs end to end against a real Debian `docker-registry`: a GNU sparse entry (a tiny layer that
//! would expand past the caps) is refused, an oversized image config is refused before it is fetched, a blob that does not
//! match its digest is `DataLoss`, and a failed pull leaves no blob that no image references. Each test
//! prints "SKIPPED <test>: <reason>" when the tools are missing.

use std::path::Path;
use std::time::{Duration, Instant};

use image_service::apply::Limits;
use image_service::testing::{self, busybox_base, layer_digests, OciLayout, Registry, TarBuilder};
use image_service::{Credentials, ErrorKind, ImageService};

fn service(dir: &Path, registry: &str, limits: Option<Limits>) -> ImageService {
    testing::plain_http_service(dir, registry, limits)
}

/// Asserts the store holds exactly the blobs the stored images reference, no build and no block image
/// beyond theirs (without a garbage collection: the failed pull cleaned up after itself).
fn assert_only_referenced(svc: &ImageService, dir: &Path) {
    let images = dir.join("state/images");
    let records = svc.list().unwrap();
    let mut referenced: Vec<String> = records
        .iter()
        .flat_map(|r| r.blobs.iter().map(|b| b.hex().to_owned()))
        .collect();
    referenced.sort();
    referenced.dedup();
    let mut stored: Vec<String> = testing::files_under(&images.join("content/blobs"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    assert_eq!(stored, referenced, "blobs no image references were left");
    assert!(testing::files_under(&images.join("content/ingest")).is_empty());
    assert!(
        testing::files_under(&images.join("tmp")).is_empty(),
        "no build left"
    );
    assert_eq!(
        testing::files_under(&images.join("blocks")).len(),
        records.len(),
        "no block image but the stored images'"
    );
}

#[tokio::test]
async fn a_gnu_sparse_layer_fails_the_pull_and_leaves_nothing() {
    image_service::require_registry_tools!("a_gnu_sparse_layer_fails_the_pull_and_leaves_nothing");
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    // 256 MiB logical in a few hundred archive bytes.
    let sparse = TarBuilder::default()
        .gnu_sparse("var/huge", 0o644, 256 << 20, b"tail")
        .finish();
    assert!(sparse.len() < 4096, "{}", sparse.len());
    let m = layout.image("amd64", &[(&base, "gzip"), (&sparse, "gzip")], "");
    layout.tag(&m, "v1");
    reg.push(layout.path(), "v1", "sparse/app:v1", false)
        .unwrap();
    let limits = Limits {
        max_layer_bytes: 64 << 20,
        max_image_bytes: 64 << 20,
    };
    let svc = service(dir.path(), &reg.host, Some(limits));

    let started = Instant::now();
    let err = svc
        .pull(
            &format!("{}/sparse/app:v1", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    println!("sparse layer refused in {took:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.to_string()
            .contains("\"var/huge\": GNU sparse file (268435456 bytes expanded) is not supported"),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(svc.list().unwrap().is_empty(), "no record");
    assert_eq!(svc.stats().images_built, 0);
    assert_only_referenced(&svc, dir.path());
}

#[tokio::test]
async fn an_oversized_image_config_is_refused_before_it_is_fetched() {
    image_service::require_registry_tools!(
        "an_oversized_image_config_is_refused_before_it_is_fetched"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let layout = OciLayout::new(&dir.path().join("layout"));
    let layer = TarBuilder::default().file("a", 0o644, b"a").finish();
    let m = layout.image_padded("amd64", &[(&layer, "gzip")], "", 5 << 20);
    reg.push_raw(&layout, &m, "fat/config", "v1").await.unwrap();
    let svc = service(dir.path(), &reg.host, None);

    let err = svc
        .pull(
            &format!("{}/fat/config:v1", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("image config") && msg.contains("over the 4194304-byte limit"),
        "{msg}"
    );
    assert_eq!(svc.stats().blobs_fetched, 0, "nothing was downloaded");
    assert_only_referenced(&svc, dir.path());
}

#[tokio::test]
async fn a_corrupt_blob_is_data_loss_and_its_pull_leaves_no_unreferenced_blob() {
    image_service::require_registry_tools!(
        "a_corrupt_blob_is_data_loss_and_its_pull_leaves_no_unreferenced_blob"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    let good = layout.image("amd64", &[(&base, "gzip")], "");
    layout.tag(&good, "good");
    let other = TarBuilder::default()
        .file("etc/other", 0o644, &[7u8; 4096])
        .finish();
    let bad = layout.image("amd64", &[(&base, "gzip"), (&other, "gzip")], "");
    layout.tag(&bad, "bad");
    reg.push(layout.path(), "good", "store/app:good", false)
        .unwrap();
    reg.push(layout.path(), "bad", "store/app:bad", false)
        .unwrap();
    let svc = service(dir.path(), &reg.host, None);
    let good_ref = format!("{}/store/app:good", reg.host);
    svc.pull(&good_ref, &Credentials::default(), None)
        .await
        .unwrap();

    // The registry now serves the second layer with one byte changed (same size, other digest).
    let layer = layer_digests(&layout, &bad)[1].clone();
    let path = reg.blob_path(&layer);
    let mut data = std::fs::read(&path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let started = Instant::now();
    let err = svc
        .pull(
            &format!("{}/store/app:bad", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(err.kind(), ErrorKind::DataLoss, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("digest mismatch for {layer}")),
        "{err}"
    );
    // The shared base layer, the good image's manifest and config stay; the bad image's manifest,
    // config and nothing else of it remain.
    assert_eq!(svc.list().unwrap().len(), 1);
    assert_only_referenced(&svc, dir.path());
    assert!(svc.status(&good_ref).unwrap().is_some());
}
