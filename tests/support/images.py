"""The tiny local image the docker sandbox tests run: a busybox-static root filesystem.

No registry is reachable from CI, so the image is made with `docker import` of a root
filesystem built here in memory (about 2 MB). It has a non-root user, `agent` (1000:1000), and
no `USER` in its config, so the sandbox must find that user itself; a second tag,
`USER_TAG`, sets `USER builder` (1001) to check that an image's own `USER` wins.

`ensure_test_images()` is idempotent: an image whose `kjob.test.recipe` label matches the
current recipe is kept, so only the first call on a machine pays for the import.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

IMAGE = "kjob-test-busybox:latest"
USER_TAG = "kjob-test-busybox:builder"
#: `USER root`: the sandbox must not run an agent as root even when the image asks for it.
ROOT_TAG = "kjob-test-busybox:root"

AGENT_UID = 1000
BUILDER_UID = 1001

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "agent:x:1000:1000:kjob test agent:/home/agent:/bin/sh\n"
    "builder:x:1001:1001:kjob test builder:/home/builder:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\nagent:x:1000:\nbuilder:x:1001:\nnogroup:x:65534:\n"

#: Bump when the rootfs recipe changes, so stale images on a machine are rebuilt.
_RECIPE_VERSION = "1"


def _busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path
    raise RuntimeError("busybox is not installed: run .ci/docker.sh (apt-get install busybox-static)")


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({name for name in out.split() if name and name != "busybox"})


def _rootfs(busybox: Path) -> bytes:
    """A tar of the root filesystem: /bin/busybox, one symlink per applet, users, /tmp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755, uid: int = 0) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "home", "proc", "sys", "dev", "root", "usr", "usr/bin", "work"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_dir("home/agent", uid=AGENT_UID)
        add_dir("home/builder", uid=BUILDER_UID)
        add_file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in _applets(busybox):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        add_file("etc/passwd", _PASSWD.encode())
        add_file("etc/group", _GROUP.encode())
    return buf.getvalue()


def _recipe(busybox: Path) -> str:
    digest = hashlib.sha256(busybox.read_bytes()).hexdigest()[:16]
    return f"{_RECIPE_VERSION}-{digest}"


def _current_recipe(tag: str, docker: str) -> str | None:
    proc = subprocess.run([docker, "image", "inspect", tag], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout)[0]["Config"].get("Labels") or {}
    return labels.get("kjob.test.recipe")


def _import(tag: str, rootfs: bytes, recipe: str, docker: str, user: str | None) -> None:
    changes = ["--change", f"LABEL kjob.test.recipe={recipe}", "--change", 'CMD ["/bin/sh"]']
    if user:
        changes += ["--change", f"USER {user}"]
    subprocess.run([docker, "import", *changes, "-", tag], input=rootfs, check=True, capture_output=True)


def ensure_test_images() -> str:
    """Build `IMAGE`, `USER_TAG` and `ROOT_TAG` unless they are already current; return `IMAGE`."""
    docker = shutil.which("docker")
    if docker is None:
        raise RuntimeError("the docker client is not installed: run .ci/docker.sh")
    busybox = _busybox()
    recipe = _recipe(busybox)
    wanted = {IMAGE: None, USER_TAG: "builder", ROOT_TAG: "root"}
    stale = {tag: user for tag, user in wanted.items() if _current_recipe(tag, docker) != recipe}
    if stale:
        rootfs = _rootfs(busybox)
        for tag, user in stale.items():
            _import(tag, rootfs, recipe, docker, user)
    return IMAGE
