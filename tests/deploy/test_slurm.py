"""deploy/slurm/cvdist.sbatch: the allocation it asks for, and every cvdist flag it passes
exists in the real binaries' --help. (scripts/slurm-smoke.sh runs it on a real Slurm.)"""
from __future__ import annotations

import re
import shlex
import subprocess

from conftest import DEPLOY, ROOT
from test_cli_contract import help_has_flag, help_text

SBATCH = DEPLOY / "slurm" / "cvdist.sbatch"


def directives() -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            opt = line.split(None, 1)[1]
            k, _, v = opt.partition("=")
            out[k] = v or True
    return out


def test_script_parses():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm-smoke.sh")], check=True)


def test_allocation_one_task_per_gpu_and_requeue():
    d = directives()
    assert d["--gpus-per-task"] == "1", "one task (one worker) per GPU"
    assert int(d["--ntasks-per-node"]) == 8
    assert d["--requeue"] is True and d["--open-mode"] == "append"
    # Directives must come before the first command, or sbatch ignores them.
    text = SBATCH.read_text().splitlines()
    first_cmd = next(i for i, l in enumerate(text) if l.strip() and not l.startswith("#"))
    assert max(i for i, l in enumerate(text) if l.startswith("#SBATCH")) < first_cmd


def invoked_flags() -> dict[str, set[str]]:
    """cvdist subcommand -> the --flags the script passes to it."""
    text = SBATCH.read_text()
    # Join continuation lines and look at each `cvdist SUB ...` / `"$CVDIST_EXE" SUB ...`.
    text = re.sub(r"\\\n\s*", " ", text)
    found: dict[str, set[str]] = {}
    for m in re.finditer(r'(?:"\$cvdist"|"\$CVDIST_EXE")\s+([a-z][a-z-]*)([^\n|&;]*)', text):
        sub, rest = m.group(1), m.group(2)
        found.setdefault(sub, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest))
    # coordinator_args=(coordinator --listen ...) is an array; the `+=(--data ...)` too.
    for m in re.finditer(r"coordinator_args\+?=\(([^)]*)\)", text):
        found.setdefault("coordinator", set()).update(re.findall(r"(--[a-z][a-z-]*)", m.group(1)))
    return found


def test_every_flag_the_script_passes_exists():
    found = invoked_flags()
    assert {"coordinator", "jobs", "worker", "submit", "logs"} <= set(found), found
    for sub, flags in found.items():
        text = help_text("cvdist-worker" if sub == "worker" else "cvdist", sub)
        missing = sorted(f for f in flags if not help_has_flag(text, f))
        assert missing == [], f"`cvdist {sub}` does not know {missing}"


def test_workers_read_their_settings_from_the_documented_env_vars():
    text = SBATCH.read_text()
    worker_help = help_text("cvdist-worker", "worker")
    exported = set()
    for m in re.finditer(r"(?m)(?:^|;\s*|then\s+)export\s+([^;\n]+)", text):
        for word in shlex.split(m.group(1)):
            exported.add(word.split("=", 1)[0])
    for var in ("CVDIST_COORDINATOR", "CVDIST_WORKER_TOKEN_FILE", "CVDIST_TLS_CA", "CVDIST_DEVICE", "CVDIST_DATA"):
        assert var in exported, var
        assert f"[env: {var}" in worker_help, var
    # Workers get the worker credential, never the client token.
    assert re.search(r"(?m)^unset CVDIST_TOKEN CVDIST_TOKEN_FILE$", text), "the client token reaches the workers"


def test_readme_covers_the_script():
    text = (DEPLOY / "slurm" / "README.md").read_text()
    for needle in ("sbatch", "scancel", "--requeue", "CVDIST_SHARED", "CVDIST_RUN_DIR", "scripts/slurm-smoke.sh",
                   "--gpus-per-task", "SLURM_LOCALID", "CVDIST_GPUS"):
        assert needle in text, needle
