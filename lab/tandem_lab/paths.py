"""Where the lab keeps things on the lab machine.

State (containers, data, keys) lives under one directory that `lab down`
removes whole; the rootfs cache lives elsewhere and survives, so a warm
`lab up` does not rebuild the image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "lab" / "image"


@dataclass(frozen=True)
class Paths:
    state: Path
    cache: Path
    inventory: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(
            state=Path(os.environ.get("TANDEM_LAB_STATE", "/var/lib/tandem-lab")),
            cache=Path(os.environ.get("TANDEM_LAB_CACHE", "/var/cache/tandem-lab")),
            inventory=Path(os.environ.get("TANDEM_LAB_INVENTORY",
                                          REPO / "inventories" / "lab" / "hosts.yml")),
        )

    @property
    def lxcpath(self) -> Path:
        return self.state / "lxc"

    def container(self, name: str) -> Path:
        return self.lxcpath / name

    @property
    def data(self) -> Path:
        return self.state / "data"

    @property
    def data_image(self) -> Path:
        return self.state / "data-xfs.img"

    @property
    def ssh_key(self) -> Path:
        return self.state / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state / "ssh" / "known_hosts"

    @property
    def machine_state(self) -> Path:
        """What `up` changed on the lab machine, so `down` can restore it."""
        return self.state / "machine.json"

    @property
    def rootfs_cache(self) -> Path:
        return self.cache / "rootfs"
