//! Image material built offline: ext4 block images from files or a tree (`mkfs.ext4 -d`), and the
//! busybox pod image pushed to a test registry.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds an ext4 image of `size_mib` MiB holding `files` (path, content), without a journal.
pub fn make_ext4(dir: &Path, name: &str, files: &[(&str, &[u8])], size_mib: u32) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(&root).unwrap();
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let image = dir.join(format!("{name}.ext4"));
    ext4_from_dir(&root, &image, size_mib);
    std::fs::remove_dir_all(&root).unwrap();
    image
}

/// Builds an ext4 image of `size_mib` MiB from the tree at `root`, without a journal.
pub fn ext4_from_dir(root: &Path, image: &Path, size_mib: u32) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(root)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Busybox applets of the pod test image.
#[cfg(feature = "cri")]
const APPLETS: [&str; 17] = [
    "sh", "echo", "sleep", "cat", "dd", "hostname", "id", "ls", "true", "head", "wc", "ps", "env",
    "kill", "mkdir", "date", "nc",
];

/// Pushes a busybox image for pods (static busybox, applets, passwd, the usual mount points) to
/// `reg` as `<repo>:v1`; returns its reference.
#[cfg(feature = "cri")]
pub fn push_pod_image(reg: &image_service::testing::Registry, dir: &Path, repo: &str) -> String {
    use image_service::testing::{OciLayout, TarBuilder};
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut t = TarBuilder::default();
    t.dir("bin/", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        t.link(tar::EntryType::Symlink, &format!("bin/{applet}"), "busybox");
    }
    for d in [
        "etc/",
        "proc/",
        "sys/",
        "dev/",
        "tmp/",
        "root/",
        "home/",
        "home/app/",
        "var/",
        "run/",
    ] {
        t.dir(d, 0o755);
    }
    t.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n");
    let layer = t.finish();
    let mut layout = OciLayout::new(&dir.join(format!("layout-{}", repo.replace('/', "-"))));
    let m = layout.image("amd64", &[(&layer, "gzip")], "");
    layout.tag(&m, "v1");
    let reference = format!("{repo}:v1");
    reg.push(layout.path(), "v1", &reference, false).unwrap();
    format!("{}/{reference}", reg.host)
}
