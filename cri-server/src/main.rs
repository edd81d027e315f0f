//! `podvisor`: the node daemon (CRI v1 over a unix socket), its host check and `podvisor pull`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cgroups;
mod check;
mod config;
mod daemon;
mod http;
mod images;
mod logs;
mod metrics;
mod network;
mod pod;
mod pull;
mod runtime;
mod sandbox;
mod spec;
mod state;
mod streaming;
mod telemetry;
mod text;

/// Defaults the daemon embeds; every one can be overridden by a flag.
pub mod defaults {
    /// CRI socket kubelet and crictl connect to.
    pub const SOCKET: &str = "/run/podvisor/podvisor.sock";
    /// Runtime files (VM sockets); emptied of stale files at start.
    pub const RUN_DIR: &str = "/run/podvisor";
    /// Root of the daemon's state (sled database, images, per-pod files).
    pub const STATE_DIR: &str = "/var/lib/podvisor";
    /// Where the guest kernel (`vmlinux`) and initramfs (`initramfs.cpio`) are installed.
    pub const GUEST_DIR: &str = "/usr/share/podvisor";
    /// CNI network configuration directory.
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
    /// CNI plugin directories, searched in order (upstream's, then Debian's package).
    pub const CNI_BIN_DIRS: [&str; 2] = ["/opt/cni/bin", "/usr/lib/cni"];
    /// Pod network namespaces (where `ip netns` looks).
    pub const NETNS_DIR: &str = "/run/netns";
    /// Prometheus endpoint (loopback only by default).
    pub const METRICS_ADDR: &str = "127.0.0.1:9464";
}

/// The command line (the configuration file's values are inserted into it, see [`config`]).
#[derive(Parser)]
#[command(
    name = "podvisor",
    version,
    about = "Kubernetes CRI runtime: every pod in its own microVM",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: daemon::DaemonArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CRI on the socket (the default).
    #[command(args_override_self = true)]
    Daemon(daemon::DaemonArgs),
    /// Report whether this host can run podvisor pods; exits non-zero if a check fails.
    #[command(args_override_self = true)]
    Check(daemon::DaemonArgs),
    /// Pull an image into the local image store (through the daemon when it is running).
    Pull(pull::PullArgs),
}

fn main() -> ExitCode {
    let argv = match config::argv_with_config(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("podvisor: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    // The daemon sets up its own telemetry (OTLP export runs on its runtime).
    let logs = |filter| telemetry::init(filter, None).map(drop);
    let ready = match &cli.command {
        Some(Command::Check(_)) => logs("info"),
        // `podvisor pull` draws a progress bar on stderr: only warnings by default there.
        Some(Command::Pull(_)) => logs("warn"),
        Some(Command::Daemon(_)) | None => Ok(()),
    };
    if let Err(e) = ready {
        eprintln!("podvisor: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::Check(args)) => check::run(&args),
        Some(Command::Daemon(args)) => daemon::run(args),
        Some(Command::Pull(args)) => pull::run(args),
        None => daemon::run(cli.daemon),
    }
}
