"""The rendered manifests agree with each other: ports, probes, Services, DNS names, mounts,
NetworkPolicies, security settings, and what each overlay promises."""
from __future__ import annotations

import re
import urllib.parse

import pytest

from conftest import (NAMESPACE, STACKS, all_containers, container_env, find, flag_value, image_name, one,
                      pod_spec, port_of, secret_text, setting, workloads)

COORD, WORKER, TOKEN = "cvdist-coordinator", "cvdist-worker", "cvdist-token"
WORKER_TOKEN = "cvdist-worker-token"


@pytest.fixture(params=sorted(STACKS))
def stack(request, stacks):
    return request.param, stacks[request.param]


def coord_container(docs):
    return next(c for c in pod_spec(one(docs, "Deployment", COORD))["containers"] if c["name"] == "coordinator")


def worker_container(docs):
    return next(c for c in pod_spec(one(docs, "StatefulSet", WORKER))["containers"] if c["name"] == "worker")


def named_port(container, name) -> int:
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == name)


def target_port(svc_port, container) -> int:
    t = svc_port.get("targetPort", svc_port["port"])
    return named_port(container, t) if isinstance(t, str) else t


def selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        present, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e["values"]) or (op == "NotIn" and val in e["values"]) \
                or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def template_labels(obj) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def mount_for(pod, container, path: str):
    """(volume, mount) of the deepest mount containing `path`."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best[1]["mountPath"])):
            best = (next(v for v in pod["volumes"] if v["name"] == m["name"]), m)
    assert best, f"{path} is not on any volume of {container['name']}"
    return best


# ---- coordinator ------------------------------------------------------------------------------
def test_coordinator_port_probes_and_service_agree(stack):
    _, docs = stack
    c = coord_container(docs)
    listen = port_of(setting(docs, c, "--listen", "CVDIST_LISTEN"))
    assert setting(docs, c, "--listen", "CVDIST_LISTEN").startswith("0.0.0.0:"), "reachable from other pods"
    assert named_port(c, "grpc") == listen
    tls = container_env(docs, c).get("CVDIST_TLS_CERT") is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        if tls:  # the kubelet's grpc probe is plaintext: check the listener instead
            assert p["tcpSocket"]["port"] == listen
        else:
            assert p["grpc"]["port"] == listen, f"{probe} must use the gRPC health service on --listen"
    svc = one(docs, "Service", COORD)
    assert svc["spec"].get("clusterIP") != "None"
    assert selects({"matchLabels": svc["spec"]["selector"]}, template_labels(one(docs, "Deployment", COORD)))
    assert [target_port(p, c) for p in svc["spec"]["ports"]] == [listen]


def test_coordinator_is_a_single_replica_on_its_volume(stack):
    _, docs = stack
    dep = one(docs, "Deployment", COORD)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod, c = pod_spec(dep), coord_container(docs)
    for flag, env in (("--state-dir", "CVDIST_STATE_DIR"), ("--data", "CVDIST_DATA")):
        vol, _ = mount_for(pod, c, setting(docs, c, flag, env))
        claim = vol["persistentVolumeClaim"]["claimName"]
        pvc = one(docs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert selects(dep["spec"]["selector"], template_labels(dep))


# ---- workers --------------------------------------------------------------------------------------
def test_worker_data_plane_ports_and_dns_agree(stack):
    _, docs = stack
    sts, c = one(docs, "StatefulSet", WORKER), worker_container(docs)
    env = container_env(docs, c)
    data = port_of(setting(docs, c, "--data-listen", "CVDIST_DATA_LISTEN"))
    assert setting(docs, c, "--data-listen", "CVDIST_DATA_LISTEN").startswith("0.0.0.0:")
    assert named_port(c, "data") == data
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "a headless Service gives each pod a DNS name"
    assert svc["spec"].get("publishNotReadyAddresses") is True
    assert selects({"matchLabels": svc["spec"]["selector"]}, template_labels(sts))
    assert [target_port(p, c) for p in svc["spec"]["ports"]] == [data]
    # What peers dial: <pod>.<headless svc>.<namespace>.svc.cluster.local:<data port>.
    assert env["CVDIST_ADVERTISE_ADDR"] == \
        f"$(POD_NAME).{svc['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local:{data}"
    assert env["CVDIST_WORKER_ID"] == "$(POD_NAME)"
    names = [e["name"] for e in c["env"]]
    for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert env[var] == {"fieldRef": {"fieldPath": field}}
        # $(VAR) expands only variables defined earlier in the list.
        assert names.index(var) < names.index("CVDIST_ADVERTISE_ADDR")
    assert names.index("POD_NAME") < names.index("CVDIST_WORKER_ID")


def test_worker_statefulset_shape(stack):
    name, docs = stack
    sts = one(docs, "StatefulSet", WORKER)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert selects(sts["spec"]["selector"], template_labels(sts))
    anti = pod_spec(sts)["affinity"]["podAntiAffinity"]
    if gpus(worker_container(docs)):
        # A pod takes all of its node's GPUs: never two on one node.
        terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(t["topologyKey"] == "kubernetes.io/hostname"
                   and selects(t["labelSelector"], template_labels(sts)) for t in terms), name
    else:
        # CPU workers spread when there is room, but scheduling never blocks on it.
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti, name
        terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                   and selects(t["podAffinityTerm"]["labelSelector"], template_labels(sts)) for t in terms)
    c = worker_container(docs)
    vol, _ = mount_for(pod_spec(sts), c, setting(docs, c, "--cache-dir", "CVDIST_CACHE_DIR"))
    assert "emptyDir" in vol


def coordinator_urls(docs):
    """Every --coordinator the workers and clients use."""
    urls = [("worker", setting(docs, worker_container(docs), "--coordinator", "CVDIST_COORDINATOR"))]
    for job in find(docs, "Job"):
        c = pod_spec(job)["containers"][0]
        urls.append((job["metadata"]["name"], setting(docs, c, "--coordinator", "CVDIST_COORDINATOR")))
    return urls


def test_clients_and_workers_dial_the_coordinator_service(stack):
    _, docs = stack
    svc = one(docs, "Service", COORD)
    tls = container_env(docs, coord_container(docs)).get("CVDIST_TLS_CERT") is not None
    for who, url in coordinator_urls(docs):
        u = urllib.parse.urlsplit(url)
        assert u.scheme == ("https" if tls else "http"), who
        assert u.hostname in (COORD, f"{COORD}.{NAMESPACE}", f"{COORD}.{NAMESPACE}.svc",
                              f"{COORD}.{NAMESPACE}.svc.cluster.local"), who
        assert u.port in [p["port"] for p in svc["spec"]["ports"]], who


# ---- files the binaries read ------------------------------------------------------------------
def test_token_and_tls_files_are_mounted(stack):
    _, docs = stack
    for w in workloads(docs):
        pod = pod_spec(w)
        for _, c in all_containers(pod):
            env = container_env(docs, c)
            files = {k: env.get(k) for k in ("CVDIST_TOKEN_FILE", "CVDIST_WORKER_TOKEN_FILE", "CVDIST_TLS_CERT",
                                             "CVDIST_TLS_KEY", "CVDIST_TLS_CA", "CVDIST_TLS_CLIENT_CA")}
            files["--token-file"] = flag_value(c.get("args", []), "--token-file")
            files["--tls-ca"] = flag_value(c.get("args", []), "--tls-ca")
            if "command" in c:  # a shell script: only the files it reads
                files = {k: v for k, v in files.items() if k in " ".join(c["command"])}
            for what, path in files.items():
                if not isinstance(path, str):
                    continue
                vol, m = mount_for(pod, c, path)
                assert "secret" in vol and m.get("readOnly") is True, f"{what} {path}"
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                items = vol["secret"].get("items")
                if vol["secret"]["secretName"] in (TOKEN, WORKER_TOKEN):
                    assert key in one(docs, "Secret", vol["secret"]["secretName"])["data"]
                if items:
                    assert key in [i["path"] for i in items], f"{what} {path}"


def test_secret_files_are_readable_by_the_pod_user(stack):
    _, docs = stack
    for w in workloads(docs):
        pod = pod_spec(w)
        for v in pod.get("volumes", []):
            if "secret" in v and not v["secret"].get("defaultMode", 0o644) & 0o004:
                assert pod["securityContext"].get("fsGroup"), f"{w['metadata']['name']}: {v['name']}"


def test_committed_token_is_the_refused_placeholder(stack):
    _, docs = stack
    assert "REPLACE_ME" in secret_text(docs, TOKEN, "token")
    assert "REPLACE_ME" in secret_text(docs, WORKER_TOKEN, "token")
    assert secret_text(docs, TOKEN, "token") != secret_text(docs, WORKER_TOKEN, "token")
    init = [c for c in pod_spec(one(docs, "Deployment", COORD)).get("initContainers", []) if c["name"] == "prepare"]
    script = init[0]["command"][-1] if init else ""
    assert 'for f in "$CVDIST_TOKEN_FILE" "$CVDIST_WORKER_TOKEN_FILE"; do' in script
    assert "grep -q 'REPLACE_ME' \"$f\"" in script
    env = container_env(docs, init[0])
    for var in re.findall(r"\$\{?(CVDIST_[A-Z_]+)", script):
        assert var in env, f"the prepare script uses {var}"
    # The coordinator and its init container see the same token files.
    for var in ("CVDIST_TOKEN_FILE", "CVDIST_WORKER_TOKEN_FILE"):
        assert env[var] == container_env(docs, coord_container(docs))[var]


def secrets_mounted(docs, workload) -> set[str]:
    pod = pod_spec(workload)
    vols = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return {vols[m["name"]] for _, c in all_containers(pod) for m in c.get("volumeMounts", []) if m["name"] in vols}


def test_each_credential_is_mounted_only_where_it_is_used(stack):
    """The client token only where `cvdist submit` runs (and the coordinator),
    the worker credential only in worker pods (and the coordinator)."""
    _, docs = stack
    tokens = {TOKEN, WORKER_TOKEN}
    assert secrets_mounted(docs, one(docs, "Deployment", COORD)) & tokens == tokens
    assert secrets_mounted(docs, one(docs, "StatefulSet", WORKER)) & tokens == {WORKER_TOKEN}
    env = container_env(docs, worker_container(docs))
    assert "CVDIST_TOKEN_FILE" not in env and env["CVDIST_WORKER_TOKEN_FILE"].startswith("/etc/cvdist/worker-token/")
    for job in find(docs, "Job"):
        assert secrets_mounted(docs, job) & tokens == {TOKEN}, job["metadata"]["name"]


def test_tls_is_on_by_default(stack):
    """The tokens travel only over TLS; clients and workers verify the CA."""
    _, docs = stack
    env = container_env(docs, coord_container(docs))
    assert env.get("CVDIST_TLS_CERT") and env.get("CVDIST_TLS_KEY")
    assert setting(docs, worker_container(docs), "--tls-ca", "CVDIST_TLS_CA")
    for job in find(docs, "Job"):
        assert setting(docs, pod_spec(job)["containers"][0], "--tls-ca", "CVDIST_TLS_CA"), job["metadata"]["name"]
    for who, url in coordinator_urls(docs):
        assert url.startswith("https://"), who


def test_site_overlay_replaces_the_token(tmp_path):
    from conftest import OVERLAYS, compose, render  # noqa: PLC0415
    (tmp_path / "token").write_text("0123456789abcdef\n")
    path = compose(tmp_path, OVERLAYS["gpu"], [], extra=(
        "secretGenerator:\n  - name: cvdist-token\n    behavior: replace\n    files:\n      - token=token\n"
        "    options:\n      disableNameSuffixHash: true\n"))
    docs = render(path)
    assert secret_text(docs, TOKEN, "token") == "0123456789abcdef\n"


# ---- security -------------------------------------------------------------------------------------
def test_pods_are_locked_down(stack):
    _, docs = stack
    for w in workloads(docs):
        name, pod = w["metadata"]["name"], pod_spec(w)
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("enableServiceLinks") is False, f"{name}: service env vars share the CVDIST_ prefix"
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for kind, c in all_containers(pod):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert csc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add"), c["name"]
            assert not csc.get("privileged"), c["name"]
            assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
            if kind == "main":  # a writable scratch dir on a read-only root
                vol, _ = mount_for(pod, c, "/tmp")
                assert "emptyDir" in vol, f"{name}/{c['name']}"
        for v in pod.get("volumes", []):
            assert "hostPath" not in v, f"{name}: {v['name']}"


def test_images_are_the_project_images(stack):
    _, docs = stack
    expect = {"Deployment": "cvdist-coordinator", "StatefulSet": "cvdist-worker", "Job": "cvdist-coordinator"}
    for w in workloads(docs):
        for _, c in all_containers(pod_spec(w)):
            assert image_name(c["image"]) == expect[w["kind"]], c["image"]


def test_everything_is_in_the_namespace(stack):
    _, docs = stack
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
        else:
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


# ---- network policy -----------------------------------------------------------------------------
def admitted(docs, dst_labels: dict, src_labels: dict, port: int, protocol: str = "TCP") -> bool:
    """Ingress to a pod in the namespace from another pod in it, per the NetworkPolicies. A
    rule's port entry without `port` admits every port of its protocol (TCP if unset)."""
    policies = [p for p in find(docs, "NetworkPolicy")
                if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], dst_labels)]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            entries = rule.get("ports")
            if entries and not any(q.get("protocol", "TCP") == protocol and q.get("port") in (None, port)
                                   for q in entries):
                continue
            peers = rule.get("from")
            if peers is None or any("podSelector" in peer and "namespaceSelector" not in peer
                                    and selects(peer["podSelector"], src_labels) for peer in peers):
                return True
    return False


def test_admitted_reads_port_less_rules():
    pol = {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": {
        "podSelector": {"matchLabels": {"a": "1"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"a": "1"}}}], "ports": [{"protocol": "TCP"}]}]}}
    assert admitted([pol], {"a": "1"}, {"a": "1"}, 40000)
    assert not admitted([pol], {"a": "1"}, {"a": "1"}, 40000, "UDP")
    assert not admitted([pol], {"a": "1"}, {"a": "2"}, 40000)
    pol["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP", "port": 29500}]
    assert admitted([pol], {"a": "1"}, {"a": "1"}, 29500) and not admitted([pol], {"a": "1"}, {"a": "1"}, 29501)


def test_network_policies(stack):
    _, docs = stack
    coord = template_labels(one(docs, "Deployment", COORD))
    worker = template_labels(one(docs, "StatefulSet", WORKER))
    cp = port_of(setting(docs, coord_container(docs), "--listen", "CVDIST_LISTEN"))
    dp = port_of(setting(docs, worker_container(docs), "--data-listen", "CVDIST_DATA_LISTEN"))
    client = {"app.kubernetes.io/name": "cvdist", "cvdist.io/role": "client"}
    for job in find(docs, "Job"):
        client = template_labels(job)
        assert admitted(docs, coord, client, cp), "the submit Job reaches the coordinator"
    stranger = {"app": "something-else"}
    # Worker to worker: every TCP port. The ring's port, each --gpus rank's port, and the
    # ephemeral ports NCCL's bootstrap and socket transport listen on.
    for port in (dp, dp + 7, 1024, 32768, 45678, 60999, 65535):
        assert admitted(docs, worker, worker, port), f"worker -> worker TCP {port}"
    assert not admitted(docs, worker, worker, dp, "UDP"), "UDP stays closed"
    for port in (dp, dp + 1, 45678):
        assert not admitted(docs, worker, coord, port)
        assert not admitted(docs, worker, client, port)
        assert not admitted(docs, worker, stranger, port)
        assert not admitted(docs, worker, {"app.kubernetes.io/name": "cvdist"}, port), "a worker label is needed"
    assert admitted(docs, coord, worker, cp)
    assert admitted(docs, coord, client, cp)
    assert not admitted(docs, coord, stranger, cp)
    assert not admitted(docs, coord, {"app.kubernetes.io/name": "cvdist"}, cp)
    assert not admitted(docs, coord, worker, cp + 1), "nothing but the gRPC port on the coordinator"
    # The worker rule names no namespaceSelector: only pods of this namespace (this release).
    for p in find(docs, "NetworkPolicy"):
        for rule in p["spec"]["ingress"]:
            assert all("namespaceSelector" not in peer and "ipBlock" not in peer for peer in rule["from"])


# ---- what each overlay promises --------------------------------------------------------------------
def gpus(container) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def quantity(text: str) -> float:
    """Kubernetes memory quantity in bytes ('16Gi', '512Mi', '1G', plain bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(text))
    assert m, f"unparsed quantity {text!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


GPUS_PER_NODE = 8


def test_gpu_overlay(stacks):
    docs = stacks["gpu"]
    sts, c = one(docs, "StatefulSet", WORKER), worker_container(docs)
    pod = pod_spec(sts)
    # One pod per node with all of its GPUs, one worker process per GPU.
    assert gpus(c) == GPUS_PER_NODE and int(c["resources"]["requests"]["nvidia.com/gpu"]) == GPUS_PER_NODE
    assert c["args"][0] == "worker" and flag_value(c["args"], "--gpus") == "all"
    assert setting(docs, c, "--device", "CVDIST_DEVICE") == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The data-plane ports of all ranks fit: 29500 .. 29500+7.
    dp = port_of(setting(docs, c, "--data-listen", "CVDIST_DATA_LISTEN"))
    assert dp + GPUS_PER_NODE - 1 <= 65535
    # Memory-backed /dev/shm sized for 8 ranks' NCCL buffers (at least NVIDIA's 1 GiB per
    # container, per rank), inside the memory limit it counts against.
    vol, _ = mount_for(pod, c, "/dev/shm")
    assert vol["emptyDir"]["medium"] == "Memory"
    shm = quantity(vol["emptyDir"]["sizeLimit"])
    assert shm >= GPUS_PER_NODE * 2**30, f"/dev/shm {vol['emptyDir']['sizeLimit']} for {GPUS_PER_NODE} ranks"
    limit, request = quantity(c["resources"]["limits"]["memory"]), quantity(c["resources"]["requests"]["memory"])
    assert limit >= request + shm
    # Each rank keeps its own data set copy (~180 MB) in the cache.
    vol, _ = mount_for(pod, c, setting(docs, c, "--cache-dir", "CVDIST_CACHE_DIR"))
    assert quantity(vol["emptyDir"]["sizeLimit"]) >= GPUS_PER_NODE * 512 * 2**20
    # The example job: 8 x 128 on one node's 8 GPUs, linearly scaled LR with warmup.
    job = one(docs, "Job")
    args = pod_spec(job)["containers"][0]["args"]
    assert args[0] == "submit"
    assert (flag_value(args, "--model"), flag_value(args, "--epochs"), flag_value(args, "--workers"),
            flag_value(args, "--batch-size"), flag_value(args, "--follow")) == ("resnet50", "200", "8", "128", True)
    assert (flag_value(args, "--lr"), flag_value(args, "--scale-lr"), flag_value(args, "--warmup-epochs")) == \
        ("0.1", True, "5")
    # bf16 autocast on H100/H200-class GPUs.
    assert flag_value(args, "--precision") == "bf16"
    assert int(flag_value(args, "--workers")) <= sts["spec"]["replicas"] * GPUS_PER_NODE


def test_cpu_smoke_overlay(stacks):
    docs = stacks["cpu-smoke"]
    sts, c = one(docs, "StatefulSet", WORKER), worker_container(docs)
    assert sts["spec"]["replicas"] == 2
    assert flag_value(c["args"], "--device") == "cpu"
    for w in workloads(docs):
        for _, cc in all_containers(pod_spec(w)):
            assert "nvidia.com/gpu" not in str(cc["resources"])
        assert "tolerations" not in pod_spec(w)
    assert "Gi" not in c["resources"]["requests"]["memory"] or int(c["resources"]["requests"]["memory"][:-2]) <= 2
    args = pod_spec(one(docs, "Job"))["containers"][0]["args"]
    assert int(flag_value(args, "--workers")) <= sts["spec"]["replicas"]


def test_job_does_not_resubmit(stack):
    _, docs = stack
    for job in find(docs, "Job"):
        assert job["spec"]["backoffLimit"] == 0, "a retry would submit a second training job"
        assert pod_spec(job)["restartPolicy"] == "Never"
