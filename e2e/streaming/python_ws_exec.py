#!/usr/bin/env python3
"""Drive podvisor's streaming server with the Python `kubernetes` client's WebSocket code.

Usage: python_ws_exec.py EXEC_ECHO_0_URL EXEC_ECHO_5_URL PORTFORWARD_URL

The URLs come from the Rust test `streaming::tests::python::python_kubernetes_ws_client`,
whose test backend's `echo N` exec echoes stdin to stdout, writes "stderr-line\\n" to
stderr and exits N; its port-forward answers every chunk with "<port>:<chunk>".
"""
import sys
import time

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import (
    PortForward,
    WSClient,
    create_websocket,
    get_websocket_url,
)


def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)
    print("ok:", what)


def main():
    ok_url, fail_url, pf_url = sys.argv[1:4]
    cfg = Configuration()

    # exec with stdin; the client offers v5 then v4 and closes stdin with the v5 signal.
    c = WSClient(cfg, get_websocket_url(ok_url), None, capture_all=True)
    check(c.subprotocol == "v5.channel.k8s.io", "negotiated v5.channel.k8s.io")
    c.write_stdin("hello from python\n")
    c.close_channel(0)
    c.run_forever(timeout=10)
    check(not c.is_open(), "server closed the session")
    check(c.read_channel(1) == "hello from python\n", "stdout echoed")
    check(c.read_channel(2) == "stderr-line\n", "stderr separate")
    check(c.returncode == 0, "exit code 0")

    # exec without stdin on the v4 protocol; non-zero exit code.
    c = WSClient(
        cfg,
        get_websocket_url(fail_url),
        {"sec-websocket-protocol": "v4.channel.k8s.io"},
        capture_all=True,
    )
    check(c.subprotocol == "v4.channel.k8s.io", "negotiated v4.channel.k8s.io")
    c.run_forever(timeout=10)
    check(c.read_channel(2) == "stderr-line\n", "stderr on v4")
    check(c.returncode == 5, "exit code 5 (got %r)" % c._returncode)

    # port forward on two ports (kubelet's form: ports in the `port` query parameter).
    ws = create_websocket(
        cfg,
        get_websocket_url(pf_url + "?port=80&port=81"),
        {"sec-websocket-protocol": "v4.channel.k8s.io"},
    )
    pf = PortForward(ws, [80, 81])
    for port in (80, 81):
        s = pf.socket(port)
        s.sendall(b"ping%d" % port)
        want = b"%d:ping%d" % (port, port)
        got = b""
        deadline = time.time() + 10
        s.settimeout(1)
        while len(got) < len(want) and time.time() < deadline:
            try:
                got += s.recv(1024)
            except OSError:
                pass
        check(got == want, "port %d echoed (%r)" % (port, got))
        check(pf.error(port) is None, "no error on port %d" % port)
    pf.close()
    print("ALL OK")


if __name__ == "__main__":
    main()
