"""The command-line contract the manifests are written against (flag -> env var clap reads
when the flag is absent). The manifests must stay inside it, and the real binaries' --help
must list everything the manifests use (test_cli_contract.py checks both)."""

CONTRACT = {
    ("cvdist", "coordinator"): {
        "--listen": "CVDIST_LISTEN",
        "--state-dir": "CVDIST_STATE_DIR",
        "--token-file": "CVDIST_TOKEN_FILE",
        "--worker-token-file": "CVDIST_WORKER_TOKEN_FILE",
        "--data": "CVDIST_DATA",
        "--tls-cert": "CVDIST_TLS_CERT",
        "--tls-key": "CVDIST_TLS_KEY",
        "--tls-client-ca": "CVDIST_TLS_CLIENT_CA",
        "--heartbeat-timeout": "CVDIST_HEARTBEAT_TIMEOUT",
        None: "CVDIST_TOKEN",  # the token itself, env only
    },
    ("cvdist-worker", "worker"): {
        "--coordinator": "CVDIST_COORDINATOR",
        "--device": "CVDIST_DEVICE",
        "--data": "CVDIST_DATA",
        "--cache-dir": "CVDIST_CACHE_DIR",
        "--data-listen": "CVDIST_DATA_LISTEN",
        "--advertise-addr": "CVDIST_ADVERTISE_ADDR",
        "--worker-id": "CVDIST_WORKER_ID",
        "--threads": "CVDIST_THREADS",
        "--worker-token-file": "CVDIST_WORKER_TOKEN_FILE",
        "--tls-ca": "CVDIST_TLS_CA",
        "--gpus": "CVDIST_GPUS",
    },
    ("cvdist", "submit"): {
        "--coordinator": "CVDIST_COORDINATOR",
        "--model": None,
        "--epochs": None,
        "--workers": None,
        "--batch-size": None,
        "--lr": None,
        "--scale-lr": None,
        "--warmup-epochs": None,
        "--precision": None,
        "--follow": None,
        "--token-file": "CVDIST_TOKEN_FILE",
        "--tls-ca": "CVDIST_TLS_CA",
    },
}

# Environment variables the pods set that are not options of the binaries: the downward-API
# values used in $(VAR) expansion.
HELPER_ENV = {"POD_NAME", "POD_NAMESPACE"}
