"""`conclave service install`: a node that comes back by itself after a reboot.

Writes a systemd unit (Linux) or a launchd agent (macOS) that runs `conclave serve` (the first machine) or
`conclave join` (every other node: it rejoins with what it kept, no token needed) with the given flags, this
Python and this home, restarted whenever it exits. It writes the file and says how to enable it; it does
not enable it (that is the operator's step, with the platform's own tool). Secrets stay out of it: API keys
go in `--api-key-file`, which the unit names, and NATS credentials are the home's files.
"""

from __future__ import annotations

import plistlib
import shlex
import sys
from pathlib import Path

def command_argv(home: Path, command: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "ops.cli", "--home", str(Path(home).resolve()), command, *flags]


def systemd_unit(argv: list[str], workdir: Path) -> str:
    # Restart=always with a pause: serve already restarts its own children; this covers serve itself and boots.
    return (f"[Unit]\nDescription=Conclave: private LLM serving (conclave {argv[5]})\nAfter=network-online.target\n"
            f"Wants=network-online.target\n\n[Service]\nType=simple\nWorkingDirectory={workdir}\n"
            f"ExecStart={shlex.join(argv)}\nRestart=always\nRestartSec=5\nKillSignal=SIGTERM\nTimeoutStopSec=90\n\n"
            f"[Install]\nWantedBy=default.target\n")


def launchd_agent(argv: list[str], workdir: Path, logs: Path, label: str) -> bytes:
    log = str(logs / f"{argv[5]}.log")
    return plistlib.dumps({"Label": label, "ProgramArguments": argv, "WorkingDirectory": str(workdir),
                           "RunAtLoad": True, "KeepAlive": True, "ExitTimeOut": 90,
                           "StandardOutPath": log, "StandardErrorPath": log})


def install(home: Path, flags: list[str], platform: str, directory: Path | None, command: str = "serve"
            ) -> tuple[Path, str]:
    """Write the unit or agent for `conclave COMMAND FLAGS`; returns its path and the command that enables it."""
    argv, workdir = command_argv(home, command, flags), Path(__file__).resolve().parents[1]
    if platform == "launchd":
        label = f"org.conclave.{command}"
        directory = directory or Path.home() / "Library" / "LaunchAgents"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{label}.plist"
        path.write_bytes(launchd_agent(argv, workdir, Path(home).resolve(), label))
        return path, f"launchctl bootstrap gui/$(id -u) {path}"
    name = "conclave" if command == "serve" else f"conclave-{command}"
    directory = directory or Path.home() / ".config" / "systemd" / "user"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.service"
    path.write_text(systemd_unit(argv, workdir))
    return path, f"systemctl --user daemon-reload && systemctl --user enable --now {name}  (and, to start at boot " \
                 "without a login: loginctl enable-linger $USER)"
