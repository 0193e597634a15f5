#!/usr/bin/env python3
"""Checks what `kubectl apply -k deploy/kubernetes` would apply, without a cluster.

    check-apply.py KUBECTL [RENDERED]

Renders a copy of this directory with `KUBECTL kustomize` and fails (exit 1, one line per
finding) unless:
- without any one of the operator's files (secret.env, clients.toml, upstreams.toml, the key
  file keys/openai) nothing renders at all, so a cluster can never get a placeholder instead;
- with files of random values standing in for the operator's (the upstreams file: the
  template), the two Secrets and the clients and upstreams ConfigMaps hold exactly those values:
  no tracked manifest supplies a Secret, and no *.example template is part of the apply;
- no rendered value is a placeholder (replace-me, changeme, ...), and no credential is a literal
  `value` in a manifest;
- the templates hold no credential an unedited copy could apply;
- the Deployment fits long streams (termination grace covers the preStop pause and
  SHUTDOWN_GRACE_SECS, which is minutes), sets REDIS_URL and turns Service links off;
- the Deployment reads its upstreams from the file: UPSTREAMS_FILE is the mounted upstreams
  ConfigMap's file, none of TARGET_HOST, TARGET_BASE_URL, AUTH_BEARER is set (start-up would stop
  on the conflict), and every keys_file of the upstreams file is a key of the mounted keys Secret.
Then it checks itself: a copy with a placeholder Secret among the resources, and one whose
secretGenerator reads the template, must both be refused.

RENDERED, when given, receives the render, for kubernetes-validate. Needs PyYAML and Python 3.11
(tomllib).
"""

import base64
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SECRET_ENV = "secret.env"
CLIENTS_TOML = "clients.toml"
UPSTREAMS_TOML = "upstreams.toml"
# The upstream key files the kustomization's keys Secret is generated from, by Secret key.
KEY_FILES = {"openai": "keys/openai"}
OPERATOR_FILES = (SECRET_ENV, CLIENTS_TOML, UPSTREAMS_TOML, *KEY_FILES.values())
ENV_SECRET = "llm-proxy-keys"
KEYS_SECRET = "llm-proxy-upstream-keys"
# Words that mark a value someone meant to replace; matched in every rendered string.
PLACEHOLDER = re.compile(r"replace[-_ ]?me|change[-_ ]?me|placeholder|your[-_ ]?(key|token)", re.I)
# Variables whose value is a credential: they may only come from a Secret.
CREDENTIALS = {"AUTH_BEARER", "ALLOWED_TOKENS", "ADMIN_TOKEN", "METRICS_TOKEN", "REDIS_URL"}
# The environment's one upstream, which the proxy refuses beside UPSTREAMS_FILE.
SINGLE_UPSTREAM = ("TARGET_HOST", "TARGET_BASE_URL", "AUTH_BEARER")
# Non-secret values a template may carry: the bundled Redis's address, which has no password.
TEMPLATE_DEFAULTS = {"REDIS_URL": "redis://llm-proxy-redis:6379/0"}
# Streams last minutes: the drain must allow at least this long.
MIN_SHUTDOWN_GRACE_SECS = 300


def render(kubectl, directory):
    """The apply's documents, or None with kubectl's complaint when it does not render."""
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return None, result.stderr.strip()
    return result.stdout, ""


def parse_env(text):
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def secret_values(document):
    values = {k: base64.b64decode(v).decode() for k, v in (document.get("data") or {}).items()}
    values.update(document.get("stringData") or {})
    return values


def config_map_file(documents, name, file):
    """The `file` entries of every ConfigMap called `name`."""
    return [
        d.get("data", {}).get(file)
        for d in documents
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == name
    ]


def check_render(text, operator):
    """Findings for one render made with the operator's files, `operator` (what they hold)."""
    findings = []
    documents = [d for d in yaml.safe_load_all(text) if d]
    secrets_seen = [d for d in documents if d.get("kind") == "Secret"]
    expected = {
        # The env Secret's name carries a hash of its values; the keys Secret's is fixed.
        ENV_SECRET: (operator["env"], "secret.env's"),
        KEYS_SECRET: (operator["keys"], "the key files'"),
    }
    found = set()
    for document in secrets_seen:
        name = document["metadata"]["name"]
        base = name if name == KEYS_SECRET else name.rsplit("-", 1)[0]
        if base not in expected or base in found:
            findings.append(f"Secret {name} in the apply is not one of the generated ones")
            continue
        found.add(base)
        values, whose = expected[base]
        if secret_values(document) != values:
            findings.append(f"Secret {name} holds values that are not {whose}")
    for missing in expected.keys() - found:
        findings.append(f"no {missing} Secret in the apply")
    if config_map_file(documents, "llm-proxy-clients", CLIENTS_TOML) != [operator["clients"]]:
        findings.append("the llm-proxy-clients ConfigMap is not clients.toml as given")
    if config_map_file(documents, "llm-proxy-upstreams", UPSTREAMS_TOML) != [operator["upstreams"]]:
        findings.append("the llm-proxy-upstreams ConfigMap is not upstreams.toml as given")
    for document in documents:
        where = f"{document.get('kind')} {document.get('metadata', {}).get('name')}"
        for value in strings(document):
            if PLACEHOLDER.search(value):
                findings.append(f"{where}: placeholder {value[:60]!r}")
    deployments = [
        d
        for d in documents
        if d.get("kind") == "Deployment" and d["metadata"]["name"] == "llm-proxy"
    ]
    if len(deployments) != 1:
        return findings + ["no llm-proxy Deployment in the apply"]
    pod = deployments[0]["spec"]["template"]["spec"]
    if pod.get("enableServiceLinks") is not False:
        findings.append("Deployment llm-proxy: enableServiceLinks is not false")
    env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
    for name in CREDENTIALS & env.keys():
        if "value" in env[name]:
            findings.append(f"Deployment llm-proxy: {name} is a literal, not from the Secret")
    if "REDIS_URL" not in env:
        findings.append("Deployment llm-proxy: REDIS_URL is not set (limits would multiply)")
    grace = int(env.get("SHUTDOWN_GRACE_SECS", {}).get("value", "30"))
    if grace < MIN_SHUTDOWN_GRACE_SECS:
        findings.append(
            f"Deployment llm-proxy: SHUTDOWN_GRACE_SECS {grace} is below "
            f"{MIN_SHUTDOWN_GRACE_SECS}, shorter than a long stream"
        )
    pause = sum(
        c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        for c in pod["containers"]
    )
    termination = pod.get("terminationGracePeriodSeconds", 30)
    if termination <= pause + grace:
        findings.append(
            f"Deployment llm-proxy: terminationGracePeriodSeconds {termination} does not cover "
            f"the preStop pause {pause} s + SHUTDOWN_GRACE_SECS {grace} s: SIGKILL cuts the drain"
        )
    return findings + check_upstreams(pod, env, operator["upstreams"])


def check_upstreams(pod, env, upstreams_toml):
    """The Deployment reads the upstreams file it is given, and finds every key file it names."""
    findings = []
    for name in SINGLE_UPSTREAM:
        if name in env:
            findings.append(f"Deployment llm-proxy: {name} is set beside UPSTREAMS_FILE")
    # Where each volume's source is mounted: (kind, name) -> mount path.
    sources = {}
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            sources[volume["name"]] = ("ConfigMap", volume["configMap"]["name"])
        elif "secret" in volume:
            sources[volume["name"]] = ("Secret", volume["secret"]["secretName"])
    mounted = {
        sources[m["name"]]: m["mountPath"]
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in sources and "subPath" not in m
    }
    upstreams_dir = mounted.get(("ConfigMap", "llm-proxy-upstreams"))
    if upstreams_dir is None:
        findings.append("Deployment llm-proxy: the llm-proxy-upstreams ConfigMap is not mounted")
    elif env.get("UPSTREAMS_FILE", {}).get("value") != f"{upstreams_dir}/{UPSTREAMS_TOML}":
        findings.append(
            f"Deployment llm-proxy: UPSTREAMS_FILE is not {upstreams_dir}/{UPSTREAMS_TOML}"
        )
    keys_dir = mounted.get(("Secret", KEYS_SECRET))
    for name, upstream in tomllib.loads(upstreams_toml).get("upstreams", {}).items():
        keys_file = upstream.get("keys_file")
        if keys_file is None:
            continue
        directory, _, key = keys_file.rpartition("/")
        if directory != keys_dir or key not in KEY_FILES:
            findings.append(
                f"{UPSTREAMS_TOML}: upstreams.{name}.keys_file {keys_file} is not a key of the "
                f"{KEYS_SECRET} Secret as mounted"
            )
    return findings


def check_templates(directory):
    findings = []
    for key, value in parse_env((directory / f"{SECRET_ENV}.example").read_text()).items():
        if value and TEMPLATE_DEFAULTS.get(key) != value:
            findings.append(f"{SECRET_ENV}.example: {key} has a value an unedited copy would apply")
    clients = (directory / f"{CLIENTS_TOML}.example").read_text()
    for match in re.finditer(r'^\s*(token|token_sha256)\s*=\s*"([^"]*)"', clients, re.M):
        if match.group(2):
            findings.append(f"{CLIENTS_TOML}.example: {match.group(1)} has a value")
    return findings


def operator_files(directory):
    """Writes random stand-ins for the operator's files (the upstreams file: a copy of the
    template, which holds no secret); returns what they hold."""
    env = {
        "ALLOWED_TOKENS": "ci:" + secrets.token_hex(16),
        "ADMIN_TOKEN": secrets.token_hex(16),
        "REDIS_URL": "redis://llm-proxy-redis:6379/0",
    }
    (directory / SECRET_ENV).write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clients = f'[clients.ci]\ntoken_sha256 = "{secrets.token_hex(32)}"\n'
    (directory / CLIENTS_TOML).write_text(clients)
    upstreams = (directory / f"{UPSTREAMS_TOML}.example").read_text()
    (directory / UPSTREAMS_TOML).write_text(upstreams)
    keys = {}
    for key, path in KEY_FILES.items():
        keys[key] = f"sk-{secrets.token_hex(16)}\nsk-{secrets.token_hex(16)}\n"
        (directory / path).parent.mkdir(exist_ok=True)
        (directory / path).write_text(keys[key])
    return {"env": env, "clients": clients, "upstreams": upstreams, "keys": keys}


def remove_operator_files(directory):
    for own in OPERATOR_FILES:
        (directory / own).unlink(missing_ok=True)


def check(kubectl, directory):
    """Findings for the kustomization in `directory` (a scratch copy), and the render."""
    findings = []
    for left_out in OPERATOR_FILES:
        remove_operator_files(directory)
        operator_files(directory)
        (directory / left_out).unlink()
        if render(kubectl, directory)[0] is not None:
            findings.append(f"renders without {left_out}")
    remove_operator_files(directory)
    operator = operator_files(directory)
    text, error = render(kubectl, directory)
    if text is None:
        return findings + [f"does not render with the operator's files: {error}"], ""
    return findings + check_render(text, operator) + check_templates(directory), text


def scratch_copy(parent, name):
    copy = Path(parent) / name
    shutil.copytree(HERE, copy)
    return copy


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    kubectl = sys.argv[1]
    with tempfile.TemporaryDirectory() as parent:
        findings, text = check(kubectl, scratch_copy(parent, "apply"))
        if len(sys.argv) == 3:
            Path(sys.argv[2]).write_text(text)

        # The check must be able to fail: a placeholder Secret among the resources, and the
        # template as the generator's input, are both refused.
        placeholder = scratch_copy(parent, "placeholder-secret")
        (placeholder / "leaked.yaml").write_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: leaked}\n"
            "stringData: {AUTH_BEARER: sk-replace-me}\n"
        )
        kustomization = placeholder / "kustomization.yaml"
        kustomization.write_text(
            kustomization.read_text().replace("resources:\n", "resources:\n  - leaked.yaml\n", 1)
        )
        template = scratch_copy(parent, "template-applied")
        kustomization = template / "kustomization.yaml"
        kustomization.write_text(
            kustomization.read_text().replace(
                f"- {SECRET_ENV}\n", f"- {SECRET_ENV}.example\n", 1
            )
        )
        for case in (placeholder, template):
            if not check(kubectl, case)[0]:
                findings.append(f"self-test: the {case.name} case was not refused")

    for finding in findings:
        print(f"deploy/kubernetes: {finding}", file=sys.stderr)
    if findings:
        sys.exit(1)
    print("deploy/kubernetes: the apply holds only the operator's secrets, clients and upstreams")


if __name__ == "__main__":
    main()
