"""Shared pieces of the benchmarks: synthetic document pages and JSON output. Benchmarks print JSON, never assert."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import platform
import re
import socket
import sys
from pathlib import Path

from PIL import Image, ImageDraw

LINES = [
    "INVOICE No. 2024-0117        Date: 12 March 2024",
    "Customer: Northwind Traders, 42 Harbour Road, Springfield",
    "Item                 Quantity   Unit price     Total",
    "Paper, A4, 80 g            10         4.50     45.00",
    "Toner cartridge             2        61.00    122.00",
    "Subtotal 167.00     Tax 20% 33.40     Amount due 200.40",
]


def document_page(width: int = 1344, height: int = 1344, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A white page with lines of text; `seed` shifts the content so pages differ (no feature-cache hits)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    y = 40 + (seed * 7) % 60
    for i in range(height // 40 - 2):
        d.text((40 + (seed * 13 + i * 5) % 50, y), f"{seed:04d} " + LINES[(i + seed) % len(LINES)], fill="black")
        y += 36
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def emit(result: dict, out: str | None = None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.flush()


# ---- processes (Linux /proc; no psutil here) -------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie holds no memory or ports; its parent has not reaped it yet
        return None
    return int(fields[1]), int(fields[2])


def live_pids() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None:
                out[int(name)] = stat
    return out


def process_tree(root: int) -> set[int]:
    """root and every live descendant of it, plus every process in root's process group."""
    procs = live_pids()
    group = procs.get(root, (0, root))[1]
    tree, grew = {root} & set(procs), True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        grew = bool(new)
        tree |= new
    return tree | {pid for pid, (_, pgid) in procs.items() if pgid == group}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _status_bytes(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The given kB fields of /proc/<pid>/status, in bytes; {} if the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (VmRSS), 0 if it is gone."""
    return _status_bytes(pid, ("VmRSS",)).get("VmRSS", 0)


def reset_peak_rss(pid: int) -> None:
    """Start a new peak: the kernel sets VmHWM back to the current RSS when "5" is written to clear_refs."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size since the process started or since `reset_peak_rss` (VmHWM), 0 if it is gone."""
    return _status_bytes(pid, ("VmHWM",)).get("VmHWM", 0)


def rss_parts(pid: int) -> dict[str, int]:
    """VmRSS split as the kernel counts it: RssAnon (the process's own heap), RssFile (mapped files, libraries) and
    RssShmem (shared memory: for a Ray worker, the pages of the object store it has touched)."""
    return _status_bytes(pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem"))


def serve_replica_pids(deployment: str, app: str | None = None) -> list[int]:
    """PIDs of the Ray Serve replica processes of a deployment. Ray titles an idle replica
    `ray::ServeReplica:<app>:<dep>` and one running a call `ray::ServeReplica:<app>:<dep>.<method>`."""
    title = re.compile(rf"ray::ServeReplica:{re.escape(app) if app else '[^:]+'}:{re.escape(deployment)}(\.\w+)?")
    return sorted(pid for pid in live_pids() if title.fullmatch(cmdline(pid).split(" ", 1)[0]))


def _socket_table(pid: int, proto: str) -> dict[int, tuple[str, int, str]]:
    """inode -> (address, port, state hex) of /proc/<pid>/net/<proto> (the process's network namespace)."""
    out = {}
    try:
        with open(f"/proc/{pid}/net/{proto}") as f:
            next(f)
            for line in f:
                fields = line.split()
                addr, port = fields[1].rsplit(":", 1)
                raw = bytes.fromhex(addr)
                # the kernel prints each 32-bit word of the address in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(words)
                ip = str(getattr(ip, "ipv4_mapped", None) or ip)  # ::ffff:127.0.0.1 is an IPv4 socket's address
                out[int(fields[9])] = (ip, int(port, 16), fields[3])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def listening_sockets(pids) -> dict[int, list[tuple[str, str, int]]]:
    """pid -> [(protocol, address, port)] for every TCP socket listening and every UDP socket bound, of those
    processes (their /proc/<pid>/fd links matched to /proc/<pid>/net/{tcp,tcp6,udp,udp6} by inode)."""
    out = {}
    for pid in pids:
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found = []
        for proto, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
            for inode, (ip, port, st) in _socket_table(pid, proto).items():
                if inode in inodes and st == state and port:
                    found.append((proto, ip, port))
        if found:
            out[pid] = sorted(found)
    return out


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
