//! CNI (https://www.cni.dev/docs/spec/, versions 0.3.0 to 1.0.0): the operator's network configuration
//! list and plugin execution (ADD/CHECK/DEL chains, VERSION).
//!
//! As libcni does, each plugin gets its configuration object with the list's `name` and `cniVersion`,
//! the previous result as `prevResult` (ADD: the previous plugin's; CHECK and DEL: the cached final
//! result) and `runtimeConfig` holding the runtime's values for the capabilities it declares.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::NetworkError;

/// CNI specification versions podvisor speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// Largest plugin stdout accepted (a result or an error).
const MAX_STDOUT: u64 = 1 << 20;
/// Largest plugin stderr kept for an error message.
const MAX_STDERR: u64 = 16 << 10;

/// A validated network configuration list.
#[derive(Clone, Debug)]
pub struct ConfList {
    /// Network name.
    pub name: String,
    /// CNI version of the list (given to every plugin).
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped.
    pub disable_check: bool,
    /// The plugin configuration objects, in order.
    pub plugins: Vec<Map<String, Value>>,
    /// The list as JSON (a single-plugin `.conf` wrapped into a list).
    pub json: String,
}

impl ConfList {
    /// Validates a configuration list; errors start with `source` and name the field.
    pub fn parse(json: &str, source: &str) -> Result<Self, NetworkError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| config_err(source, format_args!("invalid JSON: {e}")))?;
        Self::from_value(value, source)
    }

    fn from_value(value: Value, source: &str) -> Result<Self, NetworkError> {
        let err = |msg: std::fmt::Arguments| config_err(source, msg);
        let Value::Object(list) = &value else {
            return Err(err(format_args!("not a JSON object")));
        };
        let cni_version = string_field(list, "cniVersion").map_err(|m| err(format_args!("{m}")))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            let supported = SUPPORTED_VERSIONS.join(", ");
            let msg = format_args!("cniVersion: {cni_version:?} is not supported ({supported})");
            return Err(err(msg));
        }
        let name = string_field(list, "name").map_err(|m| err(format_args!("{m}")))?;
        let disable_check = match list.get("disableCheck") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => return Err(err(format_args!("disableCheck: {other} is not a boolean"))),
        };
        let plugins = match list.get("plugins") {
            Some(Value::Array(plugins)) if !plugins.is_empty() => plugins,
            Some(Value::Array(_)) => return Err(err(format_args!("plugins: empty"))),
            Some(_) => return Err(err(format_args!("plugins: not an array"))),
            None => return Err(err(format_args!("plugins: missing"))),
        };
        let mut objects = Vec::with_capacity(plugins.len());
        for (i, plugin) in plugins.iter().enumerate() {
            let Value::Object(plugin) = plugin else {
                return Err(err(format_args!("plugins[{i}]: not a JSON object")));
            };
            let kind =
                string_field(plugin, "type").map_err(|m| err(format_args!("plugins[{i}].{m}")))?;
            if kind.contains('/') || kind.starts_with('.') {
                return Err(err(format_args!(
                    "plugins[{i}].type: {kind:?} is not a plugin name"
                )));
            }
            match plugin.get("capabilities") {
                None | Some(Value::Null) => {}
                Some(Value::Object(caps)) if caps.values().all(Value::is_boolean) => {}
                Some(_) => {
                    let msg = "an object of booleans is expected";
                    return Err(err(format_args!("plugins[{i}].capabilities: {msg}")));
                }
            }
            objects.push(plugin.clone());
        }
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins: objects,
            json: value.to_string(),
        })
    }

    /// The `type` of plugin `i` (validated by [`ConfList::parse`]).
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]["type"].as_str().unwrap_or_default()
    }

    /// The configuration given to plugin `i` on stdin.
    pub fn plugin_config(
        &self,
        i: usize,
        prev: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Value {
        let mut conf = self.plugins[i].clone();
        conf.insert("name".into(), self.name.clone().into());
        conf.insert("cniVersion".into(), self.cni_version.clone().into());
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let declared = conf.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = declared
            .into_iter()
            .flatten()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .filter_map(|(cap, _)| Some((cap.clone(), capability_args.get(cap)?.clone())))
            .collect();
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(conf)
    }

    /// Whether CHECK applies: cniVersion 0.4.0 or later and not disabled.
    pub fn supports_check(&self) -> bool {
        !self.disable_check && !self.cni_version.starts_with("0.3.")
    }
}

fn config_err(source: &str, msg: impl std::fmt::Display) -> NetworkError {
    NetworkError::NotConfigured(format!("CNI config {source}: {msg}"))
}

fn string_field(object: &Map<String, Value>, field: &str) -> Result<String, String> {
    match object.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{field}: empty")),
        Some(other) => Err(format!("{field}: {other} is not a string")),
        None => Err(format!("{field}: missing")),
    }
}

/// Loads the lexically first `*.conflist`, `*.conf` or `*.json` file of `dir`. A file without a
/// `plugins` list (a single-plugin `.conf`) is wrapped into a list.
pub fn load_dir(dir: &Path) -> Result<(PathBuf, ConfList), NetworkError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        NetworkError::NotConfigured(format!("no CNI config: reading {}: {e}", dir.display()))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let ext = path.extension().and_then(|e| e.to_str());
            matches!(ext, Some("conflist" | "conf" | "json")) && path.is_file()
        })
        .collect();
    files.sort();
    let Some(path) = files.into_iter().next() else {
        let msg = format!(
            "no CNI config in {} (*.conflist, *.conf, *.json)",
            dir.display()
        );
        return Err(NetworkError::NotConfigured(msg));
    };
    let source = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| config_err(&source, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| config_err(&source, format_args!("invalid JSON: {e}")))?;
    let is_list =
        path.extension().is_some_and(|e| e == "conflist") || value.get("plugins").is_some();
    let list = if is_list {
        value
    } else {
        // A single plugin configuration: the list carries its name and version.
        let field = |f: &str| value.get(f).cloned().unwrap_or(Value::Null);
        let mut list = Map::new();
        list.insert("cniVersion".into(), field("cniVersion"));
        list.insert("name".into(), field("name"));
        list.insert("plugins".into(), Value::Array(vec![value]));
        Value::Object(list)
    };
    let list = ConfList::from_value(list, &source)?;
    Ok((path, list))
}

/// The executable of plugin `kind` in the first of `bin_dirs` that has it.
pub fn find_plugin(bin_dirs: &[PathBuf], kind: &str) -> Result<PathBuf, NetworkError> {
    use std::os::unix::fs::PermissionsExt;
    let found = bin_dirs.iter().map(|dir| dir.join(kind)).find(|path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    found.ok_or_else(|| {
        let dirs: Vec<_> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
        let msg = format!("CNI plugin {kind:?} not found in {}", dirs.join(":"));
        NetworkError::NotConfigured(msg)
    })
}

/// A CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Verify an attachment.
    Check,
    /// Detach (must tolerate being repeated and missing resources).
    Del,
    /// Report the supported spec versions.
    Version,
}

impl Command {
    /// The `CNI_COMMAND` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
            Command::Version => "VERSION",
        }
    }
}

/// The runtime's side of an invocation: everything but the command and the plugin configuration.
#[derive(Clone, Debug)]
pub struct Runtime<'a> {
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_NETNS` (empty for a DEL whose namespace is gone).
    pub netns: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: &'a str,
    /// Plugin directories, `CNI_PATH`.
    pub bin_dirs: &'a [PathBuf],
    /// Values of capabilities (`runtimeConfig`), by capability name.
    pub capability_args: &'a Map<String, Value>,
    /// Time limit of one plugin execution.
    pub timeout: Duration,
}

impl Runtime<'_> {
    /// The CNI environment variables of `command`.
    pub fn env(&self, command: Command) -> Vec<(&'static str, String)> {
        let path = std::env::join_paths(self.bin_dirs)
            .map_or_else(|_| String::new(), |p| p.to_string_lossy().into_owned());
        vec![
            ("CNI_COMMAND", command.as_str().to_string()),
            ("CNI_CONTAINERID", self.container_id.to_string()),
            ("CNI_NETNS", self.netns.to_string()),
            ("CNI_IFNAME", self.ifname.to_string()),
            ("CNI_ARGS", self.args.to_string()),
            ("CNI_PATH", path),
        ]
    }
}

/// `CNI_ARGS` of a Kubernetes pod, as kubelet's dockershim and containerd pass them.
pub fn k8s_args(namespace: &str, name: &str, pod_id: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={pod_id};K8S_POD_UID={uid}"
    )
}

/// An error a plugin reported on stdout (CNI error JSON).
#[derive(Debug, serde::Deserialize)]
struct PluginError {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// Builds [`NetworkError::Plugin`] from a failed execution: the error JSON if the plugin printed one,
/// else its stderr or stdout text.
pub fn plugin_failure(
    kind: &str,
    command: Command,
    status: &str,
    stdout: &[u8],
    stderr: &[u8],
) -> NetworkError {
    let (code, message) = match serde_json::from_slice::<PluginError>(stdout) {
        Ok(e) if e.details.is_empty() => (Some(e.code), e.msg),
        Ok(e) => (Some(e.code), format!("{}: {}", e.msg, e.details)),
        Err(_) => {
            let text = if stdout.iter().all(u8::is_ascii_whitespace) {
                stderr
            } else {
                stdout
            };
            let text = String::from_utf8_lossy(text);
            (None, format!("{status}: {}", text.trim()))
        }
    };
    NetworkError::Plugin {
        plugin: kind.to_string(),
        command: command.as_str(),
        code,
        message,
    }
}

/// Reads `pipe` to its end or to one byte past `limit` (then drops it: the writer gets EPIPE).
async fn read_capped(pipe: impl AsyncRead + Unpin, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    pipe.take(limit + 1).read_to_end(&mut buf).await?;
    Ok(buf)
}

/// Runs plugin executable `binary` (of type `kind`) with `stdin` and `env` added to the daemon's
/// environment (plugins need its `PATH`: portmap runs `iptables`), within `timeout`; its stdout on
/// success.
pub async fn exec(
    binary: &Path,
    kind: &str,
    command: Command,
    env: &[(&'static str, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, NetworkError> {
    let fail = |message: String| NetworkError::Plugin {
        plugin: kind.to_string(),
        command: command.as_str(),
        code: None,
        message,
    };
    let mut child = tokio::process::Command::new(binary)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("starting {}: {e}", binary.display())))?;
    let (Some(mut input), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(fail("no stdio pipes".into()));
    };
    let run = async {
        let write = async {
            // A plugin may exit without reading its config (VERSION): a broken pipe is not an error.
            let _ = input.write_all(stdin).await;
            drop(input);
        };
        let (_, out, err) = tokio::join!(
            write,
            read_capped(stdout, MAX_STDOUT),
            read_capped(stderr, MAX_STDERR)
        );
        let status = child.wait().await;
        (status, out, err)
    };
    let (status, out, err) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| fail(format!("timed out after {timeout:?}")))?;
    let status = status.map_err(|e| fail(format!("waiting: {e}")))?;
    let out = out.map_err(|e| fail(format!("reading stdout: {e}")))?;
    let err = err.unwrap_or_default();
    if out.len() as u64 > MAX_STDOUT {
        return Err(fail(format!("output exceeds {MAX_STDOUT} bytes")));
    }
    if !status.success() {
        return Err(plugin_failure(
            kind,
            command,
            &status.to_string(),
            &out,
            &err,
        ));
    }
    Ok(out)
}

/// Runs `command` for plugin `i` of `list`; the parsed result for ADD, `Value::Null` otherwise.
async fn invoke(
    list: &ConfList,
    i: usize,
    command: Command,
    prev: Option<&Value>,
    rt: &Runtime<'_>,
) -> Result<Value, NetworkError> {
    let kind = list.plugin_type(i);
    let binary = find_plugin(rt.bin_dirs, kind)?;
    tracing::debug!(
        plugin = kind,
        command = command.as_str(),
        id = rt.container_id,
        "CNI"
    );
    let conf = list.plugin_config(i, prev, rt.capability_args);
    let stdin = serde_json::to_vec(&conf).unwrap_or_default();
    let out = exec(&binary, kind, command, &rt.env(command), &stdin, rt.timeout).await?;
    if command != Command::Add {
        return Ok(Value::Null);
    }
    match serde_json::from_slice::<Value>(&out) {
        Ok(result @ Value::Object(_)) => Ok(result),
        _ => Err(NetworkError::Plugin {
            plugin: kind.to_string(),
            command: command.as_str(),
            code: None,
            message: format!(
                "result is not a JSON object: {}",
                String::from_utf8_lossy(&out)
            ),
        }),
    }
}

/// ADD through the chain in order, each plugin getting the previous one's result; the final result.
pub async fn add(list: &ConfList, rt: &Runtime<'_>) -> Result<Value, NetworkError> {
    let mut prev: Option<Value> = None;
    for i in 0..list.plugins.len() {
        prev = Some(invoke(list, i, Command::Add, prev.as_ref(), rt).await?);
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// CHECK through the chain in order with the cached `result` (skipped where not supported).
pub async fn check(list: &ConfList, result: &Value, rt: &Runtime<'_>) -> Result<(), NetworkError> {
    if !list.supports_check() {
        return Ok(());
    }
    for i in 0..list.plugins.len() {
        invoke(list, i, Command::Check, Some(result), rt).await?;
    }
    Ok(())
}

/// DEL through the chain in reverse order with the cached `result`, stopping at the first failure.
pub async fn del(
    list: &ConfList,
    result: Option<&Value>,
    rt: &Runtime<'_>,
) -> Result<(), NetworkError> {
    for i in (0..list.plugins.len()).rev() {
        invoke(list, i, Command::Del, result, rt).await?;
    }
    Ok(())
}

/// Checks that every plugin of `list` supports the list's cniVersion (the VERSION command).
pub async fn check_versions(list: &ConfList, rt: &Runtime<'_>) -> Result<(), NetworkError> {
    #[derive(serde::Deserialize)]
    struct Versions {
        #[serde(rename = "supportedVersions", default)]
        supported: Vec<String>,
    }
    let stdin = serde_json::json!({ "cniVersion": list.cni_version }).to_string();
    let env = [("CNI_COMMAND", "VERSION".to_string())];
    for i in 0..list.plugins.len() {
        let kind = list.plugin_type(i);
        let binary = find_plugin(rt.bin_dirs, kind)?;
        let out = exec(
            &binary,
            kind,
            Command::Version,
            &env,
            stdin.as_bytes(),
            rt.timeout,
        )
        .await?;
        let versions: Versions =
            serde_json::from_slice(&out).map_err(|e| NetworkError::Plugin {
                plugin: kind.to_string(),
                command: "VERSION",
                code: None,
                message: format!("unreadable answer: {e}"),
            })?;
        if !versions.supported.contains(&list.cni_version) {
            let msg = format!(
                "CNI plugin {} supports CNI versions {:?}, not the config's {}",
                binary.display(),
                versions.supported,
                list.cni_version
            );
            return Err(NetworkError::NotConfigured(msg));
        }
    }
    Ok(())
}
