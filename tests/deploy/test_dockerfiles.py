"""The Dockerfiles pass hadolint and keep their structural promises: multi-stage, the same
build stage in both running scripts/build.sh, non-root runtime, no secrets, the torch libs
at the path the worker's rpath names, and a .dockerignore that keeps secrets out."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import DOCKER, OVERLAYS, ROOT, one, render

FILES = {"coordinator": DOCKER / "coordinator.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"


def hadolint() -> str:
    exe = os.environ.get("CVDIST_HADOLINT") or shutil.which("hadolint")
    if not exe or not pathlib.Path(exe).exists():
        pytest.fail("no hadolint: run the tests through scripts/check-deploy.sh")
    return exe


def lint(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(path)],
                          capture_output=True, text=True, timeout=60)


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def build_stage_text(path: pathlib.Path) -> str:
    text = path.read_text()
    m = re.search(r"^# ---- build .*?^# ---- end of build stage", text, re.S | re.M)
    assert m, f"{path.name}: build stage markers missing"
    return m.group(0)


# ---- hadolint --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FILES))
def test_hadolint_passes(name):
    proc = lint(FILES[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\nADD x.tar /x\n")
    proc = lint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3003"):  # the :latest tag; cd in RUN
        assert rule in proc.stdout, proc.stdout


def test_hadolint_config_ignores_only_documented_rules():
    cfg = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert cfg["failure-threshold"] == "info"
    assert cfg["ignored"] == ["DL3008"]


# ---- structure --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FILES))
def test_multi_stage_non_root_runtime(name):
    st = stages(FILES[name])
    assert len(st) >= 2, "multi-stage: the toolchain stays out of the runtime image"
    final = st[-1]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric, so runAsNonRoot can verify it"
    assert int(user.split(":")[0]) != 0
    # Nothing after USER switches back to root.
    idx = max(i for i, (ins, _) in enumerate(final) if ins == "USER")
    assert not any(ins == "RUN" for ins, _ in final[idx:]), "no RUN after USER"
    assert not any(ins == "COPY" and "--from=build" not in rest and "--from" in rest for ins, rest in final)


def test_same_build_stage_in_both():
    assert build_stage_text(FILES["coordinator"]) == build_stage_text(FILES["worker"])


@pytest.mark.parametrize("name", sorted(FILES))
def test_build_runs_the_ci_build_script(name):
    build = stages(FILES[name])[0]
    runs = " ".join(rest for ins, rest in build if ins == "RUN")
    assert re.search(r"(^|\s)scripts/build\.sh(\s|$)", runs), "the image builds with scripts/build.sh, as CI does"
    assert "scripts/setup-libtorch.sh" in runs
    assert (ROOT / "scripts" / "build.sh").is_file(), "scripts/build.sh (the CI build) is missing"
    assert os.access(ROOT / "scripts" / "build.sh", os.X_OK), "scripts/build.sh must be executable"
    assert "CVDIST_TORCH_VENV" in (ROOT / "scripts" / "setup-libtorch.sh").read_text()


def env_of(stage) -> dict[str, str]:
    env = {}
    for ins, rest in stage:
        if ins == "ENV":
            for k, v in re.findall(r"(\w+)=(\S+)", rest):
                env[k] = v
    return env


def test_worker_torch_libs_at_the_rpath_location():
    st = stages(FILES["worker"])
    venv = env_of(st[0])["CVDIST_TORCH_VENV"]
    assert env_of(st[-1])["CVDIST_TORCH_VENV"] == venv, "the rpath points into the build stage's venv path"
    copies = [rest for ins, rest in st[-1] if ins == "COPY"]
    assert any(c.endswith(f" {venv}/") or c.endswith(f" {venv}") for c in copies)
    build_runs = " ".join(rest for ins, rest in st[0] if ins == "RUN")
    for lib in ("torch/lib", "nvidia"):  # libtorch; the CUDA runtime, cuDNN and NCCL
        assert f'$site/{lib}' in build_runs


def test_coordinator_image_has_no_libtorch():
    final = stages(FILES["coordinator"])[-1]
    text = " ".join(rest for _, rest in final)
    assert "torch" not in text and "cvdist-worker" not in text
    copies = [rest for ins, rest in final if ins == "COPY"]
    assert copies == ["--from=build /out/bin/cvdist /usr/local/bin/cvdist"]


SECRET_WORDS = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|PRIVATE|API_KEY|CREDENTIAL)", re.I)


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_secrets_baked_in(name):
    for ins, rest in instructions(FILES[name]):
        if ins in ("ENV", "ARG", "LABEL"):
            assert not SECRET_WORDS.search(rest), f"{ins} {rest}"
        if ins in ("COPY", "ADD"):
            assert not re.search(r"(token|\.pem|\.key|\.crt|id_rsa|\.env)\b", rest), f"{ins} {rest}"
        if ins == "RUN":
            assert "--mount=type=secret" not in rest or "id=" in rest
            assert not re.search(r"(curl|wget)\s", rest), "no downloads outside the package managers"


@pytest.mark.parametrize("name", sorted(FILES))
def test_entrypoint_and_ports_match_the_manifests(name):
    final = stages(FILES[name])[-1]
    ep = json.loads(next(rest for ins, rest in final if ins == "ENTRYPOINT"))
    assert ep[:2] == ["/usr/bin/tini", "--"], "an init as PID 1 forwards SIGTERM and reaps children"
    assert pathlib.PurePosixPath(ep[-1]).name == {"coordinator": "cvdist", "worker": "cvdist-worker"}[name]
    exposed = {int(p.split("/")[0]) for ins, rest in final if ins == "EXPOSE" for p in rest.split()}
    docs = render(OVERLAYS["gpu"])
    kind, obj = {"coordinator": ("Deployment", "cvdist-coordinator"), "worker": ("StatefulSet", "cvdist-worker")}[name]
    c = one(docs, kind, obj)["spec"]["template"]["spec"]["containers"][0]
    assert exposed == {p["containerPort"] for p in c["ports"]}


def test_dockerignore_files():
    def rules(p):
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    co = rules(DOCKER / "coordinator.Dockerfile.dockerignore")
    wo = rules(DOCKER / "worker.Dockerfile.dockerignore")
    assert co == wo
    for rule in ("target/", ".git/", "**/*.pem", "**/*.key", "**/token", "**/.env", "/data/", "/runs/"):
        assert rule in co, rule
    # Nothing the build needs is excluded.
    for needed in ("scripts", "Cargo.toml", "Cargo.lock", "common", "coordinator", "worker", "proto"):
        assert not any(r.strip("/").split("/")[0] == needed for r in co), needed
