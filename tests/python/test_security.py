"""A worker trusts no name from its coordinator. A fake coordinator
written with grpcio hands a real `cvdist-worker` process assignments whose job id,
checkpoint name or peer entries would become paths or dial targets outside the worker's
cache; the worker refuses each one (reporting the failure) and touches nothing outside its
cache. The same run shows the worker authenticates with the worker credential, not the
client token."""
import os
import queue
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from test_grpc_client import BIN, free_port, generate_stubs

CLIENT_TOKEN = "python-client-token"
WORKER_TOKEN = "python-worker-token"


def make_fake(pb, pb_grpc, assignments):
    class Fake(pb_grpc.CoordinatorServicer):
        def __init__(self):
            self.reports = queue.Queue()
            self.auth = []
            self.failures = []

        def WorkerSession(self, request_iterator, context):
            self.auth.append(dict(context.invocation_metadata()).get("authorization"))
            first = next(request_iterator)
            yield pb.CoordinatorMessage(registered=pb.Registered(worker_id=first.register.worker_id, session_key="k"))

            def read():
                for m in request_iterator:
                    if m.WhichOneof("msg") == "report":
                        self.reports.put(m.report)

            threading.Thread(target=read, daemon=True).start()
            for a in assignments:
                yield pb.CoordinatorMessage(assignment=a)
                while True:
                    r = self.reports.get(timeout=120)
                    if r.job_id == a.job_id and r.WhichOneof("kind") in ("failed", "finished"):
                        self.failures.append((r.job_id, r.WhichOneof("kind"), r.failed))
                        break
            while context.is_active():
                time.sleep(0.1)

    return Fake()


def test_worker_refuses_names_from_a_malicious_coordinator(tmp_path):
    pb, pb_grpc = generate_stubs(tmp_path / "stubs")
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cache = tmp_path / "cache"
    spec = pb.JobSpec(model="resnet20", epochs=1, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      min_workers=1, max_workers=1, dataset="synthetic", train_samples=64, test_samples=32,
                      collective="auto", max_restarts=0)

    def assignment(job_id, checkpoint="", peer_id="w0", peer_addr="127.0.0.1:9"):
        return pb.Assignment(job_id=job_id, attempt=0, rank=0, world_size=1, spec=spec, checkpoint=checkpoint,
                             peers=[pb.Peer(rank=0, worker_id=peer_id, data_addr=peer_addr)], session_secret="s")

    cases = [
        (assignment("../../victim_dir"),
         "refusing the assignment: job id \"../../victim_dir\" must be 1-64 characters from [A-Za-z0-9._-] "
         "and not start with '.'"),
        (assignment("j0002-resnet20", checkpoint="../../../victim_dir/ckpt-e0001-s000000"),
         "refusing the assignment: checkpoint name \"../../../victim_dir/ckpt-e0001-s000000\" is not of the form "
         "ckpt-eEEEE-sSSSSSS"),
        (assignment("j0003-resnet20", peer_id="../victim_dir"),
         "refusing the assignment: worker id \"../victim_dir\" must be 1-64 characters from [A-Za-z0-9._-] "
         "and not start with '.'"),
        (assignment("j0004-resnet20", peer_addr="evil host\x1b[2K:1"),
         "refusing the assignment: data address \"evil host\\u{1b}[2K:1\" is not HOST:PORT "
         "(a DNS name or IP address and a port 1-65535)"),
    ]
    fake = make_fake(pb, pb_grpc, [a for a, _ in cases])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    env = dict(os.environ, CVDIST_TOKEN=CLIENT_TOKEN, CVDIST_WORKER_TOKEN=WORKER_TOKEN, CVDIST_LOG="info")
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "cvdist-worker"), "worker", "--coordinator", f"http://127.0.0.1:{port}", "--threads", "1",
         "--device", "cpu", "--worker-id", "w0", "--cache-dir", str(cache)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 120
        while len(fake.failures) < len(cases) and time.time() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        assert [f[2] for f in fake.failures] == [msg for _, msg in cases], (tmp_path / "worker.log").read_text()
        assert all(kind == "failed" for _, kind, _ in fake.failures)
        assert fake.auth and all(a == f"Bearer {WORKER_TOKEN}" for a in fake.auth), fake.auth
        # Nothing outside the cache was touched; nothing was even created for the bad jobs.
        assert (victim / "precious.txt").read_text() == "keep me"
        jobs = cache / "jobs"
        assert not jobs.exists() or sorted(p.name for p in jobs.iterdir()) == [], list(jobs.iterdir())
    finally:
        worker.kill()
        worker.wait()
        server.stop(0)
        log.close()
