"""Containers of docker-compose v1 and compose v2 map to the same services.

v1: real `config.v2.json` files of containers docker-compose 1.29.2 created on a real
dockerd (tests/fixtures/dockerd). v2 could not be run here (no package of it reaches
this machine): its labels are the ones docker/compose v2.29.7 sets, read in its source
(cmd/compose/compose.go: project, service, version, working_dir, config_files, oneoff;
pkg/compose/create.go prepareLabels: config-hash, container-number, depends_on;
pkg/compose/build.go: image; pkg/compose/run.go: one-offs named
`<project>-<service>-run-<slug[:12]>` with slug and oneoff=True).
"""

from __future__ import annotations

import pytest

from forwarder.sources.docker import (
    ContainerInfo,
    ContainerSelector,
    compose_names,
    parse_container,
    service_for,
)
from tests.fixtures import dockerd

SLUG = "2626a242b302d0241a5edd0f3f436c8582c6f929a1b9efa64d636e26fc571c3"


def v1(name: str) -> ContainerInfo:
    return parse_container((dockerd.HERE / f"compose-v1-{name}.json").read_bytes())


def compose_v2_labels(project: str, service: str, slug: str | None = None) -> dict[str, str]:
    """The labels compose v2 (2.29.7) sets on a service's container (`up`), or on a
    one-off's (`run`) with `slug`."""
    labels = {
        "com.docker.compose.config-hash": "89" * 32,
        "com.docker.compose.container-number": "1",
        "com.docker.compose.depends_on": "",
        "com.docker.compose.image": "sha256:" + "35" * 32,
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.project": project,
        "com.docker.compose.project.config_files": f"/tmp/dkc/{project}/compose.yaml",
        "com.docker.compose.project.working_dir": f"/tmp/dkc/{project}",
        "com.docker.compose.service": service,
        "com.docker.compose.version": "2.29.7",
    }
    if slug is not None:
        labels |= {"com.docker.compose.oneoff": "True", "com.docker.compose.slug": slug}
    return labels


def v2(name: str, service: str, slug: str | None = None) -> ContainerInfo:
    return ContainerInfo(id="3f" * 32, name=name, labels=compose_v2_labels("shop", service, slug))


def test_compose_v1_sets_these_labels_and_names() -> None:
    """What docker-compose 1.29.2 really wrote (no depends_on, image or replace)."""
    up, run = v1("shop_api_1"), v1("shop_api_run")
    assert up.name == "shop_api_1"
    assert up.labels == {
        "com.docker.compose.config-hash": up.labels["com.docker.compose.config-hash"],
        "com.docker.compose.container-number": "1",
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.project": "shop",
        "com.docker.compose.project.config_files": "docker-compose.yml",
        "com.docker.compose.project.working_dir": "/tmp/dkc/shop",
        "com.docker.compose.service": "api",
        "com.docker.compose.version": "1.29.2",
    }
    assert run.name == "shop_api_run_2626a242b302"
    assert run.labels == {
        "com.docker.compose.oneoff": "True",
        "com.docker.compose.project": "shop",
        "com.docker.compose.project.config_files": "docker-compose.yml",
        "com.docker.compose.project.working_dir": "/tmp/dkc/shop",
        "com.docker.compose.service": "api",
        "com.docker.compose.slug": SLUG,
        "com.docker.compose.version": "1.29.2",
    }


@pytest.mark.parametrize(
    "info",
    [
        v1("shop_api_1"),
        v1("shop_api_run"),
        v2("shop-api-1", "api"),
        v2("shop-api-run-2626a242b302", "api", SLUG),
    ],
    ids=["v1", "v1-run", "v2", "v2-run"],
)
def test_both_versions_map_to_the_compose_service(info: ContainerInfo) -> None:
    assert service_for(info, {}) == "api"
    assert service_for(info, {"api": "shop-api"}) == "shop-api"


def test_the_other_versions_name_is_known_only_for_a_name_compose_gave() -> None:
    assert compose_names(v1("shop_api_1")) == ("shop_api_1", "shop-api-1")
    assert compose_names(v1("shop_api_run")) == (
        "shop_api_run_2626a242b302",
        "shop-api-run-2626a242b302",
    )
    assert compose_names(v2("shop-api-1", "api")) == ("shop-api-1", "shop_api_1")
    assert compose_names(v2("shop-api-run-2626a242b302", "api", SLUG)) == (
        "shop-api-run-2626a242b302",
        "shop_api_run_2626a242b302",
    )
    # a container_name, or a container with no compose labels: its name only
    assert compose_names(v2("edge", "api")) == ("edge",)
    assert compose_names(ContainerInfo(id="3f" * 32, name="shop_api_1")) == ("shop_api_1",)


def test_services_keys_may_name_the_container_as_either_version_does() -> None:
    # a config written for v2 names keeps working on v1 containers, and back
    services = {"shop-api-1": "edge-api", "shop_worker_1": "jobs"}
    assert service_for(v1("shop_api_1"), services) == "edge-api"
    assert service_for(v2("shop-worker-1", "worker"), services) == "jobs"
    # the compose service's entry still wins, then the container's own name
    assert service_for(v1("shop_api_1"), {"api": "a", "shop-api-1": "b"}) == "a"
    assert service_for(v1("shop_api_1"), {"shop_api_1": "own", "shop-api-1": "other"}) == "own"
    # an unrelated container of another project is not matched by a look-alike
    other = ContainerInfo(id="3f" * 32, name="shop-api-1")
    assert service_for(other, {"shop_api_1": "edge-api"}) == "shop-api-1"


def test_name_globs_match_either_versions_name() -> None:
    no_db = ContainerSelector(exclude_names=("*-db-*",))
    db_v1 = ContainerInfo(
        id="3f" * 32,
        name="shop_db_1",
        labels={
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "db",
            "com.docker.compose.container-number": "1",
        },
    )
    assert no_db.rejects(db_v1) == "its name matches exclude_containers '*-db-*'"
    assert no_db.rejects(v1("shop_api_1")) is None
    only_api = ContainerSelector(include_names=("shop-api-*",))
    assert only_api.rejects(v1("shop_api_1")) is None
    assert only_api.rejects(db_v1) == "its name matches no include_containers glob"
