"""A node's live figures beyond psutil's (ops/telemetry.py): the parsers and the classifier as tables, and this
machine's status as the agent publishes it."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import msgspec
import pytest

from ops.agent import Offer, node_status, nodes_table
from ops.telemetry import (GpuReading, combine_gpus, interface_kind, network_facts, parse_hardware_ports,
                           parse_ibv_devices, parse_macmon, port_kind, usable_address)
from schemas.cluster import Interface, NodeFacts, NodeStatus

# `ibv_devices` on Linux (rdma-core), with SR-IOV's type column, on macOS 26.2 (RDMA over Thunderbolt), and none.
IBV_LINUX = """    device          	   node GUID
    ------          	----------------
    mlx5_0          	0c42a10300a1b2c3
    mlx5_1          	0c42a10300a1b2c4
"""
IBV_SRIOV = """    device                 node GUID            type
    ------              ----------------        ----
    mlx4_2              00212800013f3126         PF
    mlx4_0              00212d00013f3126         VF
"""
IBV_MACOS = """    device                 node GUID
    ------              ----------------
    rdma_en2            e0c5797d9c8fac05
    rdma_en3            e1c5797d9c8fac05
    rdma_en4            e2c5797d9c8fac05
"""
IBV_NONE = """    device                 node GUID
    ------              ----------------
"""


@pytest.mark.parametrize("text, names", [
    (IBV_LINUX, ["mlx5_0", "mlx5_1"]),
    (IBV_SRIOV, ["mlx4_2", "mlx4_0"]),
    (IBV_MACOS, ["rdma_en2", "rdma_en3", "rdma_en4"]),
    (IBV_NONE, []),
    ("", []),
])
def test_ibv_devices_lists_the_device_names(text, names):
    assert parse_ibv_devices(text) == names


# macmon pipe: 0.4 (gpu_usage: [MHz, ratio]) and 0.6+ (gpu_*_ratio); a Mac that does not report system power.
MACMON_OLD = {"timestamp": "2025-02-24T20:38:15.427569+00:00", "temp": {"cpu_temp_avg": 43.7, "gpu_temp_avg": 36.9},
              "memory": {"ram_total": 25769803776, "ram_usage": 20985479168, "swap_total": 0, "swap_usage": 0},
              "ecpu_usage": [1181, 0.08], "pcpu_usage": [1974, 0.01], "gpu_usage": [461, 0.25], "cpu_power": 0.2,
              "gpu_power": 0.5, "ane_power": 0.0, "all_power": 0.7, "sys_power": 5.875, "ram_power": 0.1}
MACMON_NEW = {"temp": {"cpu_temp_avg": 47.3, "gpu_temp_avg": 52.5}, "gpu_freq_mhz": 1398, "gpu_scaled_ratio": 0.6,
              "gpu_active_ratio": 0.9, "cpu_power": 8.4, "gpu_power": 30.0, "all_power": 38.5, "sys_power": 61.25}
MACMON_NO_SYSTEM = {**MACMON_OLD, "sys_power": 0.0, "temp": {"cpu_temp_avg": 0.0, "gpu_temp_avg": 0.0}}


@pytest.mark.parametrize("text, reading", [
    (json.dumps(MACMON_OLD), GpuReading(25.0, 36.9, 5.875)),
    (json.dumps(MACMON_NEW) + "\n", GpuReading(90.0, 52.5, 61.25)),  # active ratio: NVML's busy share
    (json.dumps(MACMON_NO_SYSTEM), GpuReading(25.0, None, 0.7)),  # no sensor: None, not 0 C; CPU+GPU+ANE power
    ("warming up\n" + json.dumps(MACMON_OLD), GpuReading(25.0, 36.9, 5.875)),
    (json.dumps({"gpu_usage": [461, "busy"], "temp": [], "sys_power": None}), GpuReading()),
    ("", GpuReading()),
    ("not json", GpuReading()),
])
def test_a_macmon_sample_gives_utilisation_temperature_and_power(text, reading):
    assert GpuReading(*(None if v is None else round(v, 6) for v in parse_macmon(text))) == reading


@pytest.mark.parametrize("percents, temperatures, milliwatts, reading", [
    ([10.0, 30.0], [40.0, 71.0], [300_000.0, 450_500.0], GpuReading(20.0, 71.0, 750.5)),
    ([0.0], [35.0], [None], GpuReading(0.0, 35.0, None)),  # idle is 0%; a board without power sensing is None
    ([], [], [], GpuReading()),  # no device
])
def test_nvidia_devices_combine_to_the_nodes_figures(percents, temperatures, milliwatts, reading):
    assert combine_gpus(percents, temperatures, milliwatts) == reading


@pytest.mark.parametrize("name, facts, kind", [
    ("lo", {"loopback": True}, "loopback"),
    ("lo0", {}, "loopback"),
    # Linux, from sysfs
    ("eth0", {"physical": True, "driver": "virtio_net", "arp_type": 1}, "ethernet"),
    ("enp3s0", {"physical": True, "driver": "igc", "arp_type": 1}, "ethernet"),
    ("wlp2s0", {"physical": True, "wireless": True, "driver": "iwlwifi", "arp_type": 1}, "wifi"),
    ("thunderbolt0", {"physical": True, "driver": "thunderbolt-net", "arp_type": 1}, "thunderbolt"),
    ("en05", {"physical": True, "driver": "thunderbolt-net"}, "thunderbolt"),  # renamed by udev
    ("ib0", {"physical": True, "driver": "mlx5_core", "arp_type": 32}, "other"),  # IP over InfiniBand
    ("docker0", {"arp_type": 1}, "other"),
    ("veth12ab", {"arp_type": 1}, "other"),
    ("ifb0", {}, "other"),
    # macOS, from networksetup's hardware ports
    ("en0", {"hardware_port": "Wi-Fi"}, "wifi"),
    ("en0", {"hardware_port": "Ethernet"}, "ethernet"),
    ("en8", {"hardware_port": "USB 10/100/1000 LAN"}, "ethernet"),
    ("en9", {"hardware_port": "Thunderbolt Ethernet Slot 1"}, "ethernet"),  # an Ethernet adapter
    ("bridge0", {"hardware_port": "Thunderbolt Bridge"}, "thunderbolt"),
    ("en2", {"hardware_port": "Thunderbolt 1"}, "thunderbolt"),
    ("en5", {"hardware_port": "Bluetooth PAN"}, "other"),
    ("awdl0", {}, "other"),  # not a hardware port
])
def test_interface_kinds(name, facts, kind):
    assert interface_kind(name, **facts) == kind


def test_port_kinds_do_not_read_wlan_as_lan():
    assert port_kind("WLAN") == "wifi" and port_kind("VLAN 5") == "other" and port_kind("AirPort") == "wifi"


def test_networksetup_hardware_ports_by_device():
    text = """
Hardware Port: Ethernet
Device: en0
Ethernet Address: 3c:a6:f6:00:00:01

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: 36:f1:c3:00:00:02

Hardware Port: Wi-Fi
Device: en1
Ethernet Address: 3c:a6:f6:00:00:03

VLAN Configurations
===================
"""
    assert parse_hardware_ports(text) == {"en0": "Ethernet", "bridge0": "Thunderbolt Bridge", "en1": "Wi-Fi"}


@pytest.mark.parametrize("address, usable", [
    ("192.0.2.2", "192.0.2.2"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("fd00::2", "fd00::2"),
    ("fe80::fc:ff:fe00:1%eth0", None), ("169.254.10.3", None), ("02:fc:00:00:00:01", None),
])
def test_link_local_addresses_are_left_out(address, usable):
    assert usable_address(address) == usable


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").exists()


def test_this_nodes_status_has_its_interfaces_and_no_made_up_gpu_figures(tmp_path):
    status = node_status(tmp_path, ranks=[], offer=Offer())
    by_name = {i.name: i for i in status.interfaces}
    assert by_name["lo"].kind == "loopback" and by_name["lo"].up and "127.0.0.1" in by_name["lo"].addresses
    assert all(not a.startswith("fe80") for i in status.interfaces for a in i.addresses)
    if has_nvidia_gpu():
        assert 0 <= status.gpu_percent <= 100 and status.temperature_c > 0
    else:  # what this machine cannot measure is null, never a made-up zero
        assert status.gpu_percent is None and status.temperature_c is None and status.power_w is None
    decoded = msgspec.json.decode(msgspec.json.encode(status), type=NodeStatus)
    assert decoded == status and isinstance(decoded.interfaces[0], Interface)
    assert network_facts().interfaces is status.interfaces  # kept between reports, not found again every second


def test_a_status_from_an_agent_without_interfaces_still_decodes_and_shows():
    facts = NodeFacts(id="n1", host=socket.gethostname(), memory_total=8 * 10**9, memory_available=4 * 10**9)
    old = msgspec.json.encode({"facts": msgspec.to_builtins(facts), "memory_used": 4 * 10**9, "time": 1000.0})
    status = msgspec.json.decode(old, type=NodeStatus)
    assert status.interfaces == [] and status.rdma_devices == []
    header, row = nodes_table([status], now=1001.0).splitlines()
    assert row[header.index(" NET ") + 1:].split()[0] == "-"  # the cell under NET: reported nothing
    wired = msgspec.structs.replace(status, rdma_devices=["rdma_en2", "rdma_en3"], interfaces=[
        Interface(name="en0", kind="ethernet", up=True), Interface(name="en2", kind="thunderbolt", up=True),
        Interface(name="en3", kind="thunderbolt", up=True), Interface(name="en1", kind="wifi", up=False)])
    assert "eth:1,tb:2,rdma:2" in nodes_table([wired], now=1001.0).splitlines()[1].split()


def test_macmon_on_path_is_run_for_one_short_sample(tmp_path, monkeypatch):
    from ops import telemetry

    fake = tmp_path / "macmon"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\necho '{json.dumps(MACMON_NEW)}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(telemetry.sys, "platform", "darwin")
    monkeypatch.setattr(telemetry, "_macmon", [])  # looked up again, on this PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    assert telemetry.gpu_reading() == GpuReading(MACMON_NEW["gpu_active_ratio"] * 100, 52.5, 61.25)
    assert (tmp_path / "args").read_text().split() == ["pipe", "-s", "1", "-i", str(telemetry.MACMON_SAMPLE_MS)]
    monkeypatch.setattr(telemetry, "_macmon", [])
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert telemetry.gpu_reading() == GpuReading()  # not installed: None, and not looked for again
    assert telemetry._macmon == [None]


def test_thunderbolt_buses_and_rdma_ctl_are_parsed_from_what_macos_prints():
    from ops.telemetry import parse_rdma_ctl, parse_thunderbolt
    from schemas.cluster import ThunderboltPort

    # `system_profiler SPThunderboltDataType -json`, trimmed to its shape: a bus per entry, what is cabled under it.
    profiler = json.dumps({"SPThunderboltDataType": [
        {"_name": "thunderboltusb4_bus_0", "domain_uuid_key": "AAAA-0",
         "receptacle_1_tag": {"receptacle_id_key": "1", "current_speed_key": "Up to 80 Gb/s"},
         "_items": [{"_name": "Mac Studio", "domain_uuid_key": "BBBB-2", "vendor_name_key": "Apple Inc."}]},
        {"_name": "thunderboltusb4_bus_1", "domain_uuid_key": "AAAA-1", "receptacle_1_tag": {"receptacle_id_key": "2"},
         "_items": [{"_name": "CalDigit TS4"}]},  # a dock: no domain of its own
        {"_name": "no bus"}, "garbage"]})
    assert parse_thunderbolt(profiler) == [ThunderboltPort(domain="AAAA-0", peers=["BBBB-2"]),
                                           ThunderboltPort(domain="AAAA-1", peers=[])]
    assert parse_thunderbolt("not json") == [] and parse_thunderbolt("[]") == []
    assert parse_rdma_ctl("RDMA is enabled\n") is True and parse_rdma_ctl("disabled") is False
    assert parse_rdma_ctl(None) is None and parse_rdma_ctl("unknown") is None
