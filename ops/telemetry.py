"""Live figures of this node beyond psutil's: the GPU's utilisation, temperature and power, its network
interfaces by kind, and its RDMA devices. The node agent (ops/agent.py) reads them every second.

GPU: on macOS `macmon pipe` when macmon is on PATH (sudoless; one sample of MACMON_SAMPLE_MS per reading);
elsewhere NVML (nvidia-ml-py, the `cuda` extra), initialised once. Utilisation is the GPUs' mean busy share,
temperature the hottest GPU's, power macmon's whole system (else CPU + GPU + ANE) or the sum of the NVIDIA
GPUs'. A figure the platform cannot give is None, never 0: no macmon, no NVML, no device, a device that does
not report it, or a reader that failed. The readers never raise; a failure is logged once.

Network: psutil's interfaces, each classified by `interface_kind` from facts the platform gives (Linux: sysfs;
macOS: the hardware ports `networksetup` lists). RDMA: the devices `ibv_devices` lists (Linux also: sysfs).
Thunderbolt (macOS): each bus's domain UUID and those of the buses cabled to it, from `system_profiler
SPThunderboltDataType -json` (EXO reads the same), and whether `rdma_ctl status` says RDMA is enabled: from these
the controller derives which nodes are cabled to which, and over RDMA (ops/placement.py: links_between).
Discovery spawns processes and reads files, so `network_facts` keeps its answer for NETWORK_REFRESH_S.
The parsers and the classifier are pure functions, tested without the platform (tests/test_telemetry.py).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from schemas.cluster import Interface, InterfaceKind, ThunderboltPort

log = logging.getLogger("conclave.telemetry")
MACMON_SAMPLE_MS = 200  # one sample's window: the agent reports every second
MACMON_TIMEOUT_S = 0.5  # the sample and macmon's start; past it the reading is None
COMMAND_TIMEOUT_S = 2.0  # networksetup, ibv_devices (every NETWORK_REFRESH_S)
NETWORK_REFRESH_S = 30.0
ETHERNET_ARP_TYPE = 1  # /sys/class/net/<name>/type: ARPHRD_ETHER (InfiniBand is 32)
THUNDERBOLT_DRIVERS = {"thunderbolt-net", "thunderbolt"}


class GpuReading(NamedTuple):
    gpu_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


_logged: set[str] = set()


def _once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log `message` the first time `key` fails: a reader runs every second."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


# --- GPU ---------------------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _positive(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None  # macmon says 0 for a sensor it lacks


def parse_macmon(text: str) -> GpuReading:
    """The last JSON sample of `macmon pipe`. Newer macmon gives `gpu_active_ratio` (busy share, 0-1, as
    NVML's utilisation), older `gpu_usage: [MHz, ratio]`; `sys_power` is 0 where the Mac does not report the
    whole system's, then `all_power` (CPU + GPU + ANE) stands in."""
    sample: dict = {}
    for line in reversed(text.strip().splitlines()):
        try:
            if isinstance(parsed := json.loads(line), dict):
                sample = parsed
                break
        except ValueError:
            continue
    ratio = _number(sample.get("gpu_active_ratio"))
    usage = sample.get("gpu_usage")
    if ratio is None and isinstance(usage, list) and len(usage) == 2:
        ratio = _number(usage[1])
    if ratio is None:
        ratio = _number(sample.get("gpu_scaled_ratio"))
    temperatures = sample.get("temp") if isinstance(sample.get("temp"), dict) else {}
    power = _positive(sample.get("sys_power"))
    return GpuReading(gpu_percent=None if ratio is None else min(max(ratio, 0.0), 1.0) * 100,
                      temperature_c=_positive(temperatures.get("gpu_temp_avg")),
                      power_w=power if power is not None else _number(sample.get("all_power")))


_macmon: list[str | None] = []  # [path or None] once looked up: installing macmon later needs a restart


def _macmon_reading() -> GpuReading:
    if not _macmon:
        _macmon.append(shutil.which("macmon"))
        if _macmon[0] is None:
            _once("macmon", "macmon is not on PATH: GPU utilisation, temperature and power are not measured "
                  "(brew install macmon)", level=logging.INFO)
    if (path := _macmon[0]) is None:
        return GpuReading()
    try:
        done = subprocess.run([path, "pipe", "-s", "1", "-i", str(MACMON_SAMPLE_MS)], capture_output=True,
                              text=True, timeout=MACMON_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        _once("macmon-run", "macmon gave no sample (%s); GPU figures are None meanwhile", exc)
        return GpuReading()
    if done.returncode != 0:
        _once("macmon-exit", "macmon exited %s: %s", done.returncode, done.stderr.strip()[:200])
        return GpuReading()
    return parse_macmon(done.stdout)


_nvml_lock = threading.Lock()
_nvml: list[list] = []  # [device handles] once NVML was tried ([[]] when it has none or failed)


def _nvml_handles() -> list:
    with _nvml_lock:
        if not _nvml:
            handles: list = []
            try:
                import pynvml

                pynvml.nvmlInit()  # once for the process: never shut down
                handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            except ImportError:
                _once("nvml", "nvidia-ml-py is not installed: no GPU figures", level=logging.DEBUG)
            except Exception as exc:  # pynvml.NVMLError: no driver, no library, no device
                _once("nvml", "NVML is not available (%s): no GPU figures", exc, level=logging.DEBUG)
            _nvml.append(handles)
        return _nvml[0]


def combine_gpus(percents: list[float | None], temperatures: list[float | None],
                 milliwatts: list[float | None]) -> GpuReading:
    """Per-device figures to the node's: mean utilisation, hottest temperature, summed power; a figure only
    when every device gave it (a partial sum would be a made-up number)."""
    def whole(values: list[float | None]) -> list[float] | None:
        return [v for v in values if v is not None] if values and None not in values else None

    busy, hot, power = whole(percents), whole(temperatures), whole(milliwatts)
    return GpuReading(gpu_percent=None if busy is None else sum(busy) / len(busy),
                      temperature_c=None if hot is None else max(hot),
                      power_w=None if power is None else sum(power) / 1000)


def _nvml_reading() -> GpuReading:
    if not (handles := _nvml_handles()):
        return GpuReading()
    import pynvml

    def read(what: str, get) -> list[float | None]:
        values: list[float | None] = []
        for handle in handles:
            try:
                values.append(float(get(handle)))
            except Exception as exc:  # NVMLError_NotSupported (power on some boards), a GPU lost
                _once(f"nvml-{what}", "NVML gives no %s (%s)", what, exc, level=logging.DEBUG)
                values.append(None)
        return values

    return combine_gpus(read("utilisation", lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                        read("temperature", lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                        read("power", pynvml.nvmlDeviceGetPowerUsage))


def gpu_reading() -> GpuReading:
    """This node's GPU figures now (macmon on macOS, NVML elsewhere); None for each it cannot give."""
    try:
        return _macmon_reading() if sys.platform == "darwin" else _nvml_reading()
    except Exception as exc:  # never take the agent's report down
        _once("gpu", "could not read the GPU's figures: %s", exc)
        return GpuReading()


# --- Network -----------------------------------------------------------------------------------------------

def port_kind(port: str) -> InterfaceKind:
    """A macOS hardware port's kind. "Thunderbolt Ethernet Slot 1" is an Ethernet adapter; "Thunderbolt
    Bridge" and "Thunderbolt 1" are IP over Thunderbolt."""
    words = port.lower()
    if "ethernet" in words or re.search(r"\blan\b", words):
        return "ethernet"
    if "thunderbolt" in words:
        return "thunderbolt"
    if "wi-fi" in words or "wifi" in words or "airport" in words or "wlan" in words:
        return "wifi"
    return "other"  # Bluetooth PAN, iPhone USB, a VPN


def interface_kind(name: str, *, loopback: bool = False, hardware_port: str | None = None,
                   wireless: bool = False, driver: str | None = None, physical: bool = False,
                   arp_type: int | None = None) -> InterfaceKind:
    """An interface's kind from what its platform says of it: `hardware_port` (macOS, networksetup);
    `wireless` (Linux: /sys/class/net/NAME/wireless), `driver` (the name of its device's driver), `physical`
    (it has a device: not a veth, bridge or tunnel), `arp_type` (/sys/class/net/NAME/type)."""
    if loopback or name in ("lo", "lo0"):
        return "loopback"
    if hardware_port is not None:
        return port_kind(hardware_port)
    if driver in THUNDERBOLT_DRIVERS or name.startswith("thunderbolt"):  # Linux thunderbolt-net: thunderbolt0
        return "thunderbolt"
    if wireless:
        return "wifi"
    if physical and arp_type in (None, ETHERNET_ARP_TYPE):
        return "ethernet"
    return "other"  # IPoIB, CAN, a virtual interface, or a macOS one networksetup does not list


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports`: device name -> hardware port ("en0" -> "Wi-Fi")."""
    ports, port = {}, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Hardware Port":
            port = value.strip()
        elif key.strip() == "Device" and port is not None:
            ports[value.strip()] = port
            port = None
    return ports


def _run(command: list[str]) -> str | None:
    """The command's output, or None when it is not on PATH or failed."""
    if (path := shutil.which(command[0])) is None:
        return None
    try:
        done = subprocess.run([path, *command[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        _once(command[0], "%s failed: %s", command[0], exc)
        return None
    return done.stdout if done.returncode == 0 else None


def _linux_facts(name: str) -> dict[str, Any]:
    base = Path("/sys/class/net") / name
    try:
        driver: str | None = os.path.basename(os.readlink(base / "device" / "driver"))
    except OSError:
        driver = None
    try:
        arp_type: int | None = int((base / "type").read_text())
    except (OSError, ValueError):
        arp_type = None
    return {"wireless": (base / "wireless").exists() or (base / "phy80211").exists(), "driver": driver,
            "physical": (base / "device").exists(), "arp_type": arp_type}


def usable_address(address: str) -> str | None:
    """An address without its zone ("%eth0"), or None for a link-local one (it names no route between
    nodes) or not an IP address."""
    address = address.split("%", 1)[0]
    try:
        return None if ipaddress.ip_address(address).is_link_local else address
    except ValueError:
        return None


def network_interfaces() -> list[Interface]:
    """This node's network interfaces by name, each with its kind, IP addresses, speed and state."""
    import psutil

    addresses, stats = psutil.net_if_addrs(), psutil.net_if_stats()
    ports = parse_hardware_ports(_run(["networksetup", "-listallhardwareports"]) or "") \
        if sys.platform == "darwin" else {}
    interfaces = []
    for name in sorted(set(addresses) | set(stats)):
        stat = stats.get(name)
        flags = (getattr(stat, "flags", "") or "").split(",")  # psutil >= 5.9.3
        facts = _linux_facts(name) if sys.platform.startswith("linux") else {}
        ips = [usable_address(a.address) for a in addresses.get(name, [])
               if a.family in (socket.AF_INET, socket.AF_INET6)]
        interfaces.append(Interface(
            name=name, kind=interface_kind(name, loopback="loopback" in flags, hardware_port=ports.get(name), **facts),
            addresses=[ip for ip in ips if ip], speed_mbps=(stat.speed or None) if stat else None,
            up=bool(stat and stat.isup)))
    return interfaces


def parse_ibv_devices(text: str) -> list[str]:
    """The device names of `ibv_devices`' table (a header line, a line of dashes, one device a line)."""
    names = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] != "device" and not set(fields[0]) <= {"-"}:
            names.append(fields[0])
    return names


def rdma_devices() -> list[str]:
    """RDMA devices (Mellanox/RoCE on Linux, RDMA over Thunderbolt on macOS 26.2+); [] when none."""
    names = parse_ibv_devices(_run(["ibv_devices"]) or "")
    if not names and sys.platform.startswith("linux"):
        try:
            names = sorted(os.listdir("/sys/class/infiniband"))
        except OSError:
            pass
    return names


def parse_thunderbolt(text: str) -> list[ThunderboltPort]:
    """This Mac's Thunderbolt buses from `system_profiler SPThunderboltDataType -json`: each bus (an entry with a
    `domain_uuid_key`) and the domain UUIDs of the items under it, which are what is cabled there (another Mac's
    bus when two are connected directly)."""
    try:
        buses = json.loads(text).get("SPThunderboltDataType", [])
    except (ValueError, AttributeError):
        return []
    ports = []
    for bus in buses if isinstance(buses, list) else []:
        if not isinstance(bus, dict) or not isinstance(bus.get("domain_uuid_key"), str):
            continue
        items = bus.get("_items") if isinstance(bus.get("_items"), list) else []
        peers = [item["domain_uuid_key"] for item in items
                 if isinstance(item, dict) and isinstance(item.get("domain_uuid_key"), str)]
        ports.append(ThunderboltPort(domain=bus["domain_uuid_key"], peers=peers))
    return ports


def parse_rdma_ctl(text: str | None) -> bool | None:
    """`rdma_ctl status`: True when it says enabled, False when disabled, None when it is not there or says
    neither."""
    said = (text or "").strip().lower()
    return False if "disabled" in said else True if "enabled" in said else None


def thunderbolt_facts() -> tuple[list[ThunderboltPort], bool | None]:
    """macOS only (no other platform runs jaccl over Thunderbolt); ([], None) elsewhere."""
    if sys.platform != "darwin":
        return [], None
    return (parse_thunderbolt(_run(["system_profiler", "SPThunderboltDataType", "-json"]) or "{}"),
            parse_rdma_ctl(_run(["rdma_ctl", "status"])))


class Network(NamedTuple):
    interfaces: list[Interface]
    rdma: list[str]
    thunderbolt: list[ThunderboltPort]
    rdma_enabled: bool | None


_network_lock = threading.Lock()
_network: dict[str, Any] = {}


def network_facts(now: float | None = None) -> Network:
    """The interfaces, RDMA devices and Thunderbolt buses, found again when older than NETWORK_REFRESH_S; empty
    when discovery failed."""
    now = time.monotonic() if now is None else now
    with _network_lock:
        if not _network or now - _network["at"] >= NETWORK_REFRESH_S:
            try:
                interfaces = network_interfaces()
            except Exception as exc:
                _once("interfaces", "could not list the network interfaces: %s", exc)
                interfaces = []
            try:
                rdma = rdma_devices()
            except Exception as exc:
                _once("rdma", "could not list the RDMA devices: %s", exc)
                rdma = []
            try:
                thunderbolt, rdma_enabled = thunderbolt_facts()
            except Exception as exc:
                _once("thunderbolt", "could not read the Thunderbolt buses: %s", exc)
                thunderbolt, rdma_enabled = [], None
            _network.update(at=now, found=Network(interfaces, rdma, thunderbolt, rdma_enabled))
        return _network["found"]
