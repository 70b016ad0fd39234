"""`conclave service install` writes a unit or agent that runs this Python's `conclave serve` with the flags."""

from __future__ import annotations

import plistlib
import shlex
import subprocess
import sys


def install(tmp_path, platform: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(tmp_path / "home"), "service", "install",
                           "--platform", platform, "--dir", str(tmp_path / platform), "--serve-flags",
                           shlex.join(flags)],
                          capture_output=True, text=True, timeout=60)


def test_a_systemd_unit_and_a_launchd_agent_run_serve_with_the_flags(tmp_path):
    flags = ("--port", "8100", "--api-key-file", "/etc/conclave/keys")
    done = install(tmp_path, "systemd", *flags)
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "systemd" / "conclave.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == [
        sys.executable, "-m", "ops.cli", "--home", str((tmp_path / "home").resolve()), "serve", *flags]
    assert "Restart=always" in unit and "WantedBy=default.target" in unit and "systemctl --user" in done.stdout

    done = install(tmp_path, "launchd", *flags)
    assert done.returncode == 0, done.stderr
    agent = plistlib.loads((tmp_path / "launchd" / "org.conclave.serve.plist").read_bytes())
    assert agent["ProgramArguments"][-len(flags) - 1:] == ["serve", *flags]
    assert agent["RunAtLoad"] and agent["KeepAlive"] and "launchctl bootstrap" in done.stdout


def test_a_node_gets_a_join_unit_without_its_token(tmp_path):
    def join_unit(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(tmp_path / "home"), "service", "install",
                               "--platform", "systemd", "--dir", str(tmp_path / "units"), "--join-flags",
                               shlex.join(flags)], capture_output=True, text=True, timeout=60)

    done = join_unit("10.0.0.1", "--port", "8000")
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "units" / "conclave-join.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart="))[-4:] == ["join", "10.0.0.1", "--port", "8000"]
    assert "enable --now conclave-join" in done.stdout
    refused = join_unit("10.0.0.1", "--token", "cj1.secret")
    assert refused.returncode != 0 and "leave --token out" in refused.stderr
    assert "cj1.secret" not in (tmp_path / "units" / "conclave-join.service").read_text()
