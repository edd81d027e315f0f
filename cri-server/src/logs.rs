//! Container log files in the CRI format kubelet reads: one record per line,
//! `<RFC 3339 timestamp, 9 fraction digits, UTC> <stdout|stderr> <F|P> <content>\n`.
//!
//! Behaviour follows containerd's CRI logger: "\n" and "\r\n" end a line (the terminator is not
//! logged); a line longer than the maximum is cut into `P` records of exactly the maximum
//! followed by an `F` record with the rest; output left without a newline when a stream ends is
//! written as a `P` record. Each record is stamped with the time its last chunk was received.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(test)]
mod tests;

/// Longest record content; longer lines are split (containerd's `max_container_log_line_size`).
pub const MAX_LINE_SIZE: usize = 16 * 1024;

/// The container output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Failures opening or writing a container log file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file could not be opened (its directory must already exist).
    #[error("opening container log {path}: {source}")]
    Open {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record could not be written; it is lost, later records are still attempted.
    #[error("writing container log {path}: {source}")]
    Write {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One container's log file, shared by its stdout and stderr forwarders (clones share it).
/// Calls block on a short local file write; call from blocking-friendly contexts.
#[derive(Clone)]
pub struct LogWriter {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    file: File,
    /// Unterminated line per stream: [stdout, stderr].
    pending: [Vec<u8>; 2],
    max_line: usize,
}

fn open_file(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl LogWriter {
    /// Opens (appending, creating with mode 0640) the log file at `path`; its directory must
    /// exist (kubelet creates it).
    pub fn open(path: &Path) -> Result<LogWriter, LogError> {
        Self::open_with_max(path, MAX_LINE_SIZE)
    }

    fn open_with_max(path: &Path, max_line: usize) -> Result<LogWriter, LogError> {
        let file = open_file(path)?;
        Ok(LogWriter {
            inner: Arc::new(Mutex::new(Inner {
                path: path.to_path_buf(),
                file,
                pending: [Vec::new(), Vec::new()],
                max_line: max_line.max(1),
            })),
        })
    }

    /// Logs a chunk of `stream`: complete lines become `F` records, over-long ones `P` records;
    /// an unterminated tail waits for the next chunk or [`LogWriter::finish`].
    pub fn write(&self, stream: Stream, data: &[u8]) -> Result<(), LogError> {
        self.write_at(stream, data, SystemTime::now())
    }

    /// `stream` has ended: writes its unterminated tail, if any, as a `P` record.
    pub fn finish(&self, stream: Stream) -> Result<(), LogError> {
        self.finish_at(stream, SystemTime::now())
    }

    /// Opens the path again (creating it) after kubelet renamed the file to rotate it.
    /// Buffered partial lines are kept and land in the new file.
    pub fn reopen(&self) -> Result<(), LogError> {
        let mut inner = self.lock();
        inner.file = open_file(&inner.path)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst a half-built buffer: keep logging.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_at(&self, stream: Stream, data: &[u8], now: SystemTime) -> Result<(), LogError> {
        let mut inner = self.lock();
        let max = inner.max_line;
        let header = Header::new(now, stream);
        let mut out = Vec::new();
        let buf = &mut inner.pending[stream as usize];
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    buf.extend_from_slice(&rest[..pos]);
                    rest = &rest[pos + 1..];
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                    split(buf, max, false, &header, &mut out);
                    header.record(b'F', buf, &mut out);
                    buf.clear();
                }
                None => {
                    buf.extend_from_slice(rest);
                    rest = &[];
                    // A trailing '\r' may be the start of "\r\n": not content yet.
                    split(buf, max, true, &header, &mut out);
                }
            }
        }
        inner.append(&out)
    }

    fn finish_at(&self, stream: Stream, now: SystemTime) -> Result<(), LogError> {
        let mut inner = self.lock();
        let max = inner.max_line;
        let header = Header::new(now, stream);
        let mut out = Vec::new();
        let buf = &mut inner.pending[stream as usize];
        if !buf.is_empty() {
            split(buf, max, false, &header, &mut out);
            header.record(b'P', buf, &mut out);
            buf.clear();
        }
        inner.append(&out)
    }
}

impl Inner {
    fn append(&mut self, records: &[u8]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        // One write per chunk: records of the two streams never interleave mid-line.
        self.file
            .write_all(records)
            .map_err(|source| LogError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// Emits `P` records of exactly `max` bytes while `buf` holds more than `max` bytes of content.
fn split(buf: &mut Vec<u8>, max: usize, hold_cr: bool, header: &Header, out: &mut Vec<u8>) {
    let content = |b: &Vec<u8>| b.len() - usize::from(hold_cr && b.last() == Some(&b'\r'));
    let mut start = 0;
    while content(buf) - start > max {
        header.record(b'P', &buf[start..start + max], out);
        start += max;
    }
    buf.drain(..start);
}

/// "<timestamp> <stream> " for every record of one chunk.
struct Header(String);

impl Header {
    fn new(now: SystemTime, stream: Stream) -> Self {
        Header(format!("{} {} ", timestamp(now), stream.name()))
    }

    fn record(&self, tag: u8, content: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.as_bytes());
        out.push(tag);
        out.push(b' ');
        out.extend_from_slice(content);
        out.push(b'\n');
    }
}

/// `2016-10-06T00:17:09.669794202Z`: UTC, always nine fraction digits.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
