//! Builds layer tarballs and OCI image layouts offline (busybox-static as the payload).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::content::Digest;

/// Modification time (seconds since the epoch) of every entry [`TarBuilder::header`] makes.
pub const MTIME: u64 = 1_700_000_000;

/// Builds a tar archive entry by entry; names are written verbatim, so malicious ones are possible.
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl Default for TarBuilder {
    fn default() -> TarBuilder {
        TarBuilder(tar::Builder::new(Vec::new()))
    }
}

impl TarBuilder {
    /// A ustar header owned by root with mtime [`MTIME`] and `name` verbatim (at most 100 bytes); finish
    /// it and append it with [`TarBuilder::add`].
    pub fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        let bytes = name.as_bytes();
        assert!(bytes.len() <= 100, "test names fit the ustar name field");
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h
    }

    /// Appends `h` (checksum recomputed) followed by `data`, as given.
    pub fn add(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.0.append(&h, data).expect("in-memory tar");
        self
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.add(Self::header(name, tar::EntryType::Directory, mode, 0), b"")
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.add(
            Self::header(name, tar::EntryType::Regular, mode, data.len() as u64),
            data,
        )
    }

    /// A regular file owned by `uid:gid`.
    pub fn file_owned(
        &mut self,
        name: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(name, tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.add(h, data)
    }

    /// A symlink or hard link (`kind`) `name` → `target`.
    pub fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) -> &mut Self {
        let mut h = Self::header(name, kind, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.add(h, b"")
    }

    /// A character device.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(name, tar::EntryType::Char, 0o666, 0);
        h.set_device_major(major).expect("ustar");
        h.set_device_minor(minor).expect("ustar");
        self.add(h, b"")
    }

    /// An old-GNU sparse file of logical size `real_size` whose only data is `data` at its end (the rest is
    /// a hole): a few hundred archive bytes for any `real_size`.
    pub fn gnu_sparse(&mut self, name: &str, mode: u32, real_size: u64, data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        assert!(bytes.len() <= 100, "test names fit the name field");
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        let gnu = h.as_gnu_mut().expect("a GNU header");
        gnu.set_real_size(real_size);
        gnu.sparse[0].set_offset(real_size - data.len() as u64);
        gnu.sparse[0].set_length(data.len() as u64);
        self.add(h, data)
    }

    /// A pax extended header (`key=value` records) applying to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            // A record is `<len> <key>=<value>\n`, where `<len>` counts its own digits too.
            let body_len = k.len() + v.len() + 3;
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            write!(data, "{len} {k}=").expect("in memory");
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.add(
            Self::header("pax", tar::EntryType::XHeader, 0o644, data.len() as u64),
            &data,
        )
    }

    /// The finished archive.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(self).0.into_inner().expect("in-memory tar")
    }
}

/// A busybox root: `/bin/busybox` from busybox-static with applet symlinks, a hard link, `/etc/passwd`
/// with a `app` user (uid 1000), `/tmp` (1777), `/dev/null`, and files a later layer can white out.
pub fn busybox_base() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut t = TarBuilder::default();
    t.dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .link(tar::EntryType::Link, "bin/busybox.hard", "bin/busybox");
    for applet in ["sh", "ls", "cat", "echo", "sleep", "true"] {
        t.link(tar::EntryType::Symlink, &format!("bin/{applet}"), "busybox");
    }
    t.dir("etc/", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .file("etc/removed-later", 0o644, b"lower layer")
        .dir("opt/old/", 0o755)
        .file("opt/old/a", 0o644, b"a")
        .file("opt/old/b", 0o644, b"b")
        .dir("tmp/", 0o1777)
        .dir("dev/", 0o755)
        .char_dev("dev/null", 1, 3)
        .file_owned("home/app/owned", 0o4750, 1000, 1000, b"setuid");
    t.finish()
}

/// gzip-compresses.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("in memory");
    e.finish().expect("in memory")
}

/// zstd-compresses.
pub fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("in memory")
}

/// An OCI image layout directory being written.
pub struct OciLayout {
    dir: PathBuf,
    tags: Vec<Value>,
}

impl OciLayout {
    /// Creates an empty layout at `dir`.
    pub fn new(dir: &Path) -> OciLayout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("layout file");
        OciLayout {
            dir: dir.to_owned(),
            tags: vec![],
        }
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Stores a blob and returns its descriptor.
    pub fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let d = Digest::of(data);
        std::fs::write(self.dir.join("blobs/sha256").join(d.hex()), data).expect("blob");
        json!({"mediaType": media_type, "digest": d.as_str(), "size": data.len()})
    }

    /// Stores an image for `arch` from uncompressed layer tars, compressed as `compressions` says
    /// (`"gzip"`, `"zstd"` or `"none"`), with config `User` `user`. Returns the manifest descriptor with
    /// its platform set.
    pub fn image(&self, arch: &str, layers: &[(&[u8], &str)], user: &str) -> Value {
        self.image_padded(arch, layers, user, 0)
    }

    /// [`OciLayout::image`] with a config grown by a `PAD=` environment entry of `padding` bytes.
    pub fn image_padded(
        &self,
        arch: &str,
        layers: &[(&[u8], &str)],
        user: &str,
        padding: usize,
    ) -> Value {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, compression) in layers {
            diff_ids.push(Digest::of(tar).to_string());
            let (mt, data) = match *compression {
                "gzip" => ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(tar)),
                "zstd" => (
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                    zstd_compress(tar),
                ),
                _ => ("application/vnd.oci.image.layer.v1.tar", tar.to_vec()),
            };
            descs.push(self.blob(mt, &data));
        }
        let mut env = vec!["PATH=/bin".to_owned()];
        if padding > 0 {
            env.push(format!("PAD={}", "x".repeat(padding)));
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"User": user, "Cmd": ["/bin/sh"], "Env": env},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).expect("json"),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": descs,
        });
        let mut desc = self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).expect("json"),
        );
        desc["platform"] = json!({"architecture": arch, "os": "linux"});
        desc
    }

    /// Stores an image index over `manifests` and returns its descriptor.
    pub fn index(&self, manifests: &[Value]) -> Value {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob(
            "application/vnd.oci.image.index.v1+json",
            &serde_json::to_vec(&index).expect("json"),
        )
    }

    /// Names `desc` `tag` in the layout's `index.json`.
    pub fn tag(&mut self, desc: &Value, tag: &str) {
        let mut d = desc.clone();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.tags.push(d);
        let index = json!({"schemaVersion": 2, "manifests": self.tags});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("index.json");
    }
}

fn manifest_of(layout: &OciLayout, desc: &Value) -> Value {
    let d: Digest = desc["digest"]
        .as_str()
        .expect("digest")
        .parse()
        .expect("digest");
    serde_json::from_slice(
        &std::fs::read(layout.path().join("blobs/sha256").join(d.hex())).expect("manifest"),
    )
    .expect("json")
}

/// The config digest (image id) of the image manifest `desc` in `layout`.
pub fn config_digest(layout: &OciLayout, desc: &Value) -> String {
    manifest_of(layout, desc)["config"]["digest"]
        .as_str()
        .expect("config")
        .to_owned()
}

/// The layer digests of the image manifest `desc` in `layout`, in order.
pub fn layer_digests(layout: &OciLayout, desc: &Value) -> Vec<String> {
    manifest_of(layout, desc)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}
