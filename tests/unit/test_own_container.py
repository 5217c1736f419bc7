"""The forwarder's own container, found in the /proc texts a real dockerd gives it,
whatever dockerd's data root is (tests/fixtures/dockerd says how each was captured)."""

from __future__ import annotations

import pytest

from forwarder.sources.docker import NOT_IN_A_CONTAINER, OwnContainer, own_container_from
from tests.fixtures import dockerd
from tests.fixtures.dockerd import OWN_IDS, SIDECAR_NEIGHBOUR_ID


@pytest.mark.parametrize("layout", sorted(OWN_IDS))
def test_own_container_is_found_in_real_mountinfo_alone(layout: str) -> None:
    mountinfo = dockerd.text(f"mountinfo-{layout}.txt")
    assert own_container_from(mountinfo, None, None) == OwnContainer(id=OWN_IDS[layout])


@pytest.mark.parametrize(
    ("layout", "root"),
    [
        # a folder on the root filesystem: the path from that filesystem's root
        ("dataroot-folder", "/tmp/dkc/d/containers/{id}/hostname"),
        # the data root is a filesystem of its own (tmpfs, a disk): relative to it
        ("dataroot-tmpfs", "/containers/{id}/hostname"),
        ("dataroot-ext4", "/containers/{id}/hostname"),
    ],
)
def test_the_hostname_mount_root_depends_on_the_data_root_layout(layout: str, root: str) -> None:
    """The facts the detection rests on, as the real files show them."""
    lines = dockerd.text(f"mountinfo-{layout}.txt").splitlines()
    (line,) = [x for x in lines if x.split()[4] == "/etc/hostname"]
    assert line.split()[3] == root.format(id=OWN_IDS[layout])


def test_a_private_cgroup_namespace_gives_no_id_so_mountinfo_must() -> None:
    """cgroup v2 hosts run containers in a private cgroup namespace by default; this
    host is cgroup v1, where `--cgroupns private` gives the same view: `0::/`."""
    cgroup = dockerd.text("cgroup-private.txt")
    assert "0::/\n" in cgroup and "docker" not in cgroup
    assert own_container_from(None, cgroup, None) == NOT_IN_A_CONTAINER
    mountinfo = dockerd.text("mountinfo-dataroot-ext4.txt")
    own = own_container_from(mountinfo, cgroup, OWN_IDS["dataroot-ext4"][:12])
    assert own == OwnContainer(id=OWN_IDS["dataroot-ext4"])


@pytest.mark.parametrize("layout", ["dataroot-folder-hostns", "dataroot-tmpfs"])
def test_the_hosts_cgroup_namespace_names_the_container_too(layout: str) -> None:
    cgroup = dockerd.text(f"cgroup-{layout.removeprefix('dataroot-')}.txt")
    assert own_container_from(None, cgroup, None) == OwnContainer(id=OWN_IDS[layout])


def test_a_sidecar_seeing_the_containers_folder_finds_itself_not_a_neighbour() -> None:
    mountinfo = dockerd.text("mountinfo-sidecar-ext4.txt")
    assert "/containers /var/lib/docker/containers ro" in mountinfo  # its -v mount
    own = own_container_from(mountinfo, dockerd.text("cgroup-private.txt"), None)
    assert own == OwnContainer(id=OWN_IDS["sidecar-ext4"])
    assert not own.matches(SIDECAR_NEIGHBOUR_ID)


def test_the_host_itself_is_in_no_container() -> None:
    mountinfo = dockerd.text("mountinfo-host-ext4.txt")
    assert "/overlay2/" in mountinfo  # a running container's rootfs is listed
    assert own_container_from(mountinfo, "0::/\n", "build-host") == NOT_IN_A_CONTAINER


def test_only_the_files_dockerd_bind_mounts_count() -> None:
    cid = OWN_IDS["dataroot-tmpfs"]
    # a container's folder bind-mounted at /etc/hostname by hand is no evidence when
    # the root is not one of those files of a container folder
    assert own_container_from(
        f"96 79 0:40 /containers/{cid} /etc/hostname rw - tmpfs tmpfs rw\n", None, None
    ) == (NOT_IN_A_CONTAINER)
    assert own_container_from(
        f"96 79 0:40 /containers/{cid}/mounts/shm /etc/hosts rw - tmpfs tmpfs rw\n", None, None
    ) == (NOT_IN_A_CONTAINER)
