//! `podvisor-initramfs --agent <path> --out <path> [--extra SRC:DST]...`: builds the guest initramfs, an
//! uncompressed newc archive with the agent as `/init`.
//!
//! `/dev/console` and `/dev/null` are in the archive because, with an initramfs, the kernel opens
//! `/dev/console` for init's stdio before anything has mounted devtmpfs, and a Rust program whose stdio is
//! closed reopens it on `/dev/null` at startup, or aborts if it cannot.
#![forbid(unsafe_code)]

use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use podvisor_initramfs::{CpioError, CpioWriter};

const USAGE: &str = "usage: podvisor-initramfs --agent <path> --out <path> [--extra SRC:DST]...";

/// Errors of the initramfs builder.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

/// Parsed command line.
#[derive(Debug, PartialEq)]
struct Args {
    agent: PathBuf,
    out: PathBuf,
    extra: Vec<(PathBuf, String)>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, BuildError> {
    let (mut agent, mut out, mut extra) = (None, None, Vec::new());
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| BuildError::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--agent" => agent = Some(PathBuf::from(value("--agent")?)),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--extra" => {
                let spec = value("--extra")?;
                let (src, dst) = spec
                    .split_once(':')
                    .filter(|(s, d)| !s.is_empty() && d.starts_with('/'))
                    .ok_or_else(|| {
                        BuildError::Usage(format!("--extra {spec:?}: expected SRC:/ABSOLUTE/DST"))
                    })?;
                extra.push((PathBuf::from(src), dst.to_string()));
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(BuildError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    let agent = agent.ok_or_else(|| BuildError::Usage("--agent is required".into()))?;
    let out = out.ok_or_else(|| BuildError::Usage("--out is required".into()))?;
    Ok(Some(Args { agent, out, extra }))
}

/// Reads a regular file and its permission bits.
fn read_file(path: &Path) -> Result<(Vec<u8>, u32), BuildError> {
    let read_err = |source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(BuildError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let data = std::fs::read(path).map_err(read_err)?;
    Ok((data, meta.permissions().mode() & 0o7777))
}

/// Writes the whole archive for `args` into `out`.
fn write_initramfs<W: std::io::Write>(args: &Args, out: W) -> Result<W, BuildError> {
    let mut w = CpioWriter::new(out);
    for dir in ["/dev", "/proc", "/sys", "/run", "/tmp", "/etc"] {
        w.dir(dir, 0o755)?;
    }
    w.char_dev("/dev/console", 0o600, 5, 1)?;
    w.char_dev("/dev/null", 0o666, 1, 3)?;
    let (agent, _) = read_file(&args.agent)?;
    w.file("/init", 0o755, &agent)?;
    for (src, dst) in &args.extra {
        let (data, perm) = read_file(src)?;
        w.file(dst, perm, &data)?;
    }
    Ok(w.finish()?)
}

fn run(args: &Args) -> Result<u64, BuildError> {
    // Write next to the output and rename: a failed build never leaves a truncated initramfs behind.
    let mut tmp = args.out.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write_err = |source| BuildError::Write {
        path: tmp.clone(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(write_err)?;
    let result = write_initramfs(args, BufWriter::new(file)).and_then(|buf| {
        let file = buf.into_inner().map_err(|e| write_err(e.into_error()))?;
        file.sync_all().map_err(write_err)?;
        Ok(file.metadata().map_err(write_err)?.len())
    });
    match result {
        Ok(len) => {
            std::fs::rename(&tmp, &args.out).map_err(|source| BuildError::Write {
                path: args.out.clone(),
                source,
            })?;
            Ok(len)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("podvisor-initramfs: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(len) => {
            eprintln!(
                "podvisor-initramfs: wrote {} ({len} bytes)",
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podvisor-initramfs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_initramfs::{parse, Kind};

    fn args(list: &[&str]) -> Result<Option<Args>, BuildError> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_arguments() {
        let parsed = args(&[
            "--agent", "a", "--out", "o", "--extra", "x:/etc/x", "--extra", "y:/y",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            parsed,
            Args {
                agent: "a".into(),
                out: "o".into(),
                extra: vec![("x".into(), "/etc/x".into()), ("y".into(), "/y".into())],
            }
        );
        assert!(args(&["--help"]).unwrap().is_none());
        for bad in [
            &["--agent", "a"][..],
            &["--out", "o"],
            &["--agent"],
            &["--bogus"],
            &["--agent", "a", "--out", "o", "--extra", "x:rel"],
        ] {
            assert!(matches!(args(bad), Err(BuildError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn builds_the_guest_layout() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"AGENT").unwrap();
        let extra = dir.path().join("hosts");
        std::fs::write(&extra, b"127.0.0.1 localhost\n").unwrap();
        std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o640)).unwrap();
        let out = dir.path().join("initramfs.cpio");
        let args = Args {
            agent,
            out: out.clone(),
            extra: vec![(extra, "/etc/hosts".into())],
        };
        let len = run(&args).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(len, bytes.len() as u64);
        assert!(!dir.path().join("initramfs.cpio.tmp").exists());
        let entries = parse(&bytes).unwrap();
        let get = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        for d in ["dev", "proc", "sys", "run", "tmp", "etc"] {
            assert_eq!(get(d).kind, Kind::Dir);
        }
        assert_eq!(
            get("dev/console").kind,
            Kind::CharDev { major: 5, minor: 1 }
        );
        assert_eq!(get("dev/console").perm, 0o600);
        assert_eq!(get("dev/null").kind, Kind::CharDev { major: 1, minor: 3 });
        assert_eq!(get("init").kind, Kind::File(b"AGENT".to_vec()));
        assert_eq!(get("init").perm, 0o755);
        assert_eq!(get("etc/hosts").perm, 0o640);
        // Rebuilding gives the same bytes.
        run(&args).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn missing_agent_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.cpio");
        let args = Args {
            agent: dir.path().join("none"),
            out: out.clone(),
            extra: vec![],
        };
        assert!(matches!(run(&args), Err(BuildError::Read { .. })));
        assert!(!out.exists());
        assert!(!dir.path().join("initramfs.cpio.tmp").exists());
    }
}
