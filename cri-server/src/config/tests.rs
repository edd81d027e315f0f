use super::*;
use clap::{CommandFactory, FromArgMatches};

fn cmd() -> clap::Command {
    crate::Cli::command()
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn error(text: &str) -> (usize, usize, String) {
    let dir = tempfile::tempdir().unwrap();
    match flags_from_file(&write(dir.path(), text), &cmd()) {
        Err(ConfigError::Invalid {
            line,
            column,
            message,
            ..
        }) => (line, column, message),
        other => panic!("expected an invalid-file error for {text:?}, got {other:?}"),
    }
}

fn daemon_args(argv: &[&str]) -> crate::daemon::DaemonArgs {
    let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
    let argv = argv_with_config(argv, &cmd()).unwrap();
    let matches = cmd().try_get_matches_from(argv).unwrap();
    crate::Cli::from_arg_matches(&matches).unwrap().daemon
}

const FULL: &str = r#"
# every key
socket = "/tmp/pv/podvisor.sock"
state_dir = "/tmp/pv/state"
run_dir = "/tmp/pv/run"
guest_dir = "/tmp/pv/guest"
streaming_addr = "127.0.0.1:10010"

[images]
certs_dir = "/tmp/pv/certs.d"
fs = "erofs"
max_layer_bytes = 1_000_000
max_image_bytes = 2000000

[pods]
image_slots = 2
boot_timeout_secs = 30
default_memory_mib = 256
guest_overhead_mib = 64
writable_layer_mib = 128
host_pods = "refuse"

[network]
cni_conf_dir = "/tmp/pv/net.d"
cni_bin_dirs = ["/tmp/pv/bin", "/usr/lib/cni"]
netns_dir = "/tmp/pv/netns"

[cgroups]
enabled = false
sandbox_cgroup_only = true
overhead_cgroup = "/pv_overhead"
default_parent = "kubepods.slice"

[metrics]
address = "127.0.0.1:19464"

[tracing]
otlp_endpoint = "http://127.0.0.1:4317"
"#;

#[test]
fn every_key_sets_its_flag_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), FULL);
    let p = path.to_str().unwrap();
    let args = daemon_args(&["podvisor", "--config", p]);
    assert_eq!(args.socket, Path::new("/tmp/pv/podvisor.sock"));
    assert_eq!(args.state_dir, Path::new("/tmp/pv/state"));
    assert_eq!(args.streaming_addr.port(), 10010);
    assert_eq!(args.images.max_layer_bytes, 1_000_000);
    assert_eq!(args.pods.image_slots, 2);
    assert_eq!(args.pods.default_pod_memory_mib, 256);
    assert_eq!(
        args.network.cni_bin_dirs,
        [PathBuf::from("/tmp/pv/bin"), PathBuf::from("/usr/lib/cni")]
    );
    assert_eq!(args.network.netns_dir, Path::new("/tmp/pv/netns"));
    assert!(!args.cgroups.host_cgroups && args.cgroups.sandbox_cgroup_only);
    assert_eq!(args.cgroups.overhead_cgroup, "/pv_overhead");
    assert_eq!(args.cgroups.default_cgroup_parent, "kubepods.slice");
    assert_eq!(
        args.metrics_addr.0,
        Some("127.0.0.1:19464".parse().unwrap())
    );
    assert_eq!(args.otlp_endpoint, "http://127.0.0.1:4317");
    assert_eq!(args.pods.host_pods, crate::daemon::HostPods::Refuse);
    // An empty metrics address turns the endpoint off.
    let other = tempfile::tempdir().unwrap();
    let off = write(other.path(), "[metrics]\naddress = \"\"\n");
    let args = daemon_args(&["podvisor", "--config", off.to_str().unwrap()]);
    assert_eq!(args.metrics_addr.0, None);
    // A flag on the command line overrides the file; the rest of the file still applies.
    let args = daemon_args(&["podvisor", "--image-slots", "3", "--config", p]);
    assert_eq!(args.pods.image_slots, 3);
    assert_eq!(args.pods.boot_timeout_secs, 30);
    let args = daemon_args(&["podvisor", "--cni-bin-dir", "/x", "--config", p]);
    assert_eq!(args.network.cni_bin_dirs, [PathBuf::from("/x")]);
    // Every key of KEYS is in the full example, so each one was parsed by its flag above.
    for key in KEYS {
        let name = key.path.rsplit('.').next().unwrap();
        assert!(
            FULL.contains(&format!("\n{name} = ")),
            "{} missing",
            key.path
        );
    }
}

#[test]
fn the_daemon_subcommand_reads_the_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[pods]\nimage_slots = 5\n");
    let argv: Vec<OsString> = ["podvisor", "daemon", "--config", path.to_str().unwrap()]
        .iter()
        .map(OsString::from)
        .collect();
    let argv = argv_with_config(argv, &cmd()).unwrap();
    assert_eq!(argv[2], "--image-slots");
    assert_eq!(argv[3], "5");
    let pull: Vec<OsString> = ["podvisor", "pull", "--config", "x", "img"]
        .iter()
        .map(OsString::from)
        .collect();
    assert_eq!(argv_with_config(pull.clone(), &cmd()).unwrap(), pull);
}

#[test]
fn errors_name_the_line_the_column_and_the_key() {
    let (line, col, msg) = error("socket = \"/a\"\n[pods]\nimage_slots = 99\n");
    assert_eq!((line, col), (3, 15), "{msg}");
    assert!(
        msg.contains("pods.image_slots") && msg.contains("99"),
        "{msg}"
    );
    let (line, col, msg) = error("\n\n[pods]\nimage_slot = 2\n");
    assert_eq!((line, col), (4, 1), "{msg}");
    assert!(msg.contains("unknown key `pods.image_slot`"), "{msg}");
    let (line, _, msg) = error("[images]\nfs = \"btrfs\"\n");
    assert_eq!(line, 2, "{msg}");
    assert!(
        msg.contains("images.fs") && msg.contains("ext4 or erofs"),
        "{msg}"
    );
    let (line, _, msg) = error("[network]\ncni_bin_dirs = \"/opt/cni/bin\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("must be an array"), "{msg}");
    let (line, _, msg) = error("state_dir = [\"/a\"]\n");
    assert_eq!(line, 1);
    assert!(msg.contains("not an array"), "{msg}");
    let (line, _, msg) = error("[pods]\nimage_slots = { n = 1 }\n");
    assert_eq!(line, 2);
    assert!(msg.contains("a string, a number or a boolean"), "{msg}");
    let (line, _, msg) = error("[pods]\nimage_slots = true\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("pods.image_slots") && msg.contains("'true'"),
        "{msg}"
    );
    let (line, _, msg) = error("[cgroups]\nenabled = \"yes\"\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("cgroups.enabled") && msg.contains("'yes'"),
        "{msg}"
    );
    let (line, _, msg) = error("[metrics]\naddress = \"localhost\"\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("metrics.address") && msg.contains("IP:PORT"),
        "{msg}"
    );
    let (line, _, msg) = error("streaming_addr = \"nowhere\"\n");
    assert_eq!(line, 1);
    assert!(msg.contains("streaming_addr"), "{msg}");
    // TOML syntax errors keep the parser's location.
    let (line, _, msg) = error("socket = \"/a\"\n[pods\nimage_slots = 2\n");
    assert_eq!(line, 2, "{msg}");
}

#[test]
fn a_missing_explicit_file_is_an_error_and_the_message_names_it() {
    let argv: Vec<OsString> = ["podvisor", "--config", "/nonexistent/podvisor.toml"]
        .iter()
        .map(OsString::from)
        .collect();
    let e = argv_with_config(argv, &cmd()).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/podvisor.toml: "), "{e}");
}

#[test]
fn docs_list_every_key_with_its_flag() {
    let doc = include_str!("../../../docs/configuration.md");
    for key in KEYS {
        let row = format!("| `{}` | `{}`", key.path, key.flag);
        assert!(
            doc.contains(&row),
            "docs/configuration.md lacks the row {row}"
        );
    }
}
