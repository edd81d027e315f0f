//! CRI ImageService end to end: the real `podvisor` daemon pulling from a real `docker-registry` on
//! 127.0.0.1, plus `podvisor pull` both on its own and through the running daemon.

use std::path::Path;
use std::process::Command;

use image_service::testing::{
    self, busybox_base, config_digest, layer_digests, OciLayout, Registry, TarBuilder,
};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::daemon::{connect, Daemon};
use tonic::Code;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

/// The status of a PullImage of `image` that must fail.
async fn pull_error(
    client: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> tonic::Status {
    let pulled = client
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await;
    pulled.unwrap_err()
}

/// Runs `cmd`, which must succeed; returns its standard output.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn podvisor(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    cmd.args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--certs-dir")
        .arg(dir.join("certs.d"));
    cmd
}

/// Pushes a busybox image with config `User` `user` as `<repo>:v1`; returns its image id.
fn push(reg: &Registry, dir: &Path, repo: &str, user: &str) -> String {
    let mut layout = OciLayout::new(&dir.join(format!("layout-{}", repo.replace('/', "-"))));
    let base = busybox_base();
    let m = layout.image("amd64", &[(&base, "gzip")], user);
    layout.tag(&m, "v1");
    reg.push(layout.path(), "v1", &format!("{repo}:v1"), false)
        .unwrap();
    config_digest(&layout, &m)
}

#[tokio::test]
async fn cri_image_service_and_podvisor_pull() {
    if let Some(reason) = testing::skip_reason() {
        println!("SKIPPED cri_image_service_and_podvisor_pull: {reason}");
        return;
    }
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let id = push(&reg, dir.path(), "cri/busybox", "app");
    let cli_id = push(&reg, dir.path(), "cli/busybox", "1000");
    testing::write_hosts(&dir.path().join("certs.d"), &reg.host, &reg.host).unwrap();
    let image = format!("{}/cri/busybox:v1", reg.host);

    // `podvisor pull` with no daemon: straight into the store.
    let cli_ref = format!("{}/cli/busybox:v1", reg.host);
    let out = stdout_of(&mut podvisor(dir.path(), &["pull", &cli_ref]));
    assert!(out.contains(&cli_id), "{out}");

    let socket = dir.path().join("podvisor.sock");
    let mut daemon_cmd = podvisor(dir.path(), &[]);
    daemon_cmd.arg("--run-dir").arg(dir.path().join("run"));
    let _daemon = Daemon::start(daemon_cmd, &socket, dir.path()).await;
    let mut client = ImageServiceClient::new(connect(socket.clone()).await);

    let pulled = client
        .pull_image(PullImageRequest {
            image: spec(&image),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pulled.image_ref, id,
        "image_ref is the config digest, as containerd"
    );

    let all = client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(all.len(), 2, "the CLI image is in the same store: {all:?}");
    let filtered = client
        .list_images(ListImagesRequest {
            filter: Some(ImageFilter {
                image: spec(&image),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].repo_tags, std::slice::from_ref(&image));

    let status = client
        .image_status(ImageStatusRequest {
            image: spec(&id),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let img = status.image.unwrap();
    assert_eq!(
        (img.id.as_str(), img.username.as_str()),
        (id.as_str(), "app")
    );
    assert!(img.uid.is_none());
    assert!(img.size > 1_000_000, "busybox is in the size: {}", img.size);
    assert!(img.repo_digests[0].contains("@sha256:"));
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["User"], "app");
    let block = info["blockImage"].as_str().unwrap();
    assert!(testing::debugfs_cat(Path::new(block), "/etc/passwd").is_some());

    let fs = client
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert!(usage.used_bytes.as_ref().unwrap().value > 2_000_000);
    assert!(usage.inodes_used.as_ref().unwrap().value > 4);
    assert!(usage.fs_id.as_ref().unwrap().mountpoint.ends_with("images"));

    // `podvisor pull` while the daemon holds the store goes through the socket.
    let mut pull = podvisor(dir.path(), &["pull", &image]);
    let out = stdout_of(pull.arg("--socket").arg(&socket));
    assert!(out.contains("pulled by the daemon"), "{out}");

    // Bad input → the right codes, never a crash.
    let e = client
        .pull_image(PullImageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = pull_error(&mut client, "Not A Reference!").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("image.image"), "{e:?}");
    let e = pull_error(&mut client, &format!("{}/cri/busybox:missing", reg.host)).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // A registry serving a blob that does not match its digest: DATA_LOSS (corrupt content a retry does
    // not cure), not UNAVAILABLE.
    let mut layout = OciLayout::new(&dir.path().join("layout-corrupt"));
    let layer = TarBuilder::default()
        .file("etc/corrupt", 0o644, &[1u8; 4096])
        .finish();
    let m = layout.image("amd64", &[(&layer, "gzip")], "");
    layout.tag(&m, "v1");
    reg.push(layout.path(), "v1", "corrupt/app:v1", false)
        .unwrap();
    let blob = reg.blob_path(&layer_digests(&layout, &m)[0]);
    let mut data = std::fs::read(&blob).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    let e = pull_error(&mut client, &format!("{}/corrupt/app:v1", reg.host)).await;
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("digest mismatch"), "{e:?}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    testing::write_hosts(
        &dir.path().join("certs.d"),
        &closed.to_string(),
        &closed.to_string(),
    )
    .unwrap();
    let e = pull_error(&mut client, &format!("{closed}/x/y:1")).await;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = client
        .image_status(ImageStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let missing = client
        .image_status(ImageStatusRequest {
            image: spec("docker.io/library/never-pulled:1"),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.image.is_none());

    client
        .remove_image(RemoveImageRequest {
            image: spec(&image),
        })
        .await
        .unwrap();
    client
        .remove_image(RemoveImageRequest {
            image: spec(&image),
        })
        .await
        .expect("removing an absent image succeeds");
    let left = client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, cli_id);
}
