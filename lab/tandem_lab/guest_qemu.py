"""The lab guest under plain QEMU (TCG) on the lab machine itself, without libvirt or a lab
host: to check the image (docs/lab-guest.md, "Clean shutdown") where no lab is running.

Boots the image the way the vm role's domain template does (PVH vmlinux, initramfs,
serial console, ACPI, virtio disk, no NIC) on a raw disk file, and talks QMP to press the
ACPI power button, as `virsh shutdown` does.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

QEMU = "qemu-system-x86_64"
CMDLINE = "console=ttyS0 quiet panic=-1"


class GuestQemuError(RuntimeError):
    pass


class Qmp:
    """A QMP connection: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("r")
        self._read()                                         # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise GuestQemuError("QMP: QEMU closed the connection")
        return json.loads(line)

    def command(self, name: str, **arguments) -> dict:
        msg = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "error" in reply:
                raise GuestQemuError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Guest:
    """One QEMU process running the guest image in `image` (a guest.build() directory) with
    `disk` (a raw file) as vda. Work files (console log, QMP socket) go to `workdir`."""

    def __init__(self, image: Path, disk: Path, workdir: Path, memory_mib: int = 128,
                 cmdline: str = CMDLINE):
        if shutil.which(QEMU) is None:
            raise GuestQemuError(f"{QEMU} is missing (apt-get install qemu-system-x86)")
        self.console = workdir / "console.log"
        self.qmp_path = workdir / "qmp.sock"
        self.argv = [
            QEMU, "-accel", "tcg", "-machine", "pc", "-m", str(memory_mib), "-smp", "1",
            "-display", "none", "-no-reboot", "-nic", "none",
            "-kernel", str(image / "vmlinux"), "-initrd", str(image / "initramfs.cpio.gz"),
            "-append", cmdline,
            "-drive", f"file={disk},format=raw,if=virtio",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        self.console.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, text: str, timeout: float) -> float:
        """Seconds since start() when `text` appeared on the console."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console_text():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise GuestQemuError(f"QEMU exited ({self.proc.returncode}) before {text!r}:\n"
                                     f"{self.proc.stdout.read()}\n{self.console_text()[-3000:]}")
            time.sleep(0.2)
        raise GuestQemuError(f"no {text!r} on the console within {timeout} s:\n{self.console_text()[-3000:]}")

    def power_button(self) -> None:
        """Press the ACPI power button (QMP system_powerdown; libvirt's `virsh shutdown`)."""
        qmp = Qmp(self.qmp_path)
        try:
            qmp.command("system_powerdown")
        finally:
            qmp.close()

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it still runs after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
