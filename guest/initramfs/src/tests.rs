use super::*;

fn sample() -> Vec<u8> {
    let mut w = CpioWriter::new(Vec::new());
    w.dir("/dev", 0o755).unwrap();
    w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
    w.file("/init", 0o755, b"\x7fELF-ish").unwrap();
    w.symlink("/bin/sh", "/init").unwrap();
    w.file("/etc/deep/er/conf", 0o644, b"abc").unwrap();
    w.finish().unwrap()
}

#[test]
fn round_trip() {
    let bytes = sample();
    assert_eq!(bytes.len() % 4, 0);
    let entries = parse(&bytes).unwrap();
    let summary: Vec<(&str, u32, &Kind)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.perm, &e.kind))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("dev", 0o755, &Kind::Dir),
            ("dev/console", 0o600, &Kind::CharDev { major: 5, minor: 1 }),
            ("init", 0o755, &Kind::File(b"\x7fELF-ish".to_vec())),
            ("bin", 0o755, &Kind::Dir),
            ("bin/sh", 0o777, &Kind::Symlink("/init".into())),
            ("etc", 0o755, &Kind::Dir),
            ("etc/deep", 0o755, &Kind::Dir),
            ("etc/deep/er", 0o755, &Kind::Dir),
            ("etc/deep/er/conf", 0o644, &Kind::File(b"abc".to_vec())),
        ]
    );
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.ino, i as u32 + 1, "sequential inodes");
        assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
    }
}

#[test]
fn deterministic() {
    assert_eq!(sample(), sample());
}

#[test]
fn header_layout() {
    let mut w = CpioWriter::new(Vec::new());
    w.char_dev("/null", 0o666, 1, 3).unwrap();
    let bytes = w.finish().unwrap();
    let header = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
    assert_eq!(
        header,
        concat!(
            "070701", "00000001", "000021b6", "00000000", "00000000", "00000001", "00000000",
            "00000000", "00000000", "00000000", "00000001", "00000003", "00000005", "00000000"
        )
    );
    // "null\0" is 5 bytes: 110 + 5 = 115, padded to 116.
    assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 6], b"null\0\0");
    assert_eq!(&bytes[116..122], b"070701");
    let trailer = &bytes[116..];
    assert_eq!(&trailer[HEADER_LEN..HEADER_LEN + 11], b"TRAILER!!!\0");
    assert_eq!(bytes.len(), 116 + 124);
}

#[test]
fn data_padding() {
    for len in 0..9 {
        let mut w = CpioWriter::new(Vec::new());
        let data = vec![0xaa; len];
        w.file("/f", 0o644, &data).unwrap();
        w.file("/g", 0o644, b"x").unwrap();
        let written = w.bytes_written();
        let bytes = w.finish().unwrap();
        assert_eq!(written % 4, 0);
        let entries = parse(&bytes).unwrap();
        assert_eq!(entries[0].kind, Kind::File(data));
        assert_eq!(entries[1].kind, Kind::File(b"x".to_vec()));
    }
}

#[test]
fn rejects_bad_paths_and_duplicates() {
    let mut w = CpioWriter::new(Vec::new());
    for bad in [
        "", "/", "relative", "/a/../b", "/a/./b", "/a//b", "/a/", "/nul\0",
    ] {
        assert!(
            matches!(w.file(bad, 0o644, b""), Err(CpioError::InvalidPath(_))),
            "{bad:?}"
        );
    }
    w.file("/a", 0o644, b"").unwrap();
    assert!(matches!(
        w.file("/a", 0o644, b""),
        Err(CpioError::Duplicate(_))
    ));
    assert!(matches!(w.dir("/a", 0o755), Err(CpioError::Duplicate(_))));
    assert!(matches!(
        w.file("/a/b", 0o644, b""),
        Err(CpioError::NotADirectory(_))
    ));
    w.dir("/d", 0o700).unwrap();
    w.dir("/d", 0o700).unwrap();
    assert!(matches!(w.symlink("/d", "x"), Err(CpioError::Duplicate(_))));
}

#[test]
fn parse_rejects_garbage() {
    assert!(parse(b"").is_err());
    assert!(parse(&[b'0'; 200]).is_err());
    let mut bytes = sample();
    bytes.truncate(bytes.len() - 20);
    assert!(matches!(parse(&bytes), Err(CpioError::Malformed { .. })));
}

/// Lists the archive with the system's `cpio` or `bsdtar`, when one is installed.
#[test]
fn real_tool_lists_archive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.cpio");
    std::fs::write(&path, sample()).unwrap();
    let file = || std::fs::File::open(&path).unwrap();
    let listed = match std::process::Command::new("cpio")
        .args(["-t", "-v", "--quiet"])
        .stdin(file())
        .output()
    {
        Ok(out) => out,
        Err(_) => match std::process::Command::new("bsdtar")
            .args(["-t", "-v", "-f"])
            .arg(&path)
            .output()
        {
            Ok(out) => out,
            Err(_) => {
                println!("skipped: neither cpio nor bsdtar is installed");
                return;
            }
        },
    };
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let text = String::from_utf8(listed.stdout).unwrap();
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 9, "{text}");
    let find = |name: &str| {
        *lines
            .iter()
            .find(|l| l.ends_with(name))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    assert!(find(" dev/console").starts_with("crw-------"));
    assert!(find(" dev/console").contains("5,"));
    assert!(find(" init").starts_with("-rwxr-xr-x"));
    assert!(find(" bin/sh -> /init").starts_with("lrwxrwxrwx"));
    assert!(find(" etc/deep/er").starts_with("drwxr-xr-x"));
}
