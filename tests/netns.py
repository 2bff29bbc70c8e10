"""Hosts as Linux network namespaces on this machine, joined by a bridge.

Every address lives inside the namespaces this creates (a private /24 picked
per run), so nothing a test sends leaves them; they are deleted on exit.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from scripts.stack import ensure_debian_package


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def can_make_namespaces() -> str | None:
    """None when this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    ensure_debian_package("ip", "iproute2", "")
    probe = f"es-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.decode(errors='replace').strip()}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def hosts(*names: str) -> Iterator[dict[str, Host]]:
    """A namespace per name on one bridge (in the first), each with an address."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
    made: list[str] = []
    try:
        hub = f"es-{names[0]}-{tag}"
        for name in names:
            namespace = f"es-{name}-{tag}"
            _ip("netns", "add", namespace)
            made.append(namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{subnet}.1/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        result = {names[0]: Host(hub, f"{subnet}.1")}
        for i, name in enumerate(names[1:], start=2):
            namespace = f"es-{name}-{tag}"
            inner, outer = f"v{i}-{tag}"[:15], f"b{i}-{tag}"[:15]
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", outer, "netns", hub)
            _ip("-n", hub, "link", "set", outer, "master", "br0")
            _ip("-n", hub, "link", "set", outer, "up")
            _ip("-n", namespace, "addr", "add", f"{subnet}.{i}/24", "dev", inner)
            _ip("-n", namespace, "link", "set", inner, "up")
            result[name] = Host(namespace, f"{subnet}.{i}")
        yield result
    finally:
        for namespace in reversed(made):  # their interfaces go with them
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
