use super::*;
use std::time::Duration;

/// 2016-10-06T00:17:09.669794202Z
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202)
}

fn later(ms: u64) -> SystemTime {
    t0() + Duration::from_millis(ms)
}

fn setup(max: usize) -> (tempfile::TempDir, PathBuf, LogWriter) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let w = LogWriter::open_with_max(&path, max).unwrap();
    (dir, path, w)
}

/// (stream, tag, content) of every record, checking each timestamp parses as RFC 3339.
fn records(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    text.split_terminator('\n')
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let ts = parts.next().unwrap();
            chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{ts}: {e}"));
            let f = |p: Option<&str>| p.unwrap().to_string();
            (f(parts.next()), f(parts.next()), f(parts.next()))
        })
        .collect()
}

fn rec(stream: &str, tag: &str, content: &str) -> (String, String, String) {
    (stream.into(), tag.into(), content.into())
}

#[test]
fn full_lines_have_the_cri_format() {
    let (_d, path, w) = setup(MAX_LINE_SIZE);
    w.write_at(Stream::Stdout, b"hello\nworld\n", t0()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        "2016-10-06T00:17:09.669794202Z stdout F hello\n\
         2016-10-06T00:17:09.669794202Z stdout F world\n"
    );
}

#[test]
fn empty_lines_and_crlf() {
    let (_d, path, w) = setup(MAX_LINE_SIZE);
    w.write_at(Stream::Stdout, b"\na\r\nb\rc\n", t0()).unwrap();
    // "\r\n" straddling two chunks.
    w.write_at(Stream::Stdout, b"d\r", t0()).unwrap();
    w.write_at(Stream::Stdout, b"\n", t0()).unwrap();
    assert_eq!(
        records(&path),
        vec![
            rec("stdout", "F", ""),
            rec("stdout", "F", "a"),
            rec("stdout", "F", "b\rc"),
            rec("stdout", "F", "d"),
        ]
    );
}

#[test]
fn lines_split_across_chunks_are_joined() {
    let (_d, path, w) = setup(MAX_LINE_SIZE);
    w.write_at(Stream::Stdout, b"hel", t0()).unwrap();
    assert_eq!(records(&path), vec![]);
    w.write_at(Stream::Stdout, b"lo wor", t0()).unwrap();
    w.write_at(Stream::Stdout, b"ld\nnext", later(5)).unwrap();
    assert_eq!(records(&path), vec![rec("stdout", "F", "hello world")]);
    // Stamped with the time the line was completed.
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .starts_with("2016-10-06T00:17:09.674794202Z"));
}

#[test]
fn long_lines_become_partial_records() {
    let (_d, path, w) = setup(4);
    w.write_at(Stream::Stdout, b"abcd\n", t0()).unwrap(); // exactly max: one F
    w.write_at(Stream::Stdout, b"abcdefghij\n", t0()).unwrap();
    w.write_at(Stream::Stdout, b"12345678\n", t0()).unwrap(); // 2 * max: P then F
    assert_eq!(
        records(&path),
        vec![
            rec("stdout", "F", "abcd"),
            rec("stdout", "P", "abcd"),
            rec("stdout", "P", "efgh"),
            rec("stdout", "F", "ij"),
            rec("stdout", "P", "1234"),
            rec("stdout", "F", "5678"),
        ]
    );
}

#[test]
fn long_lines_split_as_they_arrive() {
    let (_d, path, w) = setup(4);
    w.write_at(Stream::Stdout, b"abc", t0()).unwrap();
    w.write_at(Stream::Stdout, b"de", t0()).unwrap();
    assert_eq!(records(&path), vec![rec("stdout", "P", "abcd")]);
    // max bytes then "\r\n" across chunks: the '\r' is not content, so no extra P record.
    w.write_at(Stream::Stdout, b"fgh\r", t0()).unwrap();
    w.write_at(Stream::Stdout, b"\n", t0()).unwrap();
    assert_eq!(
        records(&path),
        vec![rec("stdout", "P", "abcd"), rec("stdout", "F", "efgh")]
    );
}

#[test]
fn default_max_is_16k() {
    let (_d, path, w) = setup(MAX_LINE_SIZE);
    let line = vec![b'x'; MAX_LINE_SIZE * 2 + 10];
    w.write_at(Stream::Stderr, &line, t0()).unwrap();
    w.write_at(Stream::Stderr, b"\n", t0()).unwrap();
    let r = records(&path);
    let tags: Vec<_> = r.iter().map(|(_, t, c)| (t.as_str(), c.len())).collect();
    assert_eq!(
        tags,
        vec![("P", MAX_LINE_SIZE), ("P", MAX_LINE_SIZE), ("F", 10)]
    );
}

#[test]
fn streams_interleave_on_one_file() {
    let (_d, path, w) = setup(MAX_LINE_SIZE);
    let w2 = w.clone();
    w.write_at(Stream::Stdout, b"out1 ", t0()).unwrap();
    w2.write_at(Stream::Stderr, b"err1\nerr", t0()).unwrap();
    w.write_at(Stream::Stdout, b"more\n", t0()).unwrap();
    w2.write_at(Stream::Stderr, b"2\n", t0()).unwrap();
    assert_eq!(
        records(&path),
        vec![
            rec("stderr", "F", "err1"),
            rec("stdout", "F", "out1 more"),
            rec("stderr", "F", "err2"),
        ]
    );
}

#[test]
fn reopen_after_rotation_loses_nothing() {
    let (dir, path, w) = setup(MAX_LINE_SIZE);
    w.write_at(Stream::Stdout, b"before\nhalf", t0()).unwrap();
    let rotated = dir.path().join("0.log.20161006-001709");
    std::fs::rename(&path, &rotated).unwrap();
    w.reopen().unwrap();
    w.write_at(Stream::Stdout, b" done\nafter\n", t0()).unwrap();
    assert_eq!(records(&rotated), vec![rec("stdout", "F", "before")]);
    assert_eq!(
        records(&path),
        vec![rec("stdout", "F", "half done"), rec("stdout", "F", "after")]
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777 & !0o022, 0o640 & !0o022);
}

#[test]
fn finish_flushes_the_tail_as_partial() {
    let (_d, path, w) = setup(4);
    w.write_at(Stream::Stdout, b"line\ntail", t0()).unwrap();
    w.finish_at(Stream::Stdout, t0()).unwrap();
    // Nothing left: no record.
    w.write_at(Stream::Stderr, b"done\n", t0()).unwrap();
    w.finish_at(Stream::Stderr, t0()).unwrap();
    // A long tail ending in '\r' at EOF: the '\r' is content.
    w.write_at(Stream::Stderr, b"abcd\r", t0()).unwrap();
    w.finish_at(Stream::Stderr, t0()).unwrap();
    assert_eq!(
        records(&path),
        vec![
            rec("stdout", "F", "line"),
            rec("stdout", "P", "tail"),
            rec("stderr", "F", "done"),
            rec("stderr", "P", "abcd"),
            rec("stderr", "P", "\r"),
        ]
    );
}

#[test]
fn open_needs_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = LogWriter::open(&dir.path().join("missing/0.log"))
        .err()
        .unwrap();
    assert!(matches!(err, LogError::Open { .. }), "{err}");
    let path = dir.path().join("0.log");
    std::fs::write(&path, "old\n").unwrap();
    LogWriter::open(&path)
        .unwrap()
        .write(Stream::Stdout, b"new\n")
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("old\n") && text.ends_with(" stdout F new\n"),
        "{text}"
    );
}

#[test]
fn timestamps_match_chrono() {
    for step in [
        0u64,
        1,
        59,
        86_399,
        86_400,
        951_782_400,
        4_102_444_800,
        253_402_300_799,
    ] {
        let t = UNIX_EPOCH + Duration::new(step, (step as u32).wrapping_mul(7919) % 1_000_000_000);
        let ours = timestamp(t);
        let nanos = t.duration_since(UNIX_EPOCH).unwrap();
        let theirs = chrono::DateTime::from_timestamp(nanos.as_secs() as i64, nanos.subsec_nanos())
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.9fZ")
            .to_string();
        assert_eq!(ours, theirs);
        let parsed = chrono::DateTime::parse_from_rfc3339(&ours).unwrap();
        assert_eq!(parsed.timestamp_subsec_nanos(), nanos.subsec_nanos());
    }
    assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
}
