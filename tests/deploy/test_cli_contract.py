"""Every flag and CVDIST_* environment variable the manifests hand to a binary exists in
that binary's --help (the real binaries from ${CVDIST_BIN_DIR:-target/release}), and in
the documented contract."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess

import pytest

from cli_contract import CONTRACT, HELPER_ENV
from conftest import IMAGE_DOCKERFILES, ROOT, STACKS, all_containers, container_env, image_name, workloads

BIN_DIR = pathlib.Path(os.environ.get("CVDIST_BIN_DIR") or ROOT / "target" / "release")


def entrypoint(dockerfile: pathlib.Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the Dockerfile's last stage, exec form."""
    ep, cmd = [], []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("FROM "):
            ep, cmd = [], []
        elif line.startswith("ENTRYPOINT "):
            ep = json.loads(line.split(" ", 1)[1])
        elif line.startswith("CMD "):
            cmd = json.loads(line.split(" ", 1)[1])
    return ep, cmd


def binary_of(image: str) -> str:
    ep, _ = entrypoint(IMAGE_DOCKERFILES[image_name(image)])
    return pathlib.PurePosixPath(ep[-1]).name


def invocations():
    """(stack, workload, container, binary, subcommand, flags, env names) for every container
    that runs a cvdist binary (not the shell init container)."""
    from conftest import _stack_docs  # noqa: PLC0415
    out = []
    for stack in STACKS:
        docs = _stack_docs(stack, str(_tmp()))
        for w in workloads(docs):
            for _, c in all_containers(w["spec"]["template"]["spec"]):
                if "command" in c:
                    continue
                args = c.get("args") or entrypoint(IMAGE_DOCKERFILES[image_name(c["image"])])[1]
                flags = sorted({a.split("=", 1)[0] for a in args[1:] if a.startswith("--")})
                env = sorted(container_env(docs, c))
                out.append((stack, w["metadata"]["name"], c["name"], binary_of(c["image"]), args[0], flags, env))
    return out


@functools.lru_cache(maxsize=None)
def _tmp() -> pathlib.Path:
    import atexit, shutil, tempfile  # noqa: E401, PLC0415
    tmp = tempfile.mkdtemp(prefix="cvdist-deploy-")
    atexit.register(shutil.rmtree, tmp, True)
    return pathlib.Path(tmp)


# ---- --help parsing ------------------------------------------------------------------------
def help_has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?m)(^|[\s,]){re.escape(flag)}(?=[\s=<\[,]|$)", text) is not None


def help_has_env(text: str, name: str) -> bool:
    return re.search(rf"\[env: {re.escape(name)}(=|\])", text) is not None


@functools.lru_cache(maxsize=None)
def help_text(binary: str, sub: str) -> str:
    exe = BIN_DIR / binary
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: build with scripts/build.sh (or set CVDIST_BIN_DIR)")
    # No CVDIST_* from this shell: clap would print their values into the help.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVDIST_")}
    proc = subprocess.run([str(exe), sub, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, f"{exe} {sub} --help failed:\n{proc.stderr}"
    return proc.stdout


def test_help_parser_on_clap_style_text():
    text = """Usage: cvdist coordinator [OPTIONS]

Options:
      --listen <ADDR>
          Address to listen on

          [env: CVDIST_LISTEN=]
          [default: 127.0.0.1:50051]
      --token-file <FILE>  Token [env: CVDIST_TOKEN_FILE=/x]
  -f, --follow             Follow [env: CVDIST_SECRET]
"""
    assert help_has_flag(text, "--listen") and help_has_flag(text, "--token-file") and help_has_flag(text, "--follow")
    assert not help_has_flag(text, "--list") and not help_has_flag(text, "--token")
    assert help_has_env(text, "CVDIST_LISTEN") and help_has_env(text, "CVDIST_TOKEN_FILE")
    assert help_has_env(text, "CVDIST_SECRET") and not help_has_env(text, "CVDIST_TOKEN")


def test_every_runnable_container_is_checked():
    seen = {(b, s) for _, _, _, b, s, _, _ in invocations()}
    assert seen == set(CONTRACT), "each contract entry is used by some manifest, and only those"


@pytest.mark.parametrize("inv", invocations(), ids=lambda i: f"{i[0]}:{i[1]}/{i[2]}")
def test_options_are_in_the_contract(inv):
    stack, wl, cname, binary, sub, flags, env = inv
    contract = CONTRACT[(binary, sub)]
    assert [f for f in flags if f not in contract] == []
    cvdist_env = [e for e in env if e.startswith("CVDIST_")]
    assert [e for e in cvdist_env if e not in contract.values()] == []
    assert [e for e in env if not e.startswith("CVDIST_") and e not in HELPER_ENV] == []


@pytest.mark.parametrize("inv", invocations(), ids=lambda i: f"{i[0]}:{i[1]}/{i[2]}")
def test_options_exist_in_the_binary_help(inv):
    stack, wl, cname, binary, sub, flags, env = inv
    text = help_text(binary, sub)
    assert [f for f in flags if not help_has_flag(text, f)] == [], f"flags unknown to `{binary} {sub}`"
    missing_env = [e for e in env if e.startswith("CVDIST_") and not help_has_env(text, e)]
    assert missing_env == [], f"env vars `{binary} {sub} --help` does not list"
