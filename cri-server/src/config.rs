//! The daemon's configuration file: TOML at `/etc/podvisor/config.toml` (flag `--config`). Every
//! key stands for one daemon flag ([`KEYS`], documented in docs/configuration.md); the file's values
//! are inserted into the command line before the flags actually given, so flags win over the file
//! and the file over the embedded defaults. Each value is checked by the flag's own parser, and every
//! error names the file, the line and the column.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/podvisor/config.toml";

/// One key of the file: its dotted path (`section.key`), the flag it sets, and whether it is a list
/// (a repeatable flag).
#[derive(Debug)]
pub struct Key {
    /// `key` or `section.key`.
    pub path: &'static str,
    /// The daemon flag.
    pub flag: &'static str,
    /// An array of values (the flag is given once per element).
    pub list: bool,
}

const fn key(path: &'static str, flag: &'static str) -> Key {
    Key {
        path,
        flag,
        list: false,
    }
}

/// Every key the file may have.
pub const KEYS: &[Key] = &[
    key("socket", "--socket"),
    key("state_dir", "--state-dir"),
    key("run_dir", "--run-dir"),
    key("guest_dir", "--guest-dir"),
    key("streaming_addr", "--streaming-addr"),
    key("metrics.address", "--metrics-addr"),
    key("tracing.otlp_endpoint", "--otlp-endpoint"),
    key("images.certs_dir", "--certs-dir"),
    key("images.fs", "--image-fs"),
    key("images.max_layer_bytes", "--max-layer-bytes"),
    key("images.max_image_bytes", "--max-image-bytes"),
    key("pods.image_slots", "--image-slots"),
    key("pods.boot_timeout_secs", "--boot-timeout-secs"),
    key("pods.default_memory_mib", "--default-pod-memory-mib"),
    key("pods.guest_overhead_mib", "--guest-overhead-mib"),
    key("pods.writable_layer_mib", "--writable-layer-mib"),
    key("pods.host_pods", "--host-pods"),
    key("network.cni_conf_dir", "--cni-conf-dir"),
    Key {
        path: "network.cni_bin_dirs",
        flag: "--cni-bin-dir",
        list: true,
    },
    key("network.netns_dir", "--netns-dir"),
    key("cgroups.enabled", "--host-cgroups"),
    key("cgroups.sandbox_cgroup_only", "--sandbox-cgroup-only"),
    key("cgroups.overhead_cgroup", "--overhead-cgroup"),
    key("cgroups.default_parent", "--default-cgroup-parent"),
];

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid: bad TOML, an unknown key, a value of the wrong type or out of range.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Reads the file into flag arguments, in file order, each value checked with `cmd`'s parser for
/// its flag.
pub fn flags_from_file(path: &Path, cmd: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    flags_from_str(&text, cmd).map_err(|(offset, message)| {
        let (line, column) = line_column(&text, offset);
        ConfigError::Invalid {
            path: path.into(),
            line,
            column,
            message,
        }
    })
}

/// 1-based line and column of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

type Located = (usize, String);

fn flags_from_str(text: &str, cmd: &clap::Command) -> Result<Vec<OsString>, Located> {
    let table = DeTable::parse(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        (at, e.message().to_string())
    })?;
    let mut flags = Vec::new();
    for (name, value) in table.get_ref() {
        match value.get_ref() {
            DeValue::Table(section) => {
                for (k, v) in section {
                    let path = format!("{}.{}", name.get_ref(), k.get_ref());
                    add_key(&path, k.span().start, v, cmd, &mut flags)?;
                }
            }
            _ => add_key(name.get_ref(), name.span().start, value, cmd, &mut flags)?,
        }
    }
    Ok(flags)
}

fn add_key(
    path: &str,
    at: usize,
    value: &Spanned<DeValue<'_>>,
    cmd: &clap::Command,
    flags: &mut Vec<OsString>,
) -> Result<(), Located> {
    let key = KEYS.iter().find(|k| k.path == path).ok_or_else(|| {
        let known: Vec<&str> = KEYS.iter().map(|k| k.path).collect();
        (
            at,
            format!("unknown key `{path}` (known keys: {})", known.join(", ")),
        )
    })?;
    let values: Vec<&Spanned<DeValue<'_>>> = match (value.get_ref(), key.list) {
        (DeValue::Array(items), true) => items.iter().collect(),
        (_, true) => return Err((value.span().start, format!("`{path}` must be an array"))),
        (DeValue::Array(_), false) => {
            return Err((
                value.span().start,
                format!("`{path}` takes one value, not an array"),
            ))
        }
        _ => vec![value],
    };
    for v in values {
        let text = scalar(v.get_ref()).ok_or_else(|| {
            (
                v.span().start,
                format!("`{path}` must be a string, a number or a boolean"),
            )
        })?;
        check_value(cmd, key.flag, &text)
            .map_err(|e| (v.span().start, format!("`{path}`: {e}")))?;
        flags.push(key.flag.into());
        flags.push(text.into());
    }
    Ok(())
}

/// A string, integer or float as the flag's text.
fn scalar(v: &DeValue<'_>) -> Option<String> {
    match v {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) if i.radix() == 10 => Some(i.as_str().replace('_', "")),
        DeValue::Float(f) => Some(f.as_str().replace('_', "")),
        DeValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses `flag value` with the daemon's command line parser; returns its complaint.
fn check_value(cmd: &clap::Command, flag: &str, value: &str) -> Result<(), String> {
    let argv = [cmd.get_name(), flag, value];
    cmd.clone()
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_string()
        })
}

/// The command line with the configuration file's flags inserted where the daemon's flags go (minus
/// those the command line gives itself): after
/// `daemon` or `check`, or right after the program name when no subcommand is given. Other
/// subcommands (`pull`, `help`) are left alone. The file is `--config`'s, or [`DEFAULT_PATH`] if it
/// exists.
pub fn argv_with_config(
    argv: Vec<OsString>,
    cmd: &clap::Command,
) -> Result<Vec<OsString>, ConfigError> {
    let explicit = config_flag(&argv);
    let path = explicit.clone().unwrap_or_else(|| DEFAULT_PATH.into());
    if explicit.is_none() && !path.exists() {
        return Ok(argv);
    }
    let at = match argv.get(1).and_then(|a| a.to_str()) {
        Some("daemon" | "check") => 2,
        Some(a) if !a.starts_with('-') => return Ok(argv),
        _ => 1,
    };
    let sub = if at == 2 {
        argv[1]
            .to_str()
            .and_then(|s| cmd.find_subcommand(s))
            .unwrap_or(cmd)
    } else {
        cmd
    };
    // A flag given on the command line replaces the file's value (a list, too).
    let given = |flag: &OsString| {
        let flag = flag.to_string_lossy();
        argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let file = flags_from_file(&path, sub)?;
    let flags: Vec<OsString> = file
        .chunks(2)
        .filter(|pair| !given(&pair[0]))
        .flatten()
        .cloned()
        .collect();
    let mut out = argv;
    out.splice(at..at, flags);
    Ok(out)
}

/// The value of `--config X` or `--config=X`, if given.
fn config_flag(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    None
}

#[cfg(test)]
mod tests;
