"""A client from another ecosystem: Python stubs generated from proto/ with grpcio-tools
submit and watch a job on a real coordinator with a real worker process."""
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CVDIST_BIN_DIR", ROOT / "target" / "release"))
TOKEN = "python-client-token"
WORKER_TOKEN = "python-worker-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_stubs(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
        f"--grpc_python_out={out}", str(ROOT / "proto" / "cvdist.proto"),
    ])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    import cvdist_pb2, cvdist_pb2_grpc  # noqa: E401
    return cvdist_pb2, cvdist_pb2_grpc


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


def test_python_client_submits_and_watches(tmp_path):
    pb, pb_grpc = generate_stubs(tmp_path / "stubs")
    port = free_port()
    env = dict(os.environ, CVDIST_TOKEN=TOKEN, CVDIST_WORKER_TOKEN=WORKER_TOKEN)
    logs = open(tmp_path / "procs.log", "w")
    procs = [subprocess.Popen(
        [str(BIN / "cvdist"), "coordinator", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state")],
        env=env, stdout=logs, stderr=logs)]
    try:
        wait_port(port)
        procs.append(subprocess.Popen(
            [str(BIN / "cvdist-worker"), "worker", "--coordinator", f"http://127.0.0.1:{port}", "--threads", "1",
             "--cache-dir", str(tmp_path / "cache")], env=env, stdout=logs, stderr=logs))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.CoordinatorStub(channel)
        auth = [("authorization", f"Bearer {TOKEN}")]

        # Without the token the coordinator refuses.
        try:
            stub.ListJobs(pb.ListJobsRequest())
            raise AssertionError("unauthenticated call succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED

        # The client token does not make this client a worker.
        q = queue.Queue()
        q.put(pb.WorkerMessage(register=pb.RegisterRequest(
            protocol_version=2, worker_id="-evil", data_addr="127.0.0.1:9")))
        try:
            next(stub.WorkerSession(iter(q.get, None), metadata=auth, timeout=10))
            raise AssertionError("the client token registered a worker")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
            assert "the client token cannot act as a worker" in e.details()
        finally:
            q.put(None)

        # Bad input is refused with a message naming the field.
        bad = pb.JobSpec(model="resnet9000", epochs=1, batch_size=32, lr=0.1, momentum=0.9,
                         min_workers=1, max_workers=1, dataset="synthetic", collective="auto")
        try:
            stub.SubmitJob(pb.SubmitJobRequest(spec=bad), metadata=auth)
            raise AssertionError("unknown model accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown model" in e.details()

        spec = pb.JobSpec(model="resnet20", epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4,
                          min_workers=1, max_workers=1, dataset="synthetic", train_samples=256,
                          test_samples=100, augment=True, collective="auto", max_restarts=1)
        job_id = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=auth).job_id
        assert job_id

        states, epochs, final = [], [], None
        for ev in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=auth, timeout=300):
            kind = ev.WhichOneof("event")
            if kind == "snapshot":
                states.append(pb.JobState.Name(ev.snapshot.state))
                final = ev.snapshot
            elif kind == "epoch":
                epochs.append(ev.epoch)
        assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED, (states, final)
        assert "JOB_STATE_RUNNING" in states
        assert [e.epoch for e in epochs] == [0, 1]
        assert all(0.0 <= e.test_acc <= 1.0 and e.train_loss > 0 for e in epochs)
        info = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=auth)
        assert len(info.history) == 2 and info.latest_checkpoint == "ckpt-e0002-s000000"
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()
        logs.close()
