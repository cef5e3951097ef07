"""Every overlay renders with kustomize and every object validates against the Kubernetes
JSON schemas (strict: unknown fields are errors), and broken input is caught."""
from __future__ import annotations

import copy
import pathlib
import subprocess

import kubernetes_validate
import pytest

from conftest import JOBS, K8S, K8S_VERSION, OVERLAYS, STACKS, compose, kubectl, kustomize_raw, one, render


def schema_errors(docs) -> list[str]:
    errors = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}: {e}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}: no schema: {e}")
    return errors


def test_validates_against_the_newest_schemas_available():
    assert kubernetes_validate.latest_version() == K8S_VERSION


def test_kubectl_is_recent():
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, check=True).stdout
    assert "Kustomize Version: v5" in out, out


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stack_renders_and_validates(stacks, name):
    docs = stacks[name]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
            "StatefulSet", "NetworkPolicy"} <= kinds
    assert schema_errors(docs) == []


def test_submit_base_renders_and_validates():
    assert schema_errors(render(K8S / "jobs" / "submit")) == []


def test_base_renders_and_validates():
    assert schema_errors(render(K8S / "base")) == []


# ---- negative tests: the checks above do catch mistakes ----------------------------------
def _deployment(stacks):
    return copy.deepcopy(one(stacks["gpu"], "Deployment", "cvdist-coordinator"))


def test_schema_rejects_wrong_type(stacks):
    d = _deployment(stacks)
    d["spec"]["replicas"] = "one"
    assert schema_errors([d])


def test_schema_rejects_unknown_field(stacks):
    d = _deployment(stacks)
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert schema_errors([d])


def test_schema_rejects_missing_required_field(stacks):
    d = _deployment(stacks)
    del d["spec"]["template"]["spec"]["containers"][0]["name"]
    assert schema_errors([d])


def test_schema_rejects_named_port_in_grpc_probe(stacks):
    # A grpc probe takes a port number only; "grpc" (the port's name) is invalid.
    d = _deployment(stacks)
    # (The stacks probe the TCP listener since TLS is in the base; a valid grpc probe is
    # built first, so only the named port can be what the schema rejects.)
    probe = d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe.pop("tcpSocket", None)
    probe["grpc"] = {"port": 50051}
    assert schema_errors([d]) == []
    probe["grpc"]["port"] = "grpc"
    assert schema_errors([d])


def test_schema_rejects_unknown_kind():
    assert schema_errors([{"apiVersion": "v1", "kind": "Deploymnet", "metadata": {"name": "x"}}])


def test_kustomize_rejects_missing_resource(tmp_path):
    path = compose(tmp_path, OVERLAYS["gpu"], [], extra="patches:\n  - path: does-not-exist.yaml\n")
    proc = kustomize_raw(path)
    assert proc.returncode != 0


def test_kustomize_rejects_patch_of_missing_object(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: no-such-worker\nspec:\n  replicas: 3\n")
    path = compose(tmp_path, OVERLAYS["gpu"], [], extra="patches:\n  - path: p.yaml\n")
    assert kustomize_raw(path).returncode != 0


def test_every_kustomization_is_covered():
    """A new overlay or job directory must be added to the lists the tests render."""
    dirs = {p.parent for p in K8S.rglob("kustomization.yaml")
            if not p.parent.relative_to(K8S).as_posix().startswith("overlays/local")}  # site overlays
    covered = set(OVERLAYS.values()) | set(JOBS.values()) | {K8S / "base", K8S / "jobs" / "submit"} \
        | {K8S / "components" / "tls"} \
        | {K8S / "components" / c for _, _, comps in STACKS.values() for c in comps}
    assert dirs - covered == set(), "render and validate these in tests/deploy"
