//! Registry unit tests: reference parsing, manifest media types and parse errors, an unreachable registry.

use super::*;

#[test]
fn references_are_normalized_and_validated() {
    let r = parse_reference("busybox").unwrap();
    assert_eq!(r.whole(), "docker.io/library/busybox:latest");
    assert!(parse_reference("library/UPPER").is_err());
    assert!(parse_reference("busybox:bad tag").is_err());
    assert!(parse_reference("").is_err());
}

#[test]
fn a_manifest_that_is_not_json_is_malformed_with_its_parse_error() {
    let err = media_type_of(b"<html>").unwrap_err();
    let RegistryError::Malformed { what, source } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*what, "manifest is not JSON");
    assert_eq!(
        err.to_string(),
        format!("unsupported manifest: {what}: {source}")
    );
}

#[test]
fn schema1_and_garbage_manifests_are_unsupported() {
    assert!(media_type_of(br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
    assert!(media_type_of(b"<html>").is_err());
    assert_eq!(
        media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#).unwrap(),
        OCI_INDEX
    );
}

#[tokio::test]
async fn an_unreachable_registry_is_reported_as_such() {
    // A port nothing listens on (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{port}");
    std::fs::create_dir_all(dir.path().join(&host)).unwrap();
    std::fs::write(
        dir.path().join(&host).join("hosts.toml"),
        format!("server = \"http://{host}\"\n"),
    )
    .unwrap();
    let remote = Remote::new(
        parse_reference(&format!("{host}/x:1")).unwrap(),
        &RegistryHosts::new(dir.path()),
        &Credentials::default(),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = remote.resolve().await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
}
