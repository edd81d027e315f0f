//! End-to-end pulls from a real Debian `docker-registry` on 127.0.0.1, with busybox images built offline
//! and pushed with skopeo. Each test prints "SKIPPED <test>: <reason>" when the tools are missing.

use std::path::Path;

use image_service::testing::{self, busybox_base, config_digest, OciLayout, Registry, TarBuilder};
use image_service::{Config, Credentials, ErrorKind, ImageService};

fn service(dir: &Path, registry: &str) -> ImageService {
    testing::plain_http_service(dir, registry, None)
}

/// Pushes the standard two-layer multi-arch test image (layer 1 gzip, layer 2 zstd with whiteouts and an
/// opaque directory) as `<repo>:<tag>`; returns (layout, amd64 image id, amd64 manifest descriptor).
fn push_busybox(reg: &Registry, dir: &Path, repo: &str, tag: &str) -> (OciLayout, String) {
    let mut layout = OciLayout::new(&dir.join(format!("layout-{tag}")));
    let base = busybox_base();
    let top = TarBuilder::default()
        .file("etc/.wh.removed-later", 0o644, b"")
        .file("opt/old/.wh..wh..opq", 0o644, b"")
        .file("opt/old/c", 0o644, b"upper")
        .file("etc/layer2", 0o600, b"from layer 2\n")
        .finish();
    let amd64 = layout.image("amd64", &[(&base, "gzip"), (&top, "zstd")], "app");
    let arm64 = layout.image("arm64", &[(&base, "gzip")], "");
    let index = layout.index(&[arm64, amd64.clone()]);
    layout.tag(&index, tag);
    reg.push(layout.path(), tag, &format!("{repo}:{tag}"), false)
        .unwrap();
    let id = config_digest(&layout, &amd64);
    (layout, id)
}

#[tokio::test]
async fn multi_arch_index_by_tag_then_by_digest_builds_a_real_block_image() {
    image_service::require_registry_tools!(
        "multi_arch_index_by_tag_then_by_digest_builds_a_real_block_image"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let (_layout, id) = push_busybox(&reg, dir.path(), "test/busybox", "v1");
    let svc = service(dir.path(), &reg.host);

    let by_tag = format!("{}/test/busybox:v1", reg.host);
    let rec = svc
        .pull(&by_tag, &Credentials::default(), None)
        .await
        .unwrap();
    assert_eq!(
        rec.id.as_str(),
        id,
        "the linux/amd64 entry of the index was chosen"
    );
    assert_eq!(rec.repo_tags, std::slice::from_ref(&by_tag));
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(rec.user, "app");
    let stats = svc.stats();
    assert_eq!(stats.blobs_fetched, 3, "config and two layers");

    let img = svc.block_image_path(&rec);
    assert!(img.is_file());
    let busybox = std::fs::read("/bin/busybox").unwrap();
    assert!(testing::debugfs_cat(&img, "/bin/busybox").unwrap() == busybox);
    assert_eq!(
        testing::debugfs_cat(&img, "/etc/layer2").unwrap(),
        b"from layer 2\n"
    );
    assert!(
        testing::debugfs_stat(&img, "/etc/removed-later").is_none(),
        "whiteout"
    );
    let mut old = testing::debugfs_ls(&img, "/opt/old");
    old.sort();
    assert_eq!(old, ["c"], "opaque directory hides the lower layer's files");
    let sh = testing::debugfs_stat(&img, "/bin/sh").unwrap();
    assert!(
        sh.contains("Type: symlink") && sh.contains("\"busybox\""),
        "{sh}"
    );
    let hard = testing::debugfs_stat(&img, "/bin/busybox.hard").unwrap();
    assert!(hard.contains("Links: 2"), "{hard}");
    let owned = testing::debugfs_stat(&img, "/home/app/owned").unwrap();
    assert!(
        owned.contains("Mode:  04750") && owned.contains("User:  1000"),
        "{owned}"
    );
    let null = testing::debugfs_stat(&img, "/dev/null").unwrap();
    assert!(null.contains("Type: character special"), "{null}");
    assert!(testing::debugfs_stat(&img, "/tmp")
        .unwrap()
        .contains("Mode:  01777"));

    // The same image by the index digest: nothing is downloaded or built again.
    let digest_ref = rec.repo_digests[0].clone();
    assert!(digest_ref.starts_with(&format!("{}/test/busybox@sha256:", reg.host)));
    let again = svc
        .pull(&digest_ref, &Credentials::default(), None)
        .await
        .unwrap();
    assert_eq!(again.id, rec.id);
    assert_eq!(svc.stats().blobs_fetched, 3);
    assert_eq!(svc.stats().images_built, 1);
    assert_eq!(svc.list().unwrap().len(), 1);
    assert_eq!(svc.status(&digest_ref).unwrap().unwrap().id, rec.id);
    assert_eq!(svc.status(rec.id.hex()).unwrap().unwrap().id, rec.id);
}

#[tokio::test]
async fn docker_schema2_manifest_list_through_a_docker_io_mirror() {
    image_service::require_registry_tools!(
        "docker_schema2_manifest_list_through_a_docker_io_mirror"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    let amd64 = layout.image("amd64", &[(&base, "gzip")], "1000:1000");
    let index = layout.index(std::slice::from_ref(&amd64));
    layout.tag(&index, "1");
    // Converted to a Docker manifest list + schema2 manifests on the way in.
    reg.push(layout.path(), "1", "library/bbox:1", true)
        .unwrap();

    // docker.io is served by the local registry as a mirror: nothing leaves 127.0.0.1.
    let certs = dir.path().join("certs.d");
    testing::write_hosts(&certs, "docker.io", &reg.host).unwrap();
    let mut config = Config::new(dir.path().join("state"));
    config.certs_dir = certs;
    let db = sled::open(dir.path().join("db")).unwrap();
    let svc = ImageService::open(config, &db).unwrap();
    let rec = svc
        .pull("bbox:1", &Credentials::default(), None)
        .await
        .unwrap();
    assert_eq!(rec.repo_tags, ["docker.io/library/bbox:1"]);
    assert_eq!(rec.user, "1000:1000");
    let manifest: serde_json::Value =
        serde_json::from_slice(&svc.content().read(&rec.manifest_digest).unwrap()).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert!(testing::debugfs_cat(&svc.block_image_path(&rec), "/etc/passwd").is_some());
}

#[tokio::test]
async fn basic_auth_is_required_and_used() {
    image_service::require_registry_tools!("basic_auth_is_required_and_used");
    let reg = match Registry::start(Some(("alice", "s3cret"))) {
        Ok(r) => r,
        Err(e) if e.contains("htpasswd") => {
            println!("SKIPPED basic_auth_is_required_and_used: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = testing::tempdir();
    push_busybox(&reg, dir.path(), "private/app", "v1");
    let svc = service(dir.path(), &reg.host);
    let image = format!("{}/private/app:v1", reg.host);

    let err = svc
        .pull(&image, &Credentials::default(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
    let wrong = Credentials {
        username: "alice".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let err = svc.pull(&image, &wrong, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
    let right = Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let rec = svc.pull(&image, &right, None).await.unwrap();
    assert_eq!(rec.layers.len(), 2);
}

#[tokio::test]
async fn a_path_escaping_layer_fails_the_pull_and_leaves_nothing() {
    image_service::require_registry_tools!(
        "a_path_escaping_layer_fails_the_pull_and_leaves_nothing"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let mut layout = OciLayout::new(&dir.path().join("layout"));
    let base = busybox_base();
    let evil = TarBuilder::default()
        .link(tar::EntryType::Symlink, "escape", "../../../../..")
        .file("escape/tmp/podvisor-pwned", 0o644, b"pwned")
        .finish();
    let m = layout.image("amd64", &[(&base, "gzip"), (&evil, "gzip")], "");
    layout.tag(&m, "evil");
    reg.push(layout.path(), "evil", "evil/app:evil", false)
        .unwrap();
    let svc = service(dir.path(), &reg.host);

    let err = svc
        .pull(
            &format!("{}/evil/app:evil", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("escapes the root"), "{err}");
    assert!(!Path::new("/tmp/podvisor-pwned").exists());
    assert!(svc.list().unwrap().is_empty(), "no record");
    let images = dir.path().join("state/images");
    assert!(
        testing::files_under(&images.join("blocks")).is_empty(),
        "no block image"
    );
    assert!(
        testing::files_under(&images.join("tmp")).is_empty(),
        "no build left"
    );
    // The failed pull deleted the blobs it fetched: nothing is left for a collection.
    assert!(testing::files_under(&images.join("content/blobs")).is_empty());
    assert_eq!(svc.gc().await.unwrap().blobs, 0);
}

#[tokio::test]
async fn concurrent_pulls_are_coalesced_and_missing_tags_are_not_found() {
    image_service::require_registry_tools!(
        "concurrent_pulls_are_coalesced_and_missing_tags_are_not_found"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    push_busybox(&reg, dir.path(), "co/app", "v1");
    let svc = service(dir.path(), &reg.host);
    let image = format!("{}/co/app:v1", reg.host);
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let (svc, image) = (svc.clone(), image.clone());
            tokio::spawn(async move { svc.pull(&image, &Credentials::default(), None).await })
        })
        .collect();
    let mut ids = Vec::new();
    for p in pulls {
        ids.push(p.await.unwrap().unwrap().id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(svc.stats().pulls, 1, "one pull served all four callers");
    assert_eq!(svc.stats().blobs_fetched, 3);

    let err = svc
        .pull(
            &format!("{}/co/app:nope", reg.host),
            &Credentials::default(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn remove_respects_leases_then_collects_blobs_and_the_block_image() {
    image_service::require_registry_tools!(
        "remove_respects_leases_then_collects_blobs_and_the_block_image"
    );
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    push_busybox(&reg, dir.path(), "rm/app", "v1");
    let svc = service(dir.path(), &reg.host);
    let image = format!("{}/rm/app:v1", reg.host);
    let rec = svc
        .pull(&image, &Credentials::default(), None)
        .await
        .unwrap();

    let leased = svc.lease(&image, "container-1").await.unwrap();
    assert_eq!(leased.id, rec.id);
    assert!(svc.in_use(&rec.id).unwrap());
    let err = svc.remove(rec.id.as_str()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(svc.release("container-1").await.unwrap());
    assert!(!svc.in_use(&rec.id).unwrap());

    let removed = svc.remove(&image).await.unwrap().unwrap();
    assert_eq!(removed.id, rec.id);
    assert!(svc.status(&image).unwrap().is_none());
    assert!(svc.status(rec.id.as_str()).unwrap().is_none());
    let images = dir.path().join("state/images");
    assert!(testing::files_under(&images.join("content/blobs")).is_empty());
    assert!(testing::files_under(&images.join("blocks")).is_empty());
    // Idempotent.
    assert!(svc.remove(&image).await.unwrap().is_none());
    let usage = svc.usage().await.unwrap();
    assert!(usage.inodes_used > 0);
}
