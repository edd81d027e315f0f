//! The container engine: a single-threaded child of the agent that drives youki's `libcontainer`.
//!
//! libcontainer clones processes with raw `clone3`, which is only safe from a single-threaded process, and a
//! container create blocks for as long as the container's init takes to set itself up (seconds in an
//! emulated guest kernel). So the agent forks this engine before its runtime starts; the engine serves one
//! request at a time over a `SOCK_SEQPACKET` socketpair (JSON, stdio descriptors as `SCM_RIGHTS`), and the
//! agent stays responsive meanwhile. Containers are built `as_sibling`: their processes are children of the
//! agent (PID 1), whose reaper records every exit.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

pub mod seccomp;

/// Largest encoded request or reply.
const MAX_MESSAGE: usize = 64 * 1024;

/// Errors talking to the engine or reported by it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine process could not be started.
    #[error("starting the container engine: {0}")]
    Spawn(#[source] nix::Error),
    /// The channel to the engine failed (the engine died?).
    #[error("container engine channel: {0}")]
    Channel(#[from] ChannelError),
    /// libcontainer refused or failed the operation.
    #[error("{0}")]
    Failed(String),
}

/// Where a process's stdio goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Stdio {
    /// Three descriptors (stdin, stdout, stderr) travel with the request.
    Pipes,
    /// A pty: libcontainer sends its master to this unix socket.
    Console(PathBuf),
}

/// One engine operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Create the container `id` from `bundle/config.json`; replies with the init PID.
    Create {
        /// Container id.
        id: String,
        /// Bundle directory.
        bundle: PathBuf,
        /// Stdio of the init process.
        stdio: Stdio,
    },
    /// Start the created container `id`.
    Start {
        /// Container id.
        id: String,
    },
    /// Run the OCI process in `process` (a process.json) in container `id`; replies with its PID.
    Exec {
        /// Container id.
        id: String,
        /// Path of the process.json.
        process: PathBuf,
        /// Stdio of the process.
        stdio: Stdio,
        /// The container's seccomp profile, applied to the process too (see [`seccomp::prepare`]).
        seccomp: Option<Box<seccomp::SeccompExec>>,
    },
    /// Freeze the container.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw the container.
    Resume {
        /// Container id.
        id: String,
    },
    /// Kill what is left and delete the container's state and cgroup.
    Delete {
        /// Container id.
        id: String,
    },
}

/// The engine's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
enum Reply {
    Done,
    Pid(i32),
    Failed(String),
}

/// The agent's end of the engine channel. Requests are serialized.
pub struct EngineClient {
    channel: Mutex<Channel>,
}

/// The socket and how many replies are owed to callers that went away.
struct Channel {
    sock: AsyncFd<OwnedFd>,
    /// A caller cancelled (its gRPC handler was dropped) after sending its request and before reading
    /// the reply: that reply must be read and discarded before the next exchange, or every later
    /// caller would read its predecessor's reply.
    unanswered: usize,
}

/// Forks the engine. Call before any thread exists (before the tokio runtime is built): the child runs
/// [`serve`] and never returns.
pub fn spawn(state_root: &Path) -> Result<OwnedFd, EngineError> {
    let (agent_end, engine_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(EngineError::Spawn)?;
    // SAFETY: called while the process is single-threaded (documented precondition), so the child may do
    // anything; the child never returns from this function.
    match unsafe { nix::unistd::fork() }.map_err(EngineError::Spawn)? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(engine_end);
            Ok(agent_end)
        }
        nix::unistd::ForkResult::Child => {
            drop(agent_end);
            let _ = nix::sys::prctl::set_name(c"podvisor-engine");
            // A private copy of the console: container processes cloned from here keep logging to it after
            // their stdio has become the container's (it is close-on-exec).
            if let Ok(console) =
                nix::fcntl::fcntl(std::io::stderr(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
            {
                let _ = tracing::subscriber::set_global_default(ConsoleLog(console));
            }
            serve(engine_end, state_root);
            std::process::exit(0)
        }
    }
}

/// The engine loop: one request at a time until the agent closes its end.
fn serve(sock: OwnedFd, state_root: &Path) {
    loop {
        let (request, fds) = match receive::<Request>(sock.as_raw_fd()) {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(err) => {
                crate::log(&format!("engine: {err}"));
                return;
            }
        };
        let reply = match handle(state_root, request, fds) {
            Ok(reply) => reply,
            Err(err) => Reply::Failed(err),
        };
        if let Err(err) = send(sock.as_raw_fd(), &reply, &[]) {
            crate::log(&format!("engine: {err}"));
            return;
        }
    }
}

/// Runs one request with libcontainer.
fn handle(root: &Path, request: Request, mut fds: Vec<OwnedFd>) -> Result<Reply, String> {
    let with_stdio = |builder: ContainerBuilder, stdio: &Stdio, fds: &mut Vec<OwnedFd>| match stdio
    {
        Stdio::Pipes if fds.len() == 3 => {
            let stderr = fds.pop().expect("3 fds");
            let stdout = fds.pop().expect("3 fds");
            let stdin = fds.pop().expect("3 fds");
            Ok(builder
                .with_stdin(stdin)
                .with_stdout(stdout)
                .with_stderr(stderr))
        }
        Stdio::Pipes => Err(format!("expected 3 stdio descriptors, got {}", fds.len())),
        Stdio::Console(path) => Ok(builder.with_console_socket(Some(path))),
    };
    let builder = |id: &str| {
        ContainerBuilder::new(id.to_string(), SyscallType::Linux)
            .with_root_path(root)
            .map_err(|e| first_cause(&e))
    };
    let load = |id: &str| Container::load(root.join(id)).map_err(|e| first_cause(&e));
    match request {
        Request::Create { id, bundle, stdio } => {
            let container = with_stdio(builder(&id)?, &stdio, &mut fds)?
                .validate_id()
                .map_err(|e| first_cause(&e))?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| first_cause(&e))?;
            let pid = container
                .pid()
                .ok_or_else(|| "libcontainer reported no init pid".to_string())?;
            Ok(Reply::Pid(pid.as_raw()))
        }
        Request::Start { id } => load(&id)?
            .start()
            .map(|()| Reply::Done)
            .map_err(|e| first_cause(&e)),
        Request::Exec {
            id,
            process,
            stdio,
            seccomp,
        } => {
            let mut b = with_stdio(builder(&id)?, &stdio, &mut fds)?;
            if let Some(seccomp) = seccomp {
                b = b.with_executor(*seccomp);
            }
            let pid = b
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| first_cause(&e))?;
            Ok(Reply::Pid(pid.as_raw()))
        }
        Request::Pause { id } => load(&id)?
            .pause()
            .map(|()| Reply::Done)
            .map_err(|e| first_cause(&e)),
        Request::Resume { id } => load(&id)?
            .resume()
            .map(|()| Reply::Done)
            .map_err(|e| first_cause(&e)),
        Request::Delete { id } => {
            if !root.join(&id).exists() {
                return Ok(Reply::Done);
            }
            load(&id)?
                .delete(true)
                .map(|()| Reply::Done)
                .map_err(|e| first_cause(&e))
        }
    }
}

/// An error with its chain of sources, outermost first, each source shown once: a libcontainer
/// failure ("failed to create container") then names its first cause (a mount, a missing file) even
/// where the outer message leaves it out.
fn first_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

impl EngineClient {
    /// The agent's end of a channel made by [`spawn`].
    pub fn new(sock: OwnedFd) -> std::io::Result<Self> {
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the OwnedFd is moved in and stays open, the same descriptor, for the AsyncFd's lifetime.
        let sock = unsafe { AsyncFd::register(sock) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            channel: Mutex::new(Channel {
                sock,
                unanswered: 0,
            }),
        })
    }

    /// Sends `request` with `fds` and waits for the reply; `Ok(Some(pid))` for Create and Exec.
    /// Cancellation-safe: a reply the caller no longer waits for is discarded by the next call.
    pub async fn call(&self, request: &Request, fds: &[RawFd]) -> Result<Option<i32>, EngineError> {
        let mut channel = self.channel.lock().await;
        while channel.unanswered > 0 {
            let stale = read_reply(&channel.sock).await?;
            channel.unanswered -= 1;
            crate::log(&format!(
                "engine: discarded the reply of a cancelled request: {stale:?}"
            ));
        }
        loop {
            let mut guard = channel.sock.writable().await.map_err(ChannelError::Wait)?;
            match send(channel.sock.get_ref().as_raw_fd(), request, fds) {
                Err(ChannelError::WouldBlock) => guard.clear_ready(),
                Err(err) => return Err(err.into()),
                Ok(()) => break,
            }
        }
        // Owed until read: if this future is dropped while waiting, the next call reads it.
        channel.unanswered += 1;
        let reply = read_reply(&channel.sock).await?;
        channel.unanswered -= 1;
        match reply {
            Reply::Done => Ok(None),
            Reply::Pid(pid) => Ok(Some(pid)),
            Reply::Failed(msg) => Err(EngineError::Failed(msg)),
        }
    }
}

/// Reads one reply from the engine (its descriptors, if any, are closed).
async fn read_reply(sock: &AsyncFd<OwnedFd>) -> Result<Reply, EngineError> {
    loop {
        let mut guard = sock.readable().await.map_err(ChannelError::Wait)?;
        match receive::<Reply>(sock.get_ref().as_raw_fd()) {
            Err(ChannelError::WouldBlock) => guard.clear_ready(),
            Err(err) => return Err(err.into()),
            Ok(None) => return Err(ChannelError::Closed.into()),
            Ok(Some((reply, _fds))) => return Ok(reply),
        }
    }
}

/// Failures of the channel between the agent and the engine.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The non-blocking socket has no room or no message (retried, never returned by the client).
    #[error("would block")]
    WouldBlock,
    /// Sending or receiving failed.
    #[error("socket: {0}")]
    Socket(#[source] nix::Error),
    /// A message could not be encoded or decoded.
    #[error("message: {0}")]
    Encoding(#[source] serde_json::Error),
    /// Waiting for the socket to be ready failed.
    #[error("{0}")]
    Wait(#[source] std::io::Error),
    /// The engine closed its end (it exited).
    #[error("the engine exited")]
    Closed,
}

fn send<T: Serialize>(sock: RawFd, message: &T, fds: &[RawFd]) -> Result<(), ChannelError> {
    let bytes = serde_json::to_vec(message).map_err(ChannelError::Encoding)?;
    let iov = [IoSlice::new(&bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    match sendmsg::<UnixAddr>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN) => Err(ChannelError::WouldBlock),
        Err(e) => Err(ChannelError::Socket(e)),
    }
}

/// Receives one message and its descriptors; `None` at EOF.
fn receive<T: for<'de> Deserialize<'de>>(
    sock: RawFd,
) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (len, fds) = match recv_with_fds(sock, &mut buf) {
        Ok(got) => got,
        Err(nix::errno::Errno::EAGAIN) => return Err(ChannelError::WouldBlock),
        Err(e) => return Err(ChannelError::Socket(e)),
    };
    if len == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..len]).map_err(ChannelError::Encoding)?;
    Ok(Some((message, fds)))
}

/// One `recvmsg` into `buf`: the byte count and the descriptors that came with it (close-on-exec, owned).
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        sock,
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us; nothing else owns
            // them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

/// Prints libcontainer's warnings and errors (its only diagnostics) to the console log (a descriptor).
struct ConsoleLog(RawFd);

impl tracing::Subscriber for ConsoleLog {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                if field.name() == "message" {
                    let _ = write!(self.0, " {value:?}");
                } else {
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let meta = event.metadata();
        let line = format!(
            "podvisor-agent: engine[{}]: {} {}:{}\n",
            std::process::id(),
            meta.level(),
            meta.target(),
            fields.0
        );
        // SAFETY: the descriptor is owned by this process for its whole life (never closed).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) };
        let _ = nix::unistd::write(fd, line.as_bytes());
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("failed to create container")]
        Create(#[source] std::io::Error),
        #[error("wrapped: {0}")]
        Shown(#[source] std::io::Error),
    }

    #[test]
    fn engine_errors_keep_typed_sources() {
        use std::error::Error;
        let spawn = EngineError::Spawn(nix::errno::Errno::EAGAIN);
        let source = spawn.source().and_then(|s| s.downcast_ref::<nix::Error>());
        assert_eq!(source, Some(&nix::errno::Errno::EAGAIN));
        let closed = EngineError::from(ChannelError::Closed);
        assert_eq!(
            closed.to_string(),
            "container engine channel: the engine exited"
        );
        let source = closed
            .source()
            .and_then(|s| s.downcast_ref::<ChannelError>());
        assert!(matches!(source, Some(ChannelError::Closed)), "{source:?}");
    }

    #[test]
    fn errors_name_their_first_cause_once() {
        let cause = || std::io::Error::other("mount /etc/linked: no such file or directory");
        assert_eq!(
            first_cause(&Outer::Create(cause())),
            "failed to create container: mount /etc/linked: no such file or directory"
        );
        // A source the message already shows is not repeated.
        assert_eq!(
            first_cause(&Outer::Shown(cause())),
            "wrapped: mount /etc/linked: no such file or directory"
        );
    }

    #[test]
    fn messages_and_descriptors_cross_the_channel() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let request = Request::Exec {
            id: "c1".into(),
            process: "/run/p.json".into(),
            stdio: Stdio::Pipes,
            seccomp: None,
        };
        send(a.as_raw_fd(), &request, &[w.as_raw_fd()]).unwrap();
        drop(w);
        let (got, mut fds) = receive::<Request>(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 1);
        nix::unistd::write(fds.pop().unwrap(), b"hi").unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(&r, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(a);
        assert!(receive::<Request>(b.as_raw_fd()).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_cancelled_call_does_not_shift_replies_to_later_calls() {
        let (agent, engine) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let client = EngineClient::new(agent).unwrap();
        // A slow engine: answers each request with its own pid, one request at a time.
        let fake = std::thread::spawn(move || {
            for pid in [41, 42] {
                let (_req, _fds) = receive::<Request>(engine.as_raw_fd()).unwrap().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                send(engine.as_raw_fd(), &Reply::Pid(pid), &[]).unwrap();
            }
        });
        let start = Request::Start { id: "c".into() };
        let first = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            client.call(&start, &[]),
        );
        assert!(
            first.await.is_err(),
            "the first caller gives up before the reply"
        );
        assert_eq!(client.call(&start, &[]).await.unwrap(), Some(42));
        fake.join().unwrap();
    }

    #[test]
    fn bad_stdio_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let err = handle(
            dir.path(),
            Request::Create {
                id: "c".into(),
                bundle: dir.path().into(),
                stdio: Stdio::Pipes,
            },
            Vec::new(),
        )
        .unwrap_err();
        assert!(err.contains("expected 3 stdio descriptors"), "{err}");
        // Deleting an unknown container is a no-op.
        assert_eq!(
            handle(dir.path(), Request::Delete { id: "x".into() }, Vec::new()),
            Ok(Reply::Done)
        );
    }
}
