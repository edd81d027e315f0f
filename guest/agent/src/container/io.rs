//! Process stdio: pipes or a pty master, read and written asynchronously, streamed to one reader at a time.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::ContainerError;

/// Largest chunk sent to the host.
pub const CHUNK: usize = 64 * 1024;

/// A non-blocking descriptor driven by tokio.
pub struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    /// Makes `fd` non-blocking and registers it.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the OwnedFd is moved in and stays open, the same descriptor, for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self(fd))
    }

    /// Reads up to [`CHUNK`] bytes; empty at EOF (a pty whose other side is gone reads as EOF).
    pub async fn read(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut guard = self.0.readable().await?;
            match nix::unistd::read(self.0.get_ref(), &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Errno::EIO) => return Ok(Vec::new()),
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes all of `data`; stops early (returning the count) when the reader is gone.
    pub async fn write_all(&self, data: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < data.len() {
            let mut guard = self.0.writable().await?;
            match nix::unistd::write(self.0.get_ref(), &data[done..]) {
                Ok(n) => done += n,
                Err(Errno::EPIPE) | Err(Errno::EIO) => break,
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// The raw descriptor (for ioctls).
    pub fn raw(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

/// An output stream of a process, handed to one reader at a time.
#[derive(Default)]
pub struct Output(Mutex<OutputState>);

#[derive(Default)]
enum OutputState {
    /// Nothing to read (a tty's stderr).
    #[default]
    None,
    /// Waiting for a reader; `pending` holds a chunk read but not delivered when the last reader left.
    Idle { fd: Arc<Fd>, pending: Vec<u8> },
    /// A reader is attached.
    Reading,
    /// EOF was delivered.
    Done,
}

impl Output {
    /// An output reading from `fd`.
    pub fn new(fd: Arc<Fd>) -> Self {
        Self(Mutex::new(OutputState::Idle {
            fd,
            pending: Vec::new(),
        }))
    }

    /// Attaches a reader: a channel of chunks ending at EOF. Errors when another reader is attached.
    pub fn attach(
        self: &Arc<Self>,
        what: &str,
    ) -> Result<mpsc::Receiver<Result<Vec<u8>, String>>, ContainerError> {
        let (fd, pending) = {
            let mut state = self.0.lock().expect("output lock");
            match std::mem::replace(&mut *state, OutputState::Reading) {
                OutputState::Idle { fd, pending } => (fd, pending),
                OutputState::Reading => {
                    return Err(ContainerError::FailedPrecondition(format!(
                        "{what} already has a reader"
                    )))
                }
                done @ (OutputState::None | OutputState::Done) => {
                    *state = done;
                    let (_, rx) = mpsc::channel(1);
                    return Ok(rx);
                }
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut chunk = pending;
            loop {
                if chunk.is_empty() {
                    chunk = match fd.read().await {
                        Ok(c) if c.is_empty() => break,
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string())).await;
                            break;
                        }
                    };
                }
                match tx.reserve().await {
                    Ok(permit) => permit.send(Ok(std::mem::take(&mut chunk))),
                    Err(_) => {
                        // The reader left: keep the chunk for the next one.
                        *this.0.lock().expect("output lock") =
                            OutputState::Idle { fd, pending: chunk };
                        return;
                    }
                }
            }
            *this.0.lock().expect("output lock") = OutputState::Done;
        });
        Ok(rx)
    }
}

/// The agent's ends of a process's stdio and the descriptors to give the process.
pub struct Stdio {
    /// Where the host's stdin writes go (the pty master for a tty).
    pub stdin: Option<Arc<Fd>>,
    /// Stdout (the pty master for a tty).
    pub stdout: Arc<Output>,
    /// Stderr (empty for a tty).
    pub stderr: Arc<Output>,
    /// The pty master, for resizing.
    pub tty: Option<Arc<Fd>>,
}

/// Pipes for a process without a tty: the agent's ends and the process's (stdin, stdout, stderr).
pub fn pipes() -> Result<(Stdio, [OwnedFd; 3]), ContainerError> {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ContainerError::from);
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdio = Stdio {
        stdin: Some(Arc::new(Fd::new(in_w)?)),
        stdout: Arc::new(Output::new(Arc::new(Fd::new(out_r)?))),
        stderr: Arc::new(Output::new(Arc::new(Fd::new(err_r)?))),
        tty: None,
    };
    Ok((stdio, [in_r, out_w, err_w]))
}

/// Stdio over a pty master received on a console socket.
pub fn from_pty(master: OwnedFd) -> Result<Stdio, ContainerError> {
    let master = Arc::new(Fd::new(master)?);
    Ok(Stdio {
        stdin: Some(master.clone()),
        stdout: Arc::new(Output::new(master.clone())),
        stderr: Arc::new(Output::default()),
        tty: Some(master),
    })
}

/// Listens on `path` for libcontainer's console socket connection and returns the pty master it sends.
pub fn console_listener(
    path: &Path,
) -> Result<tokio::task::JoinHandle<Result<OwnedFd, ContainerError>>, ContainerError> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        loop {
            stream.readable().await?;
            let mut buf = [0u8; 256];
            let (_, fds) = match crate::engine::recv_with_fds(stream.as_raw_fd(), &mut buf) {
                Err(Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
                Ok(got) => got,
            };
            if let Some(master) = fds.into_iter().next() {
                return Ok(master);
            }
            return Err(ContainerError::Internal(
                "console socket closed without a pty master".into(),
            ));
        }
    }))
}

/// Sets the window size of a pty.
pub fn resize(tty: &Fd, rows: u16, cols: u16) -> Result<(), ContainerError> {
    let size = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { nix::libc::ioctl(tty.raw(), nix::libc::TIOCSWINSZ, &size) };
    Errno::result(rc).map(drop).map_err(ContainerError::from)
}

/// A console socket waiting for libcontainer to send the pty master.
pub struct ConsoleWait {
    /// The socket path (removed once done).
    pub path: PathBuf,
    /// The task receiving the master.
    pub wait: tokio::task::JoinHandle<Result<std::os::fd::OwnedFd, ContainerError>>,
}

impl ConsoleWait {
    /// The stdio over the received master (it was sent before the engine replied).
    pub async fn finish(self) -> Result<Stdio, ContainerError> {
        let got = tokio::time::timeout(Duration::from_secs(5), self.wait).await;
        let _ = std::fs::remove_file(&self.path);
        match got {
            Ok(Ok(Ok(master))) => from_pty(master),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(ContainerError::Internal(e.to_string())),
            Err(_) => Err(ContainerError::Internal(
                "no pty master arrived on the console socket".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_survives_a_reader_leaving_and_ends_with_eof() {
        let (stdio, [child_in, child_out, child_err]) = pipes().unwrap();
        drop((child_in, child_err));
        nix::unistd::write(&child_out, b"first").unwrap();
        let mut rx = stdio.stdout.attach("stdout").unwrap();
        assert!(
            stdio.stdout.attach("stdout").is_err(),
            "one reader at a time"
        );
        assert_eq!(rx.recv().await.unwrap().unwrap(), b"first");
        drop(rx);
        nix::unistd::write(&child_out, b"second").unwrap();
        // Give the reader task time to notice and park the chunk.
        let mut rx = loop {
            match stdio.stdout.attach("stdout") {
                Ok(rx) => break rx,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        };
        drop(child_out);
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            got.extend(chunk.unwrap());
        }
        assert_eq!(got, b"second");
        // After EOF, a new reader gets an empty stream.
        assert!(stdio
            .stdout
            .attach("stdout")
            .unwrap()
            .recv()
            .await
            .is_none());
        assert!(stdio.stderr.attach("stderr").is_ok());
    }

    #[tokio::test]
    async fn stdin_reaches_the_process_end() {
        let (stdio, [child_in, _out, _err]) = pipes().unwrap();
        let n = stdio
            .stdin
            .as_ref()
            .unwrap()
            .write_all(b"abc")
            .await
            .unwrap();
        assert_eq!(n, 3);
        let mut buf = [0u8; 3];
        nix::unistd::read(&child_in, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        drop(child_in);
        assert_eq!(stdio.stdin.unwrap().write_all(b"x").await.unwrap(), 0);
    }
}
