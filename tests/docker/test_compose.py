"""No Docker engine here: the image and compose files are checked by what can run without one."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from scoring.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_mounts_exist() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"hydra-rm", "prometheus", "grafana"}
    build = compose["services"]["hydra-rm"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
    gpu = yaml.safe_load((ROOT / "docker" / "compose.gpu.yml").read_text())
    assert set(gpu["services"]) <= set(compose["services"])


def test_compose_environment_names_real_settings() -> None:
    fields = {f"HYDRA_RM_{n.upper()}" for n in Settings.model_fields}
    env = _compose()["services"]["hydra-rm"].get("environment", {})
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    names = set(env) | set(re.findall(r"\b(HYDRA_RM_[A-Z_]+)=", dockerfile))
    assert names and names <= fields, names - fields


def test_prometheus_scrapes_the_compose_service() -> None:
    prom = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    ports = _compose()["services"]["hydra-rm"]["ports"]
    assert targets == [f"hydra-rm:{ports[0].split(':')[1]}"]
    for rule_file in prom["rule_files"]:
        assert (ROOT / "docker" / "prometheus" / rule_file.split()[0]).is_file()


def test_dockerfile_copies_real_paths_and_runs_the_cli() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert 'CMD ["hydra-rm", "serve"]' in dockerfile  # exec form: SIGTERM reaches the server
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'hydra-rm = "cli.main:app"' in pyproject
    assert "/readyz" in dockerfile
