"""Shared helpers for the deployment tests (run by scripts/check-deploy.sh).

Rendering uses the kubectl named by $CVDIST_KUBECTL (the script provides a pinned one);
the binaries' --help comes from ${CVDIST_BIN_DIR:-target/release}.
"""
from __future__ import annotations

import base64
import functools
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
NAMESPACE = "cvdist"

# Kubernetes version the objects are validated against: the newest kubernetes-validate has.
K8S_VERSION = "1.37.0"

OVERLAYS = {"gpu": K8S / "overlays" / "gpu", "cpu-smoke": K8S / "overlays" / "cpu-smoke"}
JOBS = {"resnet50-gpu": K8S / "jobs" / "resnet50-gpu", "smoke-cpu": K8S / "jobs" / "smoke-cpu"}
# Each deployable stack: an overlay plus the example Job meant for it (TLS is in the base;
# a third element would add components, composed in a scratch kustomization).
STACKS = {
    "gpu": ("gpu", "resnet50-gpu", []),
    "cpu-smoke": ("cpu-smoke", "smoke-cpu", []),
}

# What each image runs: its Dockerfile (the ENTRYPOINT names the binary).
IMAGE_DOCKERFILES = {
    "cvdist-coordinator": DOCKER / "coordinator.Dockerfile",
    "cvdist-worker": DOCKER / "worker.Dockerfile",
}


def kubectl() -> str:
    exe = os.environ.get("CVDIST_KUBECTL") or shutil.which("kubectl")
    if not exe:
        pytest.fail("no kubectl: run the tests through scripts/check-deploy.sh")
    return exe


def kustomize_raw(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=None)
def _render_cached(path: str) -> str:
    proc = kustomize_raw(pathlib.Path(path))
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return proc.stdout


def render(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_cached(str(path))) if d]


def compose(tmp: pathlib.Path, overlay: pathlib.Path, components: list[str], extra: str = "") -> pathlib.Path:
    """Writes a kustomization in `tmp` that builds on `overlay` (as a site overlay would)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, tmp)  # kustomize refuses absolute paths  # noqa: E731
    comps = "".join(f"  - {rel(K8S / 'components' / c)}\n" for c in components)
    text = (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel(overlay)}\n" + (f"components:\n{comps}" if comps else "") + extra
    )
    (tmp / "kustomization.yaml").write_text(text)
    return tmp


@functools.lru_cache(maxsize=None)
def _stack_docs(name: str, tmp: str) -> tuple:
    overlay, job, components = STACKS[name]
    path = OVERLAYS[overlay]
    if components:
        path = compose(pathlib.Path(tmp) / name, path, components)
    return tuple(render(path)) + (tuple(render(JOBS[job])) if job else ())


@pytest.fixture(scope="session")
def stacks(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("stacks")
    return {name: list(_stack_docs(name, str(tmp))) for name in STACKS}


# ---- object helpers ------------------------------------------------------------------------
def find(docs, kind, name=None):
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return out


def one(docs, kind, name=None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def all_containers(spec):
    return [("init", c) for c in spec.get("initContainers", [])] + [("main", c) for c in spec["containers"]]


def container_env(docs, container) -> dict[str, object]:
    """The container's environment: envFrom ConfigMaps/Secrets first, then env (later wins).
    Values are strings, or the valueFrom dict for references."""
    env: dict[str, object] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = one(docs, "ConfigMap", src["configMapRef"]["name"])
            env.update({src.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
        elif "secretRef" in src:
            sec = one(docs, "Secret", src["secretRef"]["name"])
            env.update({src.get("prefix", "") + k: base64.b64decode(v).decode() for k, v in sec.get("data", {}).items()})
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e.get("valueFrom")
    return env


def flag_value(args: list[str], flag: str):
    """Value of `--flag=V` or `--flag V` in args; True for a bare flag; None if absent."""
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else None
            return nxt if nxt is not None and not nxt.startswith("-") else True
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def setting(docs, container, flag: str, env_name: str):
    """What the binary will see for an option: the flag if given, else its env var."""
    v = flag_value(container.get("args", []), flag)
    return v if v is not None else container_env(docs, container).get(env_name)


def port_of(addr: str) -> int:
    m = re.search(r":(\d+)$", addr)
    assert m, f"no port in {addr!r}"
    return int(m.group(1))


def image_name(image: str) -> str:
    """'registry/x/cvdist-worker:tag' -> 'cvdist-worker'."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def secret_text(docs, name, key) -> str:
    return base64.b64decode(one(docs, "Secret", name)["data"][key]).decode()
