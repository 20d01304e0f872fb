"""The lab guest (docs/lab-guest.md) from a test: build and copy its image, write its
NoCloud seed and libvirt domain from the templates in roles/vm/templates, ask its HTTP API,
and parse the records its app writes to its disk. And, without the lab, its clean shutdown
under plain QEMU on this machine (acpi_shutdown_run).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "roles" / "vm" / "templates"
VM_DIR = "/var/lib/tandem-guest"          # per-VM files on a hypervisor: seed, domain XML, console
RECORD = 4096
ZERO_SUM = "0" * 16


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps       # Ansible's filter, for rendering outside Ansible
    return env


def render(template: str, **values) -> str:
    return _env().get_template(template).render(**values)


def build_image(lab, *hosts: str) -> dict:
    """`labctl guest-image HOST...`: the image's manifest, with its paths inside each host."""
    out = lab.labctl("guest-image", *hosts, timeout=900).stdout
    return json.loads(out[out.index("\n{") + 1:])


def write_seed(lab, host: str, vm: str, seed: dict) -> str:
    """Render the NoCloud seed and make it a vfat config drive labelled cidata on the
    hypervisor itself, with qemu-img's vvfat driver (in the lab image; nothing else is)."""
    vmdir = f"{VM_DIR}/{vm}"
    assert lab.attach(host, "mkdir", "-p", f"{vmdir}/seed").returncode == 0
    for name in ("meta-data", "network-config", "user-data"):
        lab.put(host, f"{vmdir}/seed/{name}", render(f"seed/{name}.j2", seed=seed))
    spec = json.dumps({"driver": "vvfat", "dir": f"{vmdir}/seed", "fat-type": 12, "floppy": True,
                       "label": "cidata"})
    proc = lab.attach(host, "sh", "-c", f"rm -f {vmdir}/seed.img && qemu-img convert -f vvfat -O raw "
                      f"{shlex.quote('json:' + spec)} {vmdir}/seed.img")
    assert proc.returncode == 0, proc.stderr
    return f"{vmdir}/seed.img"


def define(lab, host: str, domain: dict) -> str:
    """Write the domain XML on the hypervisor and `virsh define` it (keeping the uuid of a
    domain already defined under that name: libvirt refuses to redefine it without)."""
    uuid = lab.attach(host, "virsh", "-q", "domuuid", domain["name"])
    if uuid.returncode == 0:
        domain = {**domain, "uuid": uuid.stdout.strip()}
    path = f"{VM_DIR}/{domain['name']}/domain.xml"
    lab.put(host, path, render("libvirt-domain.xml.j2", domain=domain))
    proc = lab.attach(host, "virsh", "-q", "define", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def undefine(lab, host: str, name: str) -> None:
    lab.attach(host, "virsh", "-q", "destroy", name)
    lab.attach(host, "virsh", "-q", "undefine", name)


def http(lab, host: str, ip: str, path: str, timeout: float = 3) -> str | None:
    """GET http://IP/PATH from the hypervisor; None if it does not answer."""
    proc = lab.attach(host, "curl", "-fsS", "-m", str(timeout), f"http://{ip}{path}", timeout=timeout + 30)
    return proc.stdout if proc.returncode == 0 else None


def status(lab, host: str, ip: str) -> dict | None:
    body = http(lab, host, ip, "/cgi-bin/status")
    return json.loads(body) if body else None


@dataclass(frozen=True)
class Record:
    seq: int
    time: int
    host: str
    boot: str
    prev: str
    sum: str
    line: str


def parse_record(block: bytes) -> Record | None:
    """A record block (docs/lab-guest.md, "Records"), or None if it holds no valid record."""
    line = block.split(b"\n", 1)[0].decode("ascii", "replace")
    body, sep, got = line.rpartition(" sum=")
    fields = dict(f.split("=", 1) for f in body.split()[1:] if "=" in f)
    if not sep or not body.startswith("TDR1 ") or hashlib.sha256(body.encode()).hexdigest()[:16] != got:
        return None
    return Record(int(fields["seq"]), int(fields["time"]), fields["host"], fields["boot"], fields["prev"],
                  got, line)


def records(data: bytes) -> list[Record]:
    """The valid prefix of a disk: records 1, 2, ... each in its block and chained to the one
    before (prev = its sum). Stops at the first block that breaks this."""
    out: list[Record] = []
    for i in range(len(data) // RECORD):
        rec = parse_record(data[i * RECORD:(i + 1) * RECORD])
        if rec is None or rec.seq != i + 1 or rec.prev != (out[-1].sum if out else ZERO_SUM):
            break
        out.append(rec)
    return out


def read_volume(lab, host: str, path: str, blocks: int) -> bytes:
    """The first `blocks` record blocks of a volume's backing file inside a lab host."""
    proc = subprocess.run(
        ["lxc-attach", "-P", str(lab.state / "lxc"), "-n", host, "--clear-env", "--",
         "head", "-c", str(blocks * RECORD), path], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


APP_READY = "tdr-app: last durable record"


def uptimes(console: str) -> dict[str, float]:
    """The guest's uptime at each of its console steps ("TDRGUEST: <step> (uptime X)")."""
    return {m[1]: float(m[2]) for m in re.finditer(r"TDRGUEST: (.*?) \(uptime ([0-9.]+)\)", console)}


def acpi_shutdown_run(image: Path, workdir: Path, records_before: int = 5, timeout: float = 60) -> dict:
    """Boot the guest image (a guest.build() directory) under plain QEMU TCG on a fresh 16 MiB
    raw disk file, wait for `records_before` records on it, press the ACPI power button (QMP
    system_powerdown, what `virsh shutdown` sends) and give QEMU `timeout` s to exit; then
    read the disk. `ok`: QEMU exited by itself with status 0, and the last record on the disk
    is the one the app reported last on its way out, at least the last one seen before."""
    from tandem_lab.guest_qemu import CMDLINE, Guest, GuestQemuError  # noqa: PLC0415 - lab/ on the path

    disk = workdir / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    vm = Guest(image, disk, workdir, cmdline=CMDLINE + " tdr.interval=0.5")
    vm.start()
    try:
        ready = vm.wait_console(APP_READY, 300)
        deadline = time.monotonic() + 120
        while len(records(disk.read_bytes())) < records_before:
            if time.monotonic() > deadline:
                raise GuestQemuError(f"fewer than {records_before} records after 120 s:\n"
                                     f"{vm.console_text()[-3000:]}")
            time.sleep(0.2)
        seen = len(records(disk.read_bytes()))
        t0 = time.monotonic()
        vm.power_button()
        rc = vm.wait_exit(timeout)
        shutdown_s = time.monotonic() - t0
    finally:
        vm.kill()
    console = vm.console_text()
    held = records(disk.read_bytes())
    stopped = re.findall(r"tdr-app: stopped, last durable record (\d+)", console)
    last = int(stopped[-1]) if stopped else None
    return {"boot_to_app_s": round(ready, 2), "exited": rc is not None, "qemu_rc": rc,
            "powerdown_to_exit_s": round(shutdown_s, 2) if rc is not None else None,
            "records_seen_before_button": seen, "app_last_durable": last, "records_on_disk": len(held),
            "guest_uptime_at": uptimes(console), "console": console,
            "ok": rc == 0 and last is not None and len(held) == last and last >= seen}
