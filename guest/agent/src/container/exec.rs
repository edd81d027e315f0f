//! ExecProcess and SignalProcess: a new process in a running container (with the container's own
//! confinement, see [`spec::exec_process`]) and signals to one process or to all of them.

use std::os::fd::AsRawFd;
use std::time::Instant;

use podvisor_proto as pb;

use super::process::Process;
use super::{
    cgroup, spec, validate_id, ContainerError, ContainerManager, State, EXITED_EXECS_KEPT,
};
use crate::engine::Request;

impl ContainerManager {
    /// ExecProcess.
    pub async fn exec(&self, req: &pb::ExecProcessRequest) -> Result<u32, ContainerError> {
        let c = self.get(&req.container_id)?;
        validate_id("exec_id", &req.exec_id)?;
        let mut process = spec::exec_process(&c.process, &req.args, req.terminal)?;
        let seccomp = c
            .seccomp
            .clone()
            .map(|profile| Box::new(crate::engine::seccomp::prepare(&mut process, profile)));
        let _op = c.ops.lock().await;
        if c.state() != State::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?} is {:?}, not running",
                c.id,
                c.state()
            )));
        }
        if c.execs
            .lock()
            .expect("execs lock")
            .get(&req.exec_id)
            .is_some_and(|p| p.ended().is_none())
        {
            return Err(ContainerError::AlreadyExists(format!(
                "exec {:?} is running",
                req.exec_id
            )));
        }
        let file = c.bundle.join(format!("exec-{}.json", req.exec_id));
        std::fs::write(
            &file,
            serde_json::to_vec(&process).map_err(ContainerError::Encode)?,
        )?;
        let (engine_stdio, stdio, child_fds, console) =
            self.stdio(process.terminal().unwrap_or(false))?;
        let raw: Vec<_> = child_fds.iter().map(|f| f.as_raw_fd()).collect();
        let since = Instant::now();
        let request = Request::Exec {
            id: c.id.clone(),
            process: file.clone(),
            stdio: engine_stdio,
            seccomp,
        };
        let pid = self.engine.call(&request, &raw).await;
        let _ = std::fs::remove_file(&file);
        let pid =
            pid?.ok_or_else(|| ContainerError::Internal("the engine returned no pid".into()))?;
        drop(child_fds);
        let stdio = match console {
            Some(cw) => cw.finish().await?,
            None => stdio,
        };
        let mut watch = c.watch.clone();
        watch.oom_baseline = c.cgroup.oom_kills();
        let exit = self.exits.claim(pid, since);
        let p = Process::track(pid, &req.exec_id, stdio, exit, watch, || {});
        let mut execs = c.execs.lock().expect("execs lock");
        execs.insert(req.exec_id.clone(), p);
        let mut ended: Vec<_> = execs
            .iter()
            .filter_map(|(k, p)| p.ended().map(|e| (e.at, k.clone())))
            .collect();
        if ended.len() > EXITED_EXECS_KEPT {
            ended.sort();
            for (_, k) in &ended[..ended.len() - EXITED_EXECS_KEPT] {
                execs.remove(k);
            }
        }
        Ok(pid as u32)
    }

    /// SignalProcess. SIGTERM to an init that has its own PID namespace and no SIGTERM handler becomes
    /// SIGKILL: the kernel would ignore it (Kata does the same).
    pub fn signal(&self, req: &pb::SignalProcessRequest) -> Result<(), ContainerError> {
        let signal = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|_| {
            ContainerError::InvalidArgument(format!("signal: {} is not a signal", req.signal))
        })?;
        let c = self.get(&req.container_id)?;
        if req.all {
            if !req.exec_id.is_empty() {
                return Err(ContainerError::InvalidArgument(
                    "exec_id: must be empty with all".into(),
                ));
            }
            if signal == nix::sys::signal::Signal::SIGKILL {
                c.cgroup.kill_all();
            } else {
                for pid in c.cgroup.pids() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                }
            }
            return Ok(());
        }
        let p = self.process(&req.container_id, &req.exec_id)?;
        if p.ended().is_some() {
            return Ok(());
        }
        let mut signal = signal;
        if req.exec_id.is_empty()
            && c.own_pid_ns
            && signal == nix::sys::signal::Signal::SIGTERM
            && !cgroup::catches(&self.paths.proc, p.pid, nix::libc::SIGTERM)
        {
            signal = nix::sys::signal::Signal::SIGKILL;
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
