"""Checks of deploy/ that no Kubernetes schema covers (run by e2e/validate-deploy.sh).

    check_deploy.py DEPLOY_DIR REPO_ROOT

- kubelet/: KubeletConfiguration is not in the API server's schemas: its apiVersion, kind and the fields
  used are checked here (a field outside KUBELET_FIELDS fails: check it against the kubelet reference and
  add it), and its endpoints, the drop-in's flags and crictl.yaml must be the daemon's default socket
  (cri-server/src/main.rs).
- cni/10-podvisor.conflist: JSON, bridge podvisor0 + host-local 10.99.0.0/16, then portmap.
- config.toml parses as TOML and the ConfigMap carries the same text.
- The manifests agree with each other and with install.sh, the unit and the image: namespace, service
  account, ConfigMap, labels, image, paths.
Prints one "FAIL check-deploy: ..." line per problem; exit status 1 if there is any.
"""

import ipaddress
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

DEPLOY, ROOT = Path(sys.argv[1]), Path(sys.argv[2])
ERRORS = []

# KubeletConfiguration fields used by deploy/kubelet/kubelet-config.yaml (kubelet.config.k8s.io/v1beta1).
KUBELET_FIELDS = {"apiVersion", "kind", "containerRuntimeEndpoint", "imageServiceEndpoint", "cgroupDriver",
                  "runtimeRequestTimeout"}
CRICTL_FIELDS = {"runtime-endpoint", "image-endpoint", "timeout", "debug", "pull-image-on-create",
                 "disable-pull-on-run"}
RUNTIME_LABEL = {"podvisor.io/runtime": "true"}
INSTALL_LABEL = {"podvisor.io/install": "true"}


def check(cond, what):
    if not cond:
        ERRORS.append(what)
    return cond


def const(path, name):
    m = re.search(rf'const {name}: &str = "([^"]+)"', (ROOT / path).read_text())
    return m.group(1) if m else None


def shell_var(name):
    m = re.search(rf"^{name}=(\S+)", (DEPLOY / "install.sh").read_text(), re.M)
    return m.group(1) if m else None


SOCKET = const("cri-server/src/main.rs", "SOCKET")
ENDPOINT = f"unix://{SOCKET}"
check(SOCKET, "cri-server/src/main.rs: defaults::SOCKET not found")


def check_kubelet():
    """deploy/kubelet/: not API objects, so no schema: the fields used and the endpoints."""
    kc = yaml.safe_load((DEPLOY / "kubelet/kubelet-config.yaml").read_text())
    check(kc.get("apiVersion") == "kubelet.config.k8s.io/v1beta1", "kubelet-config.yaml: apiVersion")
    check(kc.get("kind") == "KubeletConfiguration", "kubelet-config.yaml: kind")
    check(set(kc) <= KUBELET_FIELDS, f"kubelet-config.yaml: unknown fields {sorted(set(kc) - KUBELET_FIELDS)}")
    for field in ("containerRuntimeEndpoint", "imageServiceEndpoint"):
        check(kc.get(field) == ENDPOINT, f"kubelet-config.yaml: {field} is {kc.get(field)!r}, not {ENDPOINT}")
    check(kc.get("cgroupDriver") == "cgroupfs", "kubelet-config.yaml: cgroupDriver must be cgroupfs (the daemon's)")
    check(re.fullmatch(r"(\d+(h|m|s|ms))+", str(kc.get("runtimeRequestTimeout", "2m"))),
          "kubelet-config.yaml: runtimeRequestTimeout is not a duration")
    dropin = (DEPLOY / "kubelet/10-podvisor.conf").read_text()
    for flag in ("--container-runtime-endpoint", "--image-service-endpoint"):
        check(f"{flag}={ENDPOINT}" in dropin, f"10-podvisor.conf: {flag}={ENDPOINT} missing")
    check("--cgroup-driver=cgroupfs" in dropin, "10-podvisor.conf: --cgroup-driver=cgroupfs missing")
    crictl = yaml.safe_load((DEPLOY / "kubelet/crictl.yaml").read_text())
    check(set(crictl) <= CRICTL_FIELDS, f"crictl.yaml: unknown fields {sorted(set(crictl) - CRICTL_FIELDS)}")
    for field in ("runtime-endpoint", "image-endpoint"):
        check(crictl.get(field) == ENDPOINT, f"crictl.yaml: {field} is {crictl.get(field)!r}, not {ENDPOINT}")


def check_cni():
    """deploy/cni/10-podvisor.conflist: the default pod network."""
    net = json.loads((DEPLOY / "cni/10-podvisor.conflist").read_text())
    plugins = net.get("plugins", [])
    check([p.get("type") for p in plugins] == ["bridge", "portmap"],
          f"10-podvisor.conflist: plugins {[p.get('type') for p in plugins]}, expected bridge, portmap")
    check(net.get("name") and net.get("cniVersion"), "10-podvisor.conflist: name and cniVersion are required")
    bridge = plugins[0] if plugins else {}
    check(bridge.get("bridge") == "podvisor0", "10-podvisor.conflist: bridge must be podvisor0")
    ipam = bridge.get("ipam", {})
    check(ipam.get("type") == "host-local", "10-podvisor.conflist: ipam must be host-local")
    subnets = [r["subnet"] for rs in ipam.get("ranges", []) for r in rs]
    check(subnets == ["10.99.0.0/16"], f"10-podvisor.conflist: subnets {subnets}, expected 10.99.0.0/16")
    for s in subnets:
        ipaddress.ip_network(s)
    check(plugins[-1:] and plugins[-1].get("capabilities", {}).get("portMappings") is True,
          "10-podvisor.conflist: portmap needs capabilities.portMappings")


def check_config():
    """deploy/config.toml is TOML."""
    try:
        tomllib.loads((DEPLOY / "config.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        check(False, f"config.toml: {e}")


def check_objects():
    """deploy/kubernetes/ (the uninstall Job included): the objects refer to each other correctly."""
    objs = {}
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objs[(doc["kind"], doc["metadata"]["name"])] = doc

    def obj(kind, name):
        o = objs.get((kind, name))
        check(o is not None, f"deploy/kubernetes: {kind} {name} missing")
        return o or {}

    ns = obj("Namespace", "podvisor-system")
    for (kind, name), o in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"):
            check(o["metadata"].get("namespace") == "podvisor-system", f"{kind} {name}: namespace")
    check(ns.get("metadata", {}).get("labels", {}).get("pod-security.kubernetes.io/enforce") == "privileged",
          "Namespace podvisor-system: pod-security enforce must be privileged (the installer is)")
    rc = obj("RuntimeClass", "podvisor")
    handler = const("cri-server/src/runtime/mod.rs", "RUNTIME_NAME")
    check(rc.get("handler") == handler, f"RuntimeClass: handler {rc.get('handler')!r}, daemon accepts {handler!r}")
    check(rc.get("scheduling", {}).get("nodeSelector") == RUNTIME_LABEL, "RuntimeClass: nodeSelector")
    native = obj("RuntimeClass", "native")
    native_handler = const("cri-server/src/sandbox/validate.rs", "NATIVE_HANDLER")
    check(native.get("handler") == native_handler,
          f"RuntimeClass native: handler {native.get('handler')!r}, daemon accepts {native_handler!r}")
    check("overhead" not in native, "RuntimeClass native: no VM, no overhead")
    config_toml = obj("ConfigMap", "podvisor-config").get("data", {}).get("config.toml")
    check(config_toml == (DEPLOY / "config.toml").read_text(),
          "ConfigMap podvisor-config: data.config.toml differs from deploy/config.toml")
    obj("ServiceAccount", "podvisor-installer")
    binding = obj("ClusterRoleBinding", "podvisor-installer")
    check(binding.get("subjects") == [{"kind": "ServiceAccount", "name": "podvisor-installer",
                                       "namespace": "podvisor-system"}], "ClusterRoleBinding: subjects")

    containerfile = (DEPLOY / "image/Containerfile").read_text()
    check("COPY . /opt/podvisor/" in containerfile, "Containerfile: the bundle must go to /opt/podvisor/")
    ds = obj("DaemonSet", "podvisor-installer")
    job = obj("Job", "podvisor-uninstall-NODE_NAME")
    images = set()
    for o, what in ((ds, "DaemonSet"), (job, "uninstall Job")):
        if not o:
            continue
        spec = o["spec"]["template"]["spec"]
        c = spec["containers"][0]
        images.add(c["image"])
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        check(spec.get("serviceAccountName") == "podvisor-installer", f"{what}: serviceAccountName")
        check(spec.get("hostPID") is True and c.get("securityContext", {}).get("privileged") is True,
              f"{what}: needs hostPID and privileged (nsenter into the host)")
        check(c["command"][0] == "/opt/podvisor/install.sh", f"{what}: command must be /opt/podvisor/install.sh")
        host = [n for n, v in vols.items() if v.get("hostPath", {}).get("path") == "/"]
        check(host and env.get("HOST_ROOT") == mounts.get(host[0]), f"{what}: HOST_ROOT must be the host / mount")
        check("NODE_NAME" in env, f"{what}: NODE_NAME (label the node)")
    if ds:
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        check(ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(),
              "DaemonSet: selector does not match the template labels")
        check(ds["spec"].get("updateStrategy", {}).get("type") == "OnDelete",
              "DaemonSet: updateStrategy must be OnDelete (a restart ends the node's pod VMs)")
        check(spec.get("nodeSelector") == INSTALL_LABEL, "DaemonSet: nodeSelector")
        # A node whose kubelet uses podvisor runs the installer too (a native pod: hostPID, host /).
        check("podvisor.io/runtime" not in json.dumps(spec.get("affinity", {})),
              "DaemonSet: must not be kept off podvisor nodes (they run host pods natively)")
        check(spec.get("hostPID") is True, "DaemonSet: hostPID (nsenter -t 1)")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        cm = [v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == "podvisor-config"]
        check(cm and env.get("PODVISOR_CONFIG") == f"{mounts.get(cm[0])}/config.toml",
              "DaemonSet: PODVISOR_CONFIG must be config.toml in the ConfigMap mount")
        check(c.get("readinessProbe", {}).get("exec", {}).get("command") == ["/opt/podvisor/install.sh", "status"],
              "DaemonSet: readinessProbe must be install.sh status")
    check(len(images) == 1, f"the DaemonSet and the uninstall Job use different images: {sorted(images)}")


def check_paths():
    """install.sh's paths are the unit's and the daemon's defaults."""
    unit = (DEPLOY / "systemd/podvisor.service").read_text()
    execstart = re.search(r"^ExecStart=(.*)$", unit, re.M)
    config_path = f"{shell_var('CONFIG_DIR')}/config.toml"
    check(execstart and execstart.group(1).split() == [shell_var("BIN"), "--config", config_path],
          f"podvisor.service: ExecStart must be {shell_var('BIN')} --config {config_path} (install.sh's paths)")
    for var, name in (("SOCKET", "SOCKET"), ("RUN_DIR", "RUN_DIR"), ("STATE_DIR", "STATE_DIR"),
                      ("GUEST_DIR", "GUEST_DIR")):
        want = const("cri-server/src/main.rs", name)
        check(shell_var(var) == want, f"install.sh: {var}={shell_var(var)}, the daemon's default is {want}")


def run(section):
    """Runs a section; a file whose structure it does not expect fails the section instead of crashing."""
    try:
        section()
    except (OSError, KeyError, IndexError, TypeError, AttributeError, ValueError, yaml.YAMLError) as e:
        check(False, f"{section.__name__[6:]}: {type(e).__name__} {e} (unexpected file structure)")


run(check_kubelet)
run(check_cni)
run(check_config)
run(check_objects)
run(check_paths)
for e in ERRORS:
    print(f"FAIL check-deploy: {e}")
if not ERRORS:
    print("ok check-deploy: kubelet, crictl, CNI, config and cross-file consistency")
sys.exit(1 if ERRORS else 0)
