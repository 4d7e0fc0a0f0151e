"""Debian archive access for the labs: indexes, version resolution, checksummed downloads, .deb extraction.

Everything here is written for the labs' needs only:

* the mirror comes from this machine's apt configuration (or ``PYKVM_DEBIAN_MIRROR``);
* indexes are ``dists/<suite>/main/binary-<arch>/Packages.xz`` fetched directly.  ``InRelease`` is
  deliberately not consulted: the lab trusts the SHA256 of each .deb as listed in the Packages index it
  fetched (the trixie riscv64 index on some mirrors disagrees with its InRelease, see LAB-NOTES);
* downloaded .debs are verified against that SHA256 and cached by it, so a cached run needs no network
  for packages (indexes are re-used while younger than ``INDEX_MAX_AGE``);
* a .deb is an ``ar`` archive; its ``data.tar.{xz,gz,zst}`` member is unpacked with ``tarfile``
  (zstd through the ``zstd`` command when no Python zstd module exists);
* downloads show their bytes and rate (:mod:`pykvm.lab.progress`), and each download runs under a
  file lock in the cache (:func:`pykvm.lab.proc.cache_lock`), so labs sharing a cache wait for each
  other instead of writing the same file.
"""

from __future__ import annotations

import glob
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .proc import cache_lock, popen, stop
from .progress import Meter, log

INDEX_MAX_AGE = float(os.environ.get("PYKVM_LAB_INDEX_MAX_AGE", 24 * 3600))


class LabError(RuntimeError):
    """A lab could not be prepared or run; the message is the one-line reason."""


# --------------------------------------------------------------------------------------------------
# mirror discovery


def _sources_entries(root: str = "/") -> Iterator[tuple[str, str]]:
    """Yield (uri, suites) for every ``deb`` source in apt's configuration, in apt's order."""
    etc = os.path.join(root, "etc/apt")
    files = [os.path.join(etc, "sources.list")]
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources")))
    for path in files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "")
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                words = line.split()
                if not words or words[0] != "deb":
                    continue
                words = words[1:]
                if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                    while words and not words[0].endswith("]"):
                        words = words[1:]
                    words = words[1:]
                if len(words) >= 2:
                    yield words[0], words[1]


def debian_mirror(root: str = "/") -> str:
    """The Debian archive URL: ``$PYKVM_DEBIAN_MIRROR``, else the first debian-archive source of apt.

    A source counts as the Debian archive when its path ends in ``/debian`` (this excludes
    ``/debian-security`` and third-party repositories).
    """
    env = os.environ.get("PYKVM_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for uri, _suites in _sources_entries(root):
        u = uri.rstrip("/")
        if u.startswith(("http://", "https://")) and u.endswith("/debian"):
            return u
    raise LabError("no Debian archive found in /etc/apt sources; set PYKVM_DEBIAN_MIRROR")


# --------------------------------------------------------------------------------------------------
# Debian version comparison (the dpkg algorithm)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e)
    if "-" in v:
        up, rev = v.rsplit("-", 1)
    else:
        up, rev = v, ""
    return epoch, up, rev


def version_compare(a: str, b: str) -> int:
    """<0, 0, >0 as Debian version ``a`` sorts before, equal to, after ``b``."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


class _VKey:
    __slots__ = ("v",)

    def __init__(self, v: str):
        self.v = v

    def __lt__(self, other: "_VKey") -> bool:
        return version_compare(self.v, other.v) < 0


def version_key(v: str) -> _VKey:
    return _VKey(v)


# --------------------------------------------------------------------------------------------------
# HTTP


def _http_get(url: str, dest: Path, timeout: float = 60, label: str = "", size: int = 0) -> None:
    """Download ``url`` to ``dest`` (through a temporary name), showing bytes and rate as ``label``."""
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    req = urllib.request.Request(url, headers={"User-Agent": "pykvm-lab"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or size
            with Meter(label or os.path.basename(url), total) as meter:
                while True:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    f.write(chunk)
                    meter.update(len(chunk))
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# Packages index


@dataclass
class Package:
    name: str
    version: str
    arch: str
    filename: str
    sha256: str
    size: int
    depends: str = ""
    pre_depends: str = ""
    provides: str = ""
    suite: str = ""

    def dep_names(self) -> list[list[str]]:
        """Depends + Pre-Depends as a list of alternative groups (names only, arch qualifiers dropped)."""
        groups = []
        for field_ in (self.pre_depends, self.depends):
            for group in field_.split(","):
                group = group.strip()
                if not group:
                    continue
                alts = []
                for alt in group.split("|"):
                    name = alt.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0].strip()
                    if name:
                        alts.append(name)
                groups.append(alts)
        return groups


_FIELDS = {
    "Package": "name",
    "Version": "version",
    "Architecture": "arch",
    "Filename": "filename",
    "SHA256": "sha256",
    "Size": "size",
    "Depends": "depends",
    "Pre-Depends": "pre_depends",
    "Provides": "provides",
}


class Index:
    """One ``Packages`` index: every stanza, newest version first per name, and a Provides map."""

    def __init__(self, suite: str, arch: str, text: str):
        self.suite, self.arch = suite, arch
        self.packages: dict[str, list[Package]] = {}
        self.provides: dict[str, list[str]] = {}
        for stanza in text.split("\n\n"):
            vals: dict[str, str] = {}
            for line in stanza.split("\n"):
                if not line or line[0] in " \t":
                    continue
                k, _, v = line.partition(":")
                attr = _FIELDS.get(k)
                if attr:
                    vals[attr] = v.strip()
            if "name" not in vals or "filename" not in vals:
                continue
            p = Package(
                name=vals["name"], version=vals.get("version", ""), arch=vals.get("arch", ""),
                filename=vals["filename"], sha256=vals.get("sha256", ""), size=int(vals.get("size", 0)),
                depends=vals.get("depends", ""), pre_depends=vals.get("pre_depends", ""),
                provides=vals.get("provides", ""), suite=suite,
            )
            self.packages.setdefault(p.name, []).append(p)
            for prov in p.provides.split(","):
                pn = prov.strip().split(" ", 1)[0]
                if pn:
                    self.provides.setdefault(pn, []).append(p.name)
        for lst in self.packages.values():
            lst.sort(key=lambda p: version_key(p.version), reverse=True)

    def __contains__(self, name: str) -> bool:
        return name in self.packages

    def get(self, name: str) -> Package:
        """The newest version of a real package called ``name`` (or the first real provider)."""
        if name in self.packages:
            return self.packages[name][0]
        for prov in self.provides.get(name, []):
            if prov in self.packages:
                return self.packages[prov][0]
        raise LabError(f"package {name!r} not in {self.suite}/{self.arch} index")

    def names_matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [n for n in self.packages if rx.fullmatch(n)]

    def closure(
        self,
        roots: Iterable[str],
        skip: Callable[[str], bool] = lambda n: False,
    ) -> list[Package]:
        """Depends/Pre-Depends closure of ``roots``: first alternative of each group that exists (or is
        provided); a group already satisfied by a chosen package (by name or Provides) is not
        followed again; names for which ``skip(name)`` is true are left out with their dependencies."""
        chosen: dict[str, Package] = {}
        provided: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop(0)
            if name in chosen or skip(name):
                continue
            p = self.get(name)  # a virtual name resolves to its first real provider
            if p.name in chosen or skip(p.name):
                continue
            chosen[p.name] = p
            provided.add(p.name)
            provided.update(x.strip().split(" ", 1)[0] for x in p.provides.split(",") if x.strip())
            for alts in p.dep_names():
                if any(a in provided for a in alts):
                    continue
                pick = next((a for a in alts if a in self.packages or a in self.provides), None)
                if pick is None:
                    raise LabError(f"{p.name}: cannot satisfy dependency {' | '.join(alts)}")
                todo.append(pick)
        return list(chosen.values())


# --------------------------------------------------------------------------------------------------
# the archive: indexes + pool downloads + manifest


@dataclass
class Archive:
    cache: Path
    mirror: str | None = None
    manifest: list[dict] = field(default_factory=list)
    _indexes: dict[tuple[str, str], Index] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = Path(self.cache).expanduser()
        (self.cache / "debs").mkdir(parents=True, exist_ok=True)
        (self.cache / "indexes").mkdir(parents=True, exist_ok=True)

    def _mirror(self) -> str:
        if self.mirror is None:
            self.mirror = debian_mirror()
        return self.mirror

    def index(self, suite: str, arch: str, refresh: bool = False) -> Index:
        key = (suite, arch)
        if key in self._indexes and not refresh:
            return self._indexes[key]
        path = self.cache / "indexes" / f"{suite}_main_{arch}_Packages.xz"
        fresh = path.exists() and time.time() - path.stat().st_mtime < INDEX_MAX_AGE
        if refresh or not fresh:
            with self.lock(f"index-{suite}-{arch}", f"index {suite}/{arch}"):
                # another lab may have fetched it while this one waited
                fresh = path.exists() and time.time() - path.stat().st_mtime < INDEX_MAX_AGE
                if refresh or not fresh:
                    url = f"{self._mirror()}/dists/{suite}/main/binary-{arch}/Packages.xz"
                    try:
                        _http_get(url, path, label=f"index {suite}/{arch}")
                    except (OSError, urllib.error.URLError) as e:
                        if not path.exists():
                            raise LabError(f"cannot fetch {url}: {e} (and no cached index)") from e
                        log(f"index fetch failed ({e}); using cached {path.name}")
        text = lzma.decompress(path.read_bytes()).decode("utf-8", "replace")
        idx = Index(suite, arch, text)
        self._indexes[key] = idx
        return idx

    def cached_deb(self, p: Package) -> Path:
        return self.cache / "debs" / f"{p.sha256}.deb"

    def lock(self, key: str, what: str = ""):
        """The cache's file lock for ``key`` (a ``with`` context; see :func:`pykvm.lab.proc.cache_lock`)."""
        return cache_lock(self.cache, key, what)

    def fetch(self, p: Package, purpose: str = "") -> Path:
        """Download (or reuse) the pool .deb of ``p``, verified against the index's SHA256.

        The download and the check run under the cache lock of that .deb: a second lab fetching the
        same package waits, then finds it in the cache."""
        if not re.fullmatch(r"[0-9a-f]{64}", p.sha256):
            raise LabError(f"{p.name}: index gives no SHA256")
        dest = self.cached_deb(p)
        if not dest.exists():
            with self.lock(f"deb-{p.sha256}", f"{p.name} {p.version}"):
                if not dest.exists():
                    self._download(p, dest)
        self.manifest.append(
            {
                "package": p.name, "version": p.version, "arch": p.arch, "suite": p.suite,
                "sha256": p.sha256, "filename": p.filename, "size": p.size, "purpose": purpose,
            }
        )
        return dest

    def _download(self, p: Package, dest: Path) -> None:
        url = f"{self._mirror()}/{p.filename}"
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        try:
            try:
                _http_get(url, tmp, timeout=300, label=f"{p.name} {p.version}", size=p.size)
            except urllib.error.HTTPError as e:
                raise LabError(f"cannot download {url}: {e} (index may be stale; retry with --refresh)") from e
            except (OSError, urllib.error.URLError) as e:
                raise LabError(f"cannot download {url}: {e}") from e
            digest = sha256_file(tmp)
            if digest != p.sha256:
                raise LabError(f"{p.name} {p.version}: sha256 {digest} != index {p.sha256}")
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# .deb = ar archive; data.tar.* member


def ar_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """Yield (name, offset, size) for each member of a System V / GNU ``ar`` archive."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise LabError(f"{path}: not an ar archive")
        off = 8
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                return
            if hdr[58:60] != b"`\n":
                raise LabError(f"{path}: bad ar member header at {off}")
            name = hdr[0:16].decode("ascii").rstrip()
            if name.endswith("/") and name != "/":
                name = name[:-1]
            size = int(hdr[48:58].decode("ascii").strip())
            yield name, off + 60, size
            off += 60 + size + (size & 1)
            f.seek(off)


class _Counted(io.RawIOBase):
    """A read-only view of ``data`` that reports the bytes read to ``meter`` (unpack progress)."""

    def __init__(self, data: bytes, meter: Meter | None):
        self._b = io.BytesIO(data)
        self._meter = meter

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._b.readinto(buf)
        if self._meter is not None and n:
            self._meter.update(n)
        return n


def _data_member(deb: Path) -> tuple[str, bytes]:
    for name, off, size in ar_members(deb):
        if name.startswith("data.tar"):
            with open(deb, "rb") as f:
                f.seek(off)
                return name, f.read(size)
    raise LabError(f"{deb}: no data.tar member")


def _open_data_tar(deb: Path, meter: Meter | None = None) -> tuple[tarfile.TarFile, Callable[[], None]]:
    name, raw = _data_member(deb)
    if meter is not None:
        meter.set_total(len(raw))
    src = io.BufferedReader(_Counted(raw, meter), 1 << 16)
    if name == "data.tar.xz":
        return tarfile.open(fileobj=lzma.LZMAFile(src), mode="r|"), lambda: None
    if name == "data.tar.gz":
        return tarfile.open(fileobj=src, mode="r|gz"), lambda: None
    if name == "data.tar":
        return tarfile.open(fileobj=src, mode="r|"), lambda: None
    if name == "data.tar.zst":
        try:
            import zstandard  # type: ignore

            reader = zstandard.ZstdDecompressor().stream_reader(src)
            return tarfile.open(fileobj=reader, mode="r|"), lambda: None
        except ImportError:
            pass
        if not shutil.which("zstd"):
            raise LabError(f"{deb.name}: data.tar.zst needs the zstd command (apt-get install zstd)")
        tmp = tempfile.TemporaryFile()  # zstd reads a file, so no pipe-feeding thread is needed
        tmp.write(raw)
        tmp.seek(0)
        proc = popen(["zstd", "-dc"], stdin=tmp, stdout=subprocess.PIPE)

        def done() -> None:
            proc.stdout.close()  # type: ignore[union-attr]
            stop(proc)
            tmp.close()

        return tarfile.open(fileobj=proc.stdout, mode="r|"), done
    raise LabError(f"{deb.name}: unsupported member {name}")


_MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def canonical(member: str) -> str:
    """Archive path → path relative to the root, with merged-/usr applied (``lib/x`` → ``usr/lib/x``)."""
    parts = [p for p in member.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise LabError(f"refusing path {member!r}")
    if parts and parts[0] in _MERGED:
        parts.insert(0, "usr")
    return "/".join(parts)


def merged_usr_links(root: Path) -> None:
    """Create the merged-/usr top-level links (``/bin → usr/bin`` …) in ``root``."""
    for d in ("bin", "sbin", "lib", "lib64"):
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        link = root / d
        if not link.is_symlink() and not link.exists():
            link.symlink_to(f"usr/{d}")


def extract_deb(
    deb: Path,
    root: Path,
    want: Callable[[str], bool] = lambda p: True,
    label: str | None = None,
) -> list[str]:
    """Unpack the data members of ``deb`` whose canonical path satisfies ``want`` into ``root``.

    Absolute symlink targets are rewritten relative so they stay inside ``root``.  Device nodes are
    skipped; hard links become copies.  Returns the canonical paths written.  With ``label`` the
    compressed bytes consumed are shown as progress (worth it for big debs: a kernel's modules).
    """
    root = Path(root)
    written: list[str] = []
    meter = None
    if label:
        meter = Meter(label, deb.stat().st_size, verb="unpacking", done="unpacked")
    try:
        tf, done = _open_data_tar(deb, meter)
    except BaseException:
        if meter is not None:
            meter.close(ok=False)
        raise
    try:
        for m in tf:
            rel = canonical(m.name)
            if not rel or not want(rel):
                continue
            dest = root / rel
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                if dest.is_dir() and not dest.is_symlink():
                    continue
                dest.unlink()
            if m.issym():
                target = m.linkname
                if target.startswith("/"):
                    target = os.path.relpath("/" + canonical(target), "/" + os.path.dirname(rel))
                os.symlink(target, dest)
            elif m.islnk():
                src = root / canonical(m.linkname)
                shutil.copy2(src, dest)
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                with open(dest, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                os.chmod(dest, m.mode & 0o7777)
                os.utime(dest, (m.mtime, m.mtime))
            else:
                continue
            written.append(rel)
    except BaseException:
        if meter is not None:
            meter.close(ok=False)
        raise
    finally:
        tf.close()
        done()
    if meter is not None:
        meter.close()
    return written


# --------------------------------------------------------------------------------------------------
# the nested lab's kernel

# The nested lab's kernel comes from trixie (6.12): the kvm_run GUEST_MODE flag and
# KVM_CAP_X86_GUEST_MODE arrived in Linux 6.11, and bookworm's 6.1 has neither. Its userspace stays
# bookworm's (python3.11, the host's ABI tag for pykvm._native).
NESTED_KERNEL_SUITE = "trixie"


def nested_kernel_image(archive: Archive, suite: str = NESTED_KERNEL_SUITE) -> Package:
    """The ``linux-image-<abi>-cloud-amd64`` package the nested lab boots: the one that the
    ``linux-image-cloud-amd64`` meta-package of ``suite``'s amd64 index depends on.

    Shared by the lab runner (:func:`pykvm.lab.build.nested_kernel`) and the KVM module rebuild
    (:mod:`pykvm.lab.kmod`), so both name the same kernel. Raises :class:`LabError` when the
    meta-package has no such dependency."""
    ix = archive.index(suite, "amd64")
    meta = ix.get("linux-image-cloud-amd64")
    img_name = next((a[0] for a in meta.dep_names() if a[0].startswith("linux-image-")), None)
    if not img_name:
        raise LabError(f"linux-image-cloud-amd64 {meta.version}: no linux-image-* dependency")
    return ix.get(img_name)
