"""The recovery points of one resource: one id across all its volumes, with labels.

rpstore.py keeps each volume's copy-before-write chain; this module makes an
RP a resource-wide thing (the same instant on every volume, which is what
crash-consistency across a VM's disks needs), labels it, keeps retention,
and owns the NBD exports and clones made from RPs.

Layout, under <state_dir>/<resource>/rp/:

    <id>.json        the manifest: labels (reason, time, node, role, generation
                     ids, consistent); written last on create, removed first on
                     delete, so a manifest always names logs that exist
    vol<N>/<id>.delta   the volume's delta log (rpstore.py)
    clones/<name>/vol<N>/   writable clones for drills (rpstore.Clone)

Storage per volume (chosen at open, see _open_store): a volume whose backing
is a regular file on a filesystem that can FICLONE it (XFS with reflink=1,
btrfs) keeps reflink images (rpreflink.py) in `<volume file>.rp/<id>.img`,
next to the volume, since a reflink copy must be on the volume's own
filesystem and the state directory usually is not. Every other volume
(block device, ext4, ...) keeps the delta logs above. A volume that already
has RPs of one kind keeps that kind until it has none.

Creation order: every volume's log, then the manifest (atomic rename +
directory fsync). Open deletes logs that have no manifest (a create or a
delete that a crash interrupted), so the two never disagree for long.

The caller (resource.py) is responsible for the instant: it creates an RP
only while no write to any volume is in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from .durable import fsync_dir, unlink_durably
from .rpreflink import ReflinkStore, extent_count, holds_images, image_dir, probe
from .rpstore import DELETING, SUFFIX, Clone, RPImage, RPStore, RPStoreError, check_rp_id

log = logging.getLogger("tandem.engine.recovery")

#: Why an RP was taken. "scheduled" ones follow rp_keep / rp_max_age; the
#: automatic ones keep the newest AUTO_KEEP; "manual" ones stay until deleted.
#: "center" ones were asked for by tandem-center's schedule over the monitor endpoint's
#: control permission (monitor.py), with an id it chose; the center expires them, the
#: engine's retention does not touch them.
SCHEDULED, MANUAL, CENTER = "scheduled", "manual", "center"
PRE_RESYNC, DEGRADED, SPLIT_BRAIN = "pre-resync", "degraded", "split-brain"
AUTOMATIC = (PRE_RESYNC, DEGRADED, SPLIT_BRAIN)
AUTO_KEEP = 8


class RecoveryPointError(Exception):
    """A refused or failed RP operation; the message is for the operator."""


class RecoveryPointTooLate(RecoveryPointError):
    """create(not_after=...) refused: this node's clock had passed not_after when it would have
    stamped the RP, so nothing was taken (a schedule slot's window had ended)."""


@dataclass
class Manifest:
    id: str
    reason: str
    created: float                 # wall clock
    node: str
    role: str
    consistent: bool               # a crash-consistent image of data that was UpToDate/Consistent
    generations: list[str]         # current GI per volume when taken
    labels: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class RecoveryPoints:
    def __init__(self, directory: str, node: str, stores: list[RPStore], manifests: dict[str, Manifest]):
        self.directory, self.node = directory, node
        self.stores = stores
        self.manifests = manifests                 # id -> Manifest, in creation order
        self.exports: dict[str, RPImage | Clone] = {}   # NBD export name -> export
        self.clones: dict[str, list[Clone]] = {}       # clone name -> per-volume clones

    # -- open / close ---------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, node: str, volumes, *, storage: str = "auto") -> RecoveryPoints:
        """storage: "auto" (reflink where the volume's filesystem can, else delta),
        "delta" or "reflink" (an error where it cannot) for volumes without RPs yet."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        stores = [_open_store(directory, v, storage) for v in volumes]
        manifests: dict[str, Manifest] = {}
        for name in os.listdir(directory):
            if name.endswith(".json.tmp"):
                os.unlink(os.path.join(directory, name))
            elif name.endswith(".json"):
                path = os.path.join(directory, name)
                try:
                    with open(path) as f:
                        m = Manifest(**json.load(f))
                except (ValueError, TypeError) as e:
                    raise RecoveryPointError(f"{path}: unreadable RP manifest: {e}") from None
                manifests[m.id] = m
        for rp_id in list(manifests):
            if any(rp_id not in s for s in stores):
                # The manifest is written last: a volume without the log means the
                # log was lost afterwards. Keep nothing half-true.
                log.error("recovery point %s lacks a volume log; dropping it", rp_id)
                manifests.pop(rp_id)
                unlink_durably(os.path.join(directory, f"{rp_id}.json"))
        for s in stores:
            for rp_id in s.rp_ids():
                if rp_id not in manifests:
                    s.delete(rp_id)            # an interrupted create or delete
        order = {rp_id: i for i, rp_id in enumerate(stores[0].rp_ids())} if stores else {}
        ordered = dict(sorted(manifests.items(), key=lambda kv: order.get(kv[0], 0)))
        rps = cls(directory, node, stores, ordered)
        rps._reopen_clones()
        return rps

    def close(self) -> None:
        for export in self.exports.values():
            if isinstance(export, RPImage):
                export.store.unpin(export.rp_id)
        self.exports.clear()
        for clones in self.clones.values():
            for c in clones:
                with contextlib.suppress(Exception):
                    c.close_sync()
        self.clones.clear()
        for s in self.stores:
            s.close()

    # -- the write path (called for every local write; keep needs_preserve cheap) ----------

    def needs_preserve(self, volume: int, offset: int, length: int) -> bool:
        return bool(self.manifests) and self.stores[volume].needs_preserve(offset, length)

    def preserve(self, volume: int, offset: int, length: int) -> None:
        """Blocking: save the pre-image of the range before it is overwritten."""
        self.stores[volume].preserve(offset, length)

    # -- create / list / delete ---------------------------------------------------------------

    def create(self, reason: str, *, role: str, consistent: bool, generations: list[str],
               labels: dict | None = None, rp_id: str | None = None,
               not_after: float | None = None) -> Manifest:
        """Blocking; the caller guarantees no write is in progress on any volume.
        rp_id: the id the caller chose (it must not exist yet), else one from the time.
        not_after: refuse (RecoveryPointTooLate, nothing written) if the RP's own time stamp,
        taken here, would not be before it; the check and the stamp are the same reading."""
        now = time.time()
        if not_after is not None and now >= not_after:
            raise RecoveryPointTooLate(
                f"recovery point {rp_id!r} not taken: this node's clock ({now:.3f}) is past "
                f"not_after ({not_after:.3f})")
        if rp_id is None:
            rp_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z-" + reason
        check_rp_id(rp_id)
        if rp_id in self.manifests:
            raise RecoveryPointError(f"recovery point {rp_id!r} exists")
        m = Manifest(rp_id, reason, now, self.node, role, consistent, generations, dict(labels or {}))
        for s in self.stores:
            s.create(rp_id)
        self._write_manifest(m)
        self.manifests[rp_id] = m
        return m

    def _write_manifest(self, m: Manifest) -> None:
        """Atomically (a crash leaves the old or the new manifest, never half of one)."""
        path = os.path.join(self.directory, f"{m.id}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(m.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
        fsync_dir(self.directory)

    def label(self, rp_id: str, labels: dict[str, str | None]) -> Manifest:
        """Set labels of an RP (a value None removes one), e.g. tested=<when> after a drill.
        The data and the built-in fields (reason, time, consistency) never change. Blocking."""
        m = self.get(rp_id)
        new = {k: v for k, v in {**m.labels, **labels}.items() if v is not None}
        updated = dataclasses.replace(m, labels=new)
        self._write_manifest(updated)
        self.manifests[rp_id] = updated
        return updated

    def get(self, rp_id: str) -> Manifest:
        if rp_id not in self.manifests:
            raise RecoveryPointError(f"no recovery point {rp_id!r}")
        return self.manifests[rp_id]

    def list(self) -> list[dict]:
        now = time.time()
        out = []
        for m in self.manifests.values():
            out.append({**m.to_dict(), "age_seconds": round(now - m.created, 1),
                        "bytes_used": sum(s.bytes_used(m.id) for s in self.stores),
                        "storage": self.storage(),
                        "exported": sorted(n for n, e in self.exports.items() if e.rp_id == m.id),
                        "clones": sorted(n for n, cs in self.clones.items() if cs[0].rp_id == m.id)})
        return out

    def last_consistent(self) -> Manifest | None:
        for m in reversed(self.manifests.values()):
            if m.consistent:
                return m
        return None

    def delete(self, rp_id: str, *, protect: Manifest | None = None) -> None:
        """Blocking. Refuses an RP that is exported, cloned, or protected by the caller."""
        m = self.get(rp_id)
        if protect is not None and protect.id == rp_id:
            raise RecoveryPointError(f"{rp_id} is the last consistent image of an Inconsistent volume; "
                                     "it is kept until the volume is consistent again")
        users = [n for n, e in self.exports.items() if e.rp_id == rp_id] + \
            [n for n, cs in self.clones.items() if cs[0].rp_id == rp_id]
        if users:
            raise RecoveryPointError(f"{rp_id} is in use by {', '.join(sorted(users))}; "
                                     "unexport it and delete its clones first")
        # Manifest first: a crash in between leaves logs without a manifest,
        # which open() finishes deleting.
        unlink_durably(os.path.join(self.directory, f"{m.id}.json"))
        del self.manifests[m.id]
        for s in self.stores:
            s.delete(m.id)

    def drop_all(self) -> list[str]:
        """Emergency: delete every RP, oldest first (a plain unlink each, no data moved,
        so it works on a full disk). Exports and clones of them go too."""
        for name in list(self.clones):
            with contextlib.suppress(OSError, RecoveryPointError, RPStoreError):
                self.delete_clone(name)
        for rp_id in list(self.manifests):
            self.unexport(rp_id)
        dropped = []
        for rp_id in list(self.manifests):
            with contextlib.suppress(OSError, RPStoreError):
                unlink_durably(os.path.join(self.directory, f"{rp_id}.json"))
                del self.manifests[rp_id]
                for s in self.stores:
                    if rp_id in s:
                        s.delete(rp_id)
                dropped.append(rp_id)
        return dropped

    def expire(self, *, keep: int, max_age: float, protect: Manifest | None) -> list[str]:
        """Retention: scheduled RPs by count and age, automatic ones by AUTO_KEEP and age.

        Manual RPs stay until deleted. Returns the deleted ids."""
        now = time.time()
        doomed = []
        scheduled = [m for m in self.manifests.values() if m.reason == SCHEDULED]
        for i, m in enumerate(reversed(scheduled)):          # newest first
            if i >= keep or (max_age and now - m.created > max_age):
                doomed.append(m)
        automatic = [m for m in self.manifests.values() if m.reason in AUTOMATIC]
        for i, m in enumerate(reversed(automatic)):          # newest first
            if i >= AUTO_KEEP or (max_age and now - m.created > max_age):
                doomed.append(m)
        deleted = []
        for m in doomed:
            try:
                self.delete(m.id, protect=protect)
                deleted.append(m.id)
            except RecoveryPointError as e:
                log.info("retention keeps %s: %s", m.id, e)
        return deleted

    # -- restore / export / clone -------------------------------------------------------------

    def changed_since(self, rp_id: str) -> list[list[tuple[int, int]]]:
        self.get(rp_id)
        return [s.changed_since(rp_id) for s in self.stores]

    def restore(self, rp_id: str) -> list[list[tuple[int, int]]]:
        """Blocking; the caller keeps writes out and has marked changed_since() out of sync."""
        self.get(rp_id)
        return [s.restore(rp_id) for s in self.stores]

    def export(self, rp_id: str, names: list[str]) -> list[str]:
        """Serve the RP read-only: one NBD export per volume, '<export>@<id>'."""
        self.get(rp_id)
        made = []
        for s, base in zip(self.stores, names, strict=True):
            name = f"{base}@{rp_id}"
            if name not in self.exports:
                self.exports[name] = RPImage(s, rp_id, name=name)
            made.append(name)
        return made

    def unexport(self, rp_id: str) -> list[str]:
        gone = [n for n, e in self.exports.items() if isinstance(e, RPImage) and e.rp_id == rp_id]
        for n in gone:
            self.exports.pop(n).store.unpin(rp_id)
        return gone

    def clone(self, rp_id: str, name: str, names: list[str]) -> list[str]:
        """A writable copy for a drill: '<export>@clone-<name>' per volume; never touches the replica."""
        self.get(rp_id)
        check_rp_id(name)
        if name in self.clones:
            raise RecoveryPointError(f"a clone named {name!r} exists already")
        root = os.path.join(self.directory, "clones", name)
        if os.path.exists(root):
            raise RecoveryPointError(f"{root} exists already")
        clones = []
        try:
            for s in self.stores:
                clones.append(Clone.create(s, rp_id, os.path.join(root, f"vol{len(clones)}"),
                                           name=f"{names[len(clones)]}@clone-{name}"))
        except (OSError, RPStoreError):
            for c in clones:
                c.close_sync()
            shutil.rmtree(root, ignore_errors=True)
            raise
        self.clones[name] = clones
        for c in clones:
            self.exports[c.name] = c
        return [c.name for c in clones]

    def delete_clone(self, name: str) -> None:
        if name not in self.clones:
            raise RecoveryPointError(f"no clone named {name!r}")
        for c in self.clones.pop(name):
            self.exports.pop(c.name, None)
            c.close_sync()
        shutil.rmtree(os.path.join(self.directory, "clones", name))
        fsync_dir(os.path.join(self.directory, "clones"))

    def _reopen_clones(self) -> None:
        root = os.path.join(self.directory, "clones")
        if not os.path.isdir(root):
            return
        for name in sorted(os.listdir(root)):
            try:
                clones = [Clone.open(s, os.path.join(root, name, f"vol{i}"))
                          for i, s in enumerate(self.stores)]
            except (OSError, RPStoreError) as e:
                log.error("clone %s cannot be reopened (%s); leaving it on disk", name, e)
                continue
            self.clones[name] = clones

    def name_clone_exports(self, names: list[str]) -> None:
        """After a restart: serve the reopened clones again under their export names."""
        for name, clones in self.clones.items():
            for c, base in zip(clones, names, strict=True):
                c.name = f"{base}@clone-{name}"
                self.exports[c.name] = c

    def summary(self) -> dict:
        last = next(reversed(self.manifests.values()), None)
        return {"count": len(self.manifests),
                "last": None if last is None else {
                    "id": last.id, "reason": last.reason, "consistent": last.consistent,
                    "age_seconds": round(time.time() - last.created, 1)},
                "exports": sorted(self.exports), "clones": sorted(self.clones),
                "storage": self.storage()}

    def storage(self) -> list[str]:
        """Per volume: "reflink" (rpreflink.ReflinkStore) or "delta" (rpstore.RPStore)."""
        return [s.kind if isinstance(s, ReflinkStore) else "delta" for s in self.stores]


#: "auto" keeps a volume file with more extents than this on delta RPs. FICLONE's time
#: grows with the extent count: 2.29 s for 96k extents here (about 24 us each), so 20k
#: keeps a reflink RP's creation, which pauses the volume's writes, near 0.5 s.
AUTO_REFLINK_MAX_EXTENTS = 20_000


def _too_fragmented(fd: int) -> str | None:
    """Why "auto" should not pick reflink for this file, or None."""
    try:
        n = extent_count(fd)
    except OSError as e:
        return f"FIEMAP failed: {e.strerror}"
    if n > AUTO_REFLINK_MAX_EXTENTS:
        return (f"the volume file has {n} extents (over {AUTO_REFLINK_MAX_EXTENTS}): "
                "a reflink recovery point would take over half a second to create")
    return None


def _open_store(directory: str, v, storage: str = "auto") -> RPStore | ReflinkStore:
    """Volume v's RP store. Existing RPs decide (never two kinds in one volume): delta
    logs in <directory>/vol<N>/ keep the delta chain, images in <volume file>.rp/ keep
    reflink. Without either: reflink if the backing is a regular file whose filesystem
    clones it into <volume file>.rp/ (a probe) and, for "auto", is not so fragmented
    that cloning it would be slow; else the delta chain."""
    if storage not in ("auto", "delta", "reflink"):
        raise ValueError(f"storage must be auto, delta or reflink, got {storage!r}")
    delta_dir = os.path.join(directory, f"vol{v.number}")
    path = getattr(v, "path", None)
    images = image_dir(os.fspath(path)) if path else None
    try:
        has_logs = any(n.endswith((SUFFIX, DELETING)) for n in os.listdir(delta_dir))
    except FileNotFoundError:
        has_logs = False
    has_images = images is not None and holds_images(images)
    if has_logs and has_images:
        raise RecoveryPointError(f"volume {v.number} has delta logs in {delta_dir} and reflink images "
                                 f"in {images}; remove the kind that has no manifest")
    if has_images:
        return ReflinkStore.open(images, v.fd, v.size)
    if has_logs or storage == "delta":
        why = "it has delta recovery points" if has_logs else "delta storage asked for"
    elif images is None:
        why = "the volume has no file path"
    else:
        why = probe(images, v.fd)
        if why is None and storage == "auto":
            why = _too_fragmented(v.fd)
        if why is None:
            log.info("volume %s: reflink recovery points in %s", v.number, images)
            return ReflinkStore.open(images, v.fd, v.size)
    if storage == "reflink":
        raise RecoveryPointError(f"volume {v.number}: no reflink recovery points: {why}")
    log.info("volume %s: delta recovery points in %s (no reflink: %s)", v.number, delta_dir, why)
    return RPStore.open(delta_dir, v.fd, v.size)
