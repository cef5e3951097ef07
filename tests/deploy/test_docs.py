"""docs/deploy-kubernetes.md: its site-overlay examples render to what it promises, and the
repository paths and commands it names exist."""
from __future__ import annotations

import re
import shutil

from conftest import K8S, ROOT, one, render, secret_text

DOC = ROOT / "docs" / "deploy-kubernetes.md"


def heredocs(text: str) -> list[str]:
    return re.findall(r"cat > kustomization\.yaml <<EOF\n(.*?)\nEOF", text, re.S)


def test_site_overlay_examples_render(tmp_path):
    text = DOC.read_text()
    site, job = heredocs(text)[:2]
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("local*"))
    env = {"$REGISTRY": "registry.example.com/ml", "$TAG": "abc123"}
    for k, v in env.items():
        site, job = site.replace(k, v), job.replace(k, v)
    local = tree / "overlays" / "local"
    local.mkdir()
    (local / "kustomization.yaml").write_text(site)
    (local / "token").write_text("f" * 64 + "\n")
    (local / "worker-token").write_text("e" * 64 + "\n")
    docs = render(local)
    assert secret_text(docs, "cvdist-token", "token") == "f" * 64 + "\n"
    assert secret_text(docs, "cvdist-worker-token", "token") == "e" * 64 + "\n"
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert images == {"registry.example.com/ml/cvdist-coordinator:abc123", "registry.example.com/ml/cvdist-worker:abc123"}
    assert one(docs, "StatefulSet", "cvdist-worker")["spec"]["replicas"] == 1  # one 8-GPU node
    lj = tree / "overlays" / "local-job"
    lj.mkdir()
    (lj / "kustomization.yaml").write_text(job)
    jd = render(lj)
    assert one(jd, "Job")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/ml/cvdist-coordinator:abc123"


def test_named_paths_exist():
    text = DOC.read_text()
    for path in set(re.findall(r"(?<![\w/.])((?:deploy|scripts|tests|docs)/[\w./-]+)", text)):
        path = path.rstrip(".")
        if "/local" in path:  # the site overlay the reader creates
            continue
        assert (ROOT / path).exists(), path


def test_covers_the_operations():
    text = DOC.read_text()
    for needle in ("kubectl apply -k", "kubectl -n cvdist scale statefulset cvdist-worker", "kubectl -n cvdist cp",
                   "metrics.jsonl", "summary.json", "checkpoints/", "jobs/<job-id>", "docker build",
                   "docker push", "## 7. Upgrading", "overlays/gpu", "overlays/cpu-smoke"):
        assert needle in text, needle
