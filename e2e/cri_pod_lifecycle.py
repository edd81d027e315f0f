#!/usr/bin/env python3
"""A pod's life on podvisor, driven by a CRI client we did not write: PyPI container-runtime-interface-api
(Domino Data Lab's `cri_api`: its Images/Containers wrappers and its generated v1 RuntimeService stubs).

Environment: RUNTIME_SOCK (unix:///...), IMAGE (a pullable reference), LOG_DIR (the pod log directory),
METRICS_URL (the daemon's /metrics, read with the Prometheus project's OpenMetrics parser), RUNTIME_HANDLER
(optional: "native" runs the same life as a native pod, on the node without a VM).
Exits non-zero with a message on the first failed check; prints one "ok" line per check.
"""

import os
import socket
import sys
import time

import urllib.request

import grpc
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, WSClient, create_websocket, get_websocket_url
from cri_api.channel import Channel
from cri_api.containers import Containers
from cri_api.exceptions import ContainerServiceException
from cri_api.images import Images
from cri_api.v1 import api_pb2 as cri
from cri_api.v1.api_pb2_grpc import RuntimeServiceStub

SOCK = os.environ["RUNTIME_SOCK"]
IMAGE = os.environ["IMAGE"]
LOG_DIR = os.environ["LOG_DIR"]
METRICS_URL = os.environ["METRICS_URL"]
HANDLER = os.environ.get("RUNTIME_HANDLER", "")
NATIVE = HANDLER == "native"


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def expect_code(call, code, field=None):
    try:
        call()
    except grpc.RpcError as e:
        msg = e.details() or ""
        check(e.code() == code and (field is None or field in msg), f"{code.name} {field or ''}: {msg}")
        return
    check(False, f"expected {code.name}")


def scrape():
    """The daemon's metrics as {(sample name, frozenset of labels): value}."""
    with urllib.request.urlopen(METRICS_URL, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def main():
    channel = Channel(SOCK)
    # grpc-core (Python, C++, Java) sends the socket path as HTTP/2 :authority on unix sockets; tonic's
    # HTTP/2 layer (h2) rejects that as malformed (RST_STREAM PROTOCOL_ERROR). kubelet and crictl
    # (grpc-go) send "localhost", which this option makes grpc-core send too.
    channel.channel = grpc.insecure_channel(SOCK, options=[("grpc.default_authority", "localhost")])
    runtime = RuntimeServiceStub(channel.channel)
    version = runtime.Version(cri.VersionRequest())
    check(version.runtime_name == "podvisor" and version.runtime_api_version == "v1", f"version {version.runtime_name}")
    check(channel.version == "v1", "the client negotiates CRI v1")

    images = Images(channel)
    images.pull_image(IMAGE)
    check(images.get_image(IMAGE) is not None, "image pulled and listed")

    # What a minimal client relies on: idempotent stops, the runtime handlers, bad configs refused
    # at once (before any VM boots) with the field named.
    runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="f" * 64))
    runtime.StopContainer(cri.StopContainerRequest(container_id="f" * 64))
    check(True, "StopPodSandbox and StopContainer of unknown ids succeed")
    handlers = [h.name for h in runtime.Status(cri.StatusRequest()).runtime_handlers]
    check(handlers == ["", "podvisor", "native"], f"runtime handlers {handlers}")
    start = time.monotonic()
    expect_code(lambda: runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="bad"),
        dns_config=cri.DNSConfig(servers=["not-an-ip"])))),
        grpc.StatusCode.INVALID_ARGUMENT, "config.dns_config.servers[0]")
    check(time.monotonic() - start < 30, "refused before any VM boot")

    # No hostname, as crictl and critest send: the pod gets the node's (containerd's default).
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="py-pod", uid="py-uid", namespace="py", attempt=0),
        log_directory=LOG_DIR,
        labels={"client": "python"},
    )
    start = time.monotonic()
    pod = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config, runtime_handler=HANDLER)).pod_sandbox_id
    print(f"RunPodSandbox: {time.monotonic() - start:.1f} s", flush=True)
    status = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    check(status.state == cri.SANDBOX_READY and status.metadata.name == "py-pod", "pod ready")
    listed = runtime.ListPodSandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(label_selector={"client": "python"}))).items
    check([p.id for p in listed] == [pod], "ListPodSandbox by label")

    def container(name, args):
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=IMAGE),
            command=args,
            log_path=f"{name}.log",
        )

    expect_code(lambda: runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=container("", ["true"]), sandbox_config=pod_config)),
        grpc.StatusCode.INVALID_ARGUMENT, "config.metadata.name")
    cid = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=container("app", ["sh", "-c",
            "echo from-python; while true; do echo pong | nc -l -p 8080; done"]),
        sandbox_config=pod_config)).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=cid))

    containers = Containers(channel)
    running = containers.list_containers({"state": {"state": "CONTAINER_RUNNING"}})
    check([c["id"] for c in running] == [cid], "the wrapper lists the running container")
    check(containers.get_container(cid)["metadata"]["name"] == "app", "the wrapper reads its status")

    out = runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo $((1+2)); exit 4"], timeout=120))
    check(out.stdout == b"3\n" and out.exit_code == 4, f"ExecSync stdout {out.stdout!r} exit {out.exit_code}")
    out = runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=120))
    node = socket.gethostname()
    check(out.stdout.decode().strip() == node, f"the node's hostname {node!r}: {out.stdout!r}")
    st = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    check(st.log_path == os.path.join(LOG_DIR, "app.log"), f"absolute log path {st.log_path!r}")

    # Streaming exec through the URL from Exec, with the Kubernetes Python client's WebSocket code.
    url = runtime.Exec(cri.ExecRequest(container_id=cid, cmd=["sh", "-c", "read x; echo got-$x; echo e >&2; exit 6"],
                                       stdin=True, stdout=True, stderr=True)).url
    ws = WSClient(Configuration(), get_websocket_url(url), None, capture_all=True)
    ws.write_stdin("hi\n")
    ws.close_channel(0)
    ws.run_forever(timeout=180)
    out, err = ws.read_channel(1), ws.read_channel(2)
    check(out == "got-hi\n" and err == "e\n" and ws.returncode == 6,
          f"streaming exec over {ws.subprotocol}: {out!r} {err!r} exit {ws.returncode}")

    # Port-forward to the container's listener on the pod's loopback.
    url = runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod, port=[8080])).url
    pf = PortForward(create_websocket(Configuration(), get_websocket_url(url + "?port=8080"),
                                      {"sec-websocket-protocol": "v4.channel.k8s.io"}), [8080])
    sock = pf.socket(8080)
    sock.settimeout(1)
    got = b""
    deadline = time.monotonic() + 60
    while b"pong" not in got and time.monotonic() < deadline:
        try:
            data = sock.recv(1024)
            if not data:
                break
            got += data
        except OSError:
            pass
    error = pf.error(8080)
    check(got == b"pong\n" and error is None, f"port-forward read {got!r}, error {error!r}")
    pf.close()

    # Attach to a second container's main process: stdin in, stdout out.
    echo_config = container("echoer", ["sh", "-c", "while read l; do echo echo-$l; done"])
    echo_config.stdin = True
    echoer = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=echo_config, sandbox_config=pod_config)).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=echoer))
    url = runtime.Attach(cri.AttachRequest(container_id=echoer, stdin=True, stdout=True)).url
    ws = WSClient(Configuration(), get_websocket_url(url), None, capture_all=True)
    ws.write_stdin("attached\n")
    out = ""
    deadline = time.monotonic() + 60
    while "echo-attached" not in out and time.monotonic() < deadline:
        ws.update(timeout=1)
        out += ws.read_channel(1)
    ws.close()
    check(out == "echo-attached\n", f"attach: {out!r}")
    runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=echoer))

    log_path = os.path.join(LOG_DIR, "app.log")
    deadline = time.monotonic() + 60
    log = ""
    while time.monotonic() < deadline and "stdout F from-python" not in log:
        time.sleep(0.5)
        log = open(log_path).read() if os.path.exists(log_path) else ""
    check("stdout F from-python" in log, f"CRI log line: {log!r}")

    stats = runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats
    check(stats.memory.working_set_bytes.value > 0, "ContainerStats memory")

    m = scrape()
    check(metric(m, "podvisor_pods", state="ready") == 1, "metrics: one ready pod")
    check(metric(m, "podvisor_containers", state="running") >= 1, "metrics: a running container")
    boots = 0 if NATIVE else 1
    check(metric(m, "podvisor_vm_boots_total", result="ok") == boots, f"metrics: {boots} VM boot")
    boot = metric(m, "podvisor_vm_boot_duration_seconds_sum")
    check(metric(m, "podvisor_vm_boot_duration_seconds_count") == boots and (boot > 0) == (boots > 0),
          f"metrics: VM boot took {boot:.1f} s")
    check(metric(m, "podvisor_cri_requests_total", method="RunPodSandbox", code="OK") == 1,
          "metrics: RunPodSandbox counted")
    check(metric(m, "podvisor_image_pulls_total", result="ok") >= 1, "metrics: the pull counted")
    expect_code(lambda: runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=cid, linux=cri.LinuxContainerResources(cpu_quota=-1))),
        grpc.StatusCode.INVALID_ARGUMENT, "cpu_quota")
    expect_code(lambda: runtime.ContainerStatus(cri.ContainerStatusRequest(container_id="f" * 64)),
                grpc.StatusCode.NOT_FOUND)
    try:
        containers.get_container("f" * 64)
        check(False, "the wrapper reports an unknown container")
    except ContainerServiceException as e:
        check(e.status_code == grpc.StatusCode.NOT_FOUND, f"the wrapper reports NOT_FOUND: {e}")

    runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1))
    st = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    check(st.state == cri.CONTAINER_EXITED and st.exit_code == 137, f"stopped: exit {st.exit_code} {st.reason}")
    containers.remove_container(cid)
    check(containers.list_containers() == [], "the wrapper removed the container")

    runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    check(len(runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == 0, "pod removed (twice)")
    images.remove_image(IMAGE)
    check(images.get_image(IMAGE) is None, "image removable once no container leases it")
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
