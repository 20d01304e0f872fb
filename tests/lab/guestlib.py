"""The lab guest (docs/lab-guest.md) from a test: build and copy its image, write its
NoCloud seed and libvirt domain from the templates in roles/vm/templates, ask its HTTP API,
and parse the records its app writes to its disk.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
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
