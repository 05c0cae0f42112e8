"""The container image and the ECS stack (docker/): linters, the template's wiring that matters,
and the image recipe replayed outside Docker.

No Docker engine runs here, so `TestImageRecipe` performs the Dockerfile's builder-stage steps
(its COPY, ENV and RUN lines, read from the Dockerfile itself) in a fresh venv, then starts the
gateway through the image's entry point and stops it with SIGTERM, as ECS would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from llm_gateway.settings import Settings
from llm_gateway.store import dynamodb_tables
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.procs import free_port, read_output, running

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
TEMPLATE = DOCKER / "ecs" / "llm-gateway.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"

FARGATE_MAX_STOP_TIMEOUT_S = 120
WRITER_DRAIN_HEADROOM_S = 10
# API operations the store calls that IAM does not know as actions: a transaction is authorized
# by the actions of its items (PutItem, DeleteItem, ConditionCheckItem), which are listed too.
NOT_IAM_ACTIONS = {"dynamodb:TransactWriteItems", "dynamodb:TransactGetItems"}


def _tool(name: str) -> str:
    """A linter installed by the `test` extra, next to this interpreter (or on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


def _run_tool(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}"


# --- Linters --------------------------------------------------------------------------------


def test_cfn_lint_reports_nothing() -> None:
    """No errors and no warnings."""
    _run_tool(_tool("cfn-lint"), str(TEMPLATE))


def test_hadolint_reports_nothing() -> None:
    _run_tool(_tool("hadolint"), str(DOCKERFILE))


def test_shellcheck_entrypoint() -> None:
    _run_tool(_tool("shellcheck"), str(ENTRYPOINT))


@pytest.mark.parametrize(("cpu_max", "workers"), [
    ("max 100000", "4"), ("25000 100000", "1"), ("150000 100000", "2"), ("800000 100000", "4")])
def test_entrypoint_workers_from_cpu_quota(tmp_path: Path, cpu_max: str, workers: str) -> None:
    """One worker per CPU the cgroup quota allows (rounded up), at most nproc."""
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    script = tmp_path / "entrypoint.sh"
    script.write_text(ENTRYPOINT.read_text().replace("/sys/fs/cgroup", str(tmp_path)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("nproc", "echo 4"), ("llm-gateway", 'echo "$GATEWAY_WORKERS $*"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_WORKERS"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = subprocess.run(["/bin/sh", str(script), "serve"], env=env, capture_output=True,
                       text=True, check=True)
    assert r.stdout.split() == [workers, "serve"]
    r = subprocess.run(["/bin/sh", str(script), "serve"], env={**env, "GATEWAY_WORKERS": "7"},
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["7", "serve"]


# --- The template's wiring ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    template, problems = decode(str(TEMPLATE))
    assert not problems, problems
    assert template is not None
    return dict(template)


def _resource(cfn: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
    res = cfn["Resources"][name]
    assert res["Type"] == kind
    props: dict[str, Any] = res["Properties"]
    return props


def _of_type(cfn: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in cfn["Resources"].items() if r["Type"] == kind}


def _gateway_container(cfn: dict[str, Any]) -> dict[str, Any]:
    task = _resource(cfn, "TaskDefinition", "AWS::ECS::TaskDefinition")
    (gateway,) = [c for c in task["ContainerDefinitions"] if c.get("Name") == "gateway"]
    return dict(gateway)


def _environment(cfn: dict[str, Any]) -> dict[str, Any]:
    entries = _gateway_container(cfn)["Environment"]
    env: dict[str, Any] = {}
    for e in entries:
        if "Fn::If" in e:  # a conditional variable: [condition, entry, AWS::NoValue]
            e = e["Fn::If"][1]
        env[e["Name"]] = e["Value"]
    return env


def _grace_ref() -> dict[str, str]:
    return {"Ref": "ShutdownGraceSeconds"}


def test_health_checks(cfn: dict[str, Any]) -> None:
    tg = _resource(cfn, "TargetGroup", "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert tg["HealthCheckPath"] == "/readyz"
    assert tg["TargetType"] == "ip"
    gateway = _gateway_container(cfn)
    assert tg["Port"] == gateway["PortMappings"][0]["ContainerPort"] == 8080
    assert _environment(cfn)["SERVER_PORT"] == "8080"
    assert any("/healthz" in part for part in gateway["HealthCheck"]["Command"])
    service = _resource(cfn, "Service", "AWS::ECS::Service")
    assert service["LoadBalancers"][0] == {
        "ContainerName": "gateway", "ContainerPort": 8080, "TargetGroupArn": {"Ref": "TargetGroup"}}


def _path_rules(cfn: dict[str, Any]) -> dict[str, tuple[set[str], list[Any] | None]]:
    """Each forward rule on the API listener: (its paths, its source-ip values or None)."""
    rules: dict[str, tuple[set[str], list[Any] | None]] = {}
    for name, res in _of_type(cfn, "AWS::ElasticLoadBalancingV2::ListenerRule").items():
        props = res["Properties"]
        assert props["ListenerArn"] == {"Ref": "Listener"}, name
        assert props["Actions"] == [{"Type": "forward", "TargetGroupArn": {"Ref": "TargetGroup"}}]
        fields = {c["Field"]: c for c in props["Conditions"]}
        assert set(fields) <= {"path-pattern", "source-ip"}, name
        paths = set(fields["path-pattern"]["PathPatternConfig"]["Values"])
        source = fields.get("source-ip")
        rules[name] = (paths, source["SourceIpConfig"]["Values"] if source else None)
    return rules


def test_public_listener_forwards_only_the_api_and_health(cfn: dict[str, Any]) -> None:
    """From anywhere: /v1/* and the health paths. /metrics and /admin/* only from the VPC or the
    AdminAllowedCidr parameter (default empty: the VPC only). Anything else: a 404 at the ALB."""
    from llm_gateway.app import ROUTES

    listener = _resource(cfn, "Listener", "AWS::ElasticLoadBalancingV2::Listener")
    (default,) = listener["DefaultActions"]
    assert default["Type"] == "fixed-response"
    assert default["FixedResponseConfig"]["StatusCode"] == "404"
    assert json.loads(default["FixedResponseConfig"]["MessageBody"])["error"]["code"]
    # No other listener forwards anything (the optional one on 80 redirects to HTTPS).
    for name, res in _of_type(cfn, "AWS::ElasticLoadBalancingV2::Listener").items():
        if name != "Listener":
            assert [a["Type"] for a in res["Properties"]["DefaultActions"]] == ["redirect"]

    rules = _path_rules(cfn)
    public = {p for paths, source in rules.values() if source is None for p in paths}
    assert public == {"/v1/*", "/healthz", "/readyz"}
    internal = {name: (paths, source) for name, (paths, source) in rules.items() if source}
    assert {str(source) for _, source in internal.values()} == {
        str([{"Ref": "VpcCidr"}]), str([{"Ref": "AdminAllowedCidr"}])}
    assert cfn["Parameters"]["AdminAllowedCidr"]["Default"] == ""
    for name, (paths, source) in internal.items():
        assert paths == {"/admin/*", "/metrics"}, name
        if source == [{"Ref": "AdminAllowedCidr"}]:
            assert cfn["Resources"][name]["Condition"] == "HasAdminCidr"
    # Every path the gateway serves falls in exactly one of the two groups.
    for _, path, _ in ROUTES:
        in_public = path.startswith("/v1/") or path in public
        in_internal = path.startswith("/admin/") or path == "/metrics"
        assert in_public != in_internal, path
    service = cfn["Resources"]["Service"]
    assert "PublicPathsRule" in service["DependsOn"]


def test_shutdown_grace_wiring(cfn: dict[str, Any]) -> None:
    """stopTimeout >= grace + writer headroom, within Fargate's cap, for every allowed grace;
    the same grace reaches the gateway and the ALB's deregistration delay."""
    param = cfn["Parameters"]["ShutdownGraceSeconds"]
    assert float(param["Default"]) == Settings().shutdown_grace_s
    stop_timeouts = cfn["Mappings"]["Shutdown"]
    assert set(stop_timeouts) == set(param["AllowedValues"])
    for grace, row in stop_timeouts.items():
        assert int(grace) + WRITER_DRAIN_HEADROOM_S <= row["StopTimeout"], grace
        assert row["StopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT_S, grace

    gateway = _gateway_container(cfn)
    assert gateway["StopTimeout"] == {
        "Fn::FindInMap": ["Shutdown", _grace_ref(), "StopTimeout"]}
    assert _environment(cfn)["GATEWAY_SHUTDOWN_GRACE_S"] == _grace_ref()
    tg = _resource(cfn, "TargetGroup", "AWS::ElasticLoadBalancingV2::TargetGroup")
    attrs = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
    assert attrs["deregistration_delay.timeout_seconds"] == _grace_ref()
    # Granian must be PID 1 and get SIGTERM itself: no init process in between.
    assert "InitProcessEnabled" not in gateway.get("LinuxParameters", {})


def test_workers_follow_task_cpu(cfn: dict[str, Any]) -> None:
    workers = cfn["Mappings"]["Workers"]
    assert set(workers) == set(cfn["Parameters"]["TaskCpu"]["AllowedValues"])
    for cpu, row in workers.items():
        assert int(row["Count"]) == max(1, int(cpu) // 1024), cpu
    assert _environment(cfn)["GATEWAY_WORKERS"] == {
        "Fn::FindInMap": ["Workers", {"Ref": "TaskCpu"}, "Count"]}


def test_autoscaling_on_cpu_and_requests(cfn: dict[str, Any]) -> None:
    target = _resource(cfn, "ScalableTarget", "AWS::ApplicationAutoScaling::ScalableTarget")
    assert target["ScalableDimension"] == "ecs:service:DesiredCount"
    assert "Service.Name" in json.dumps(target["ResourceId"])
    policies = _of_type(cfn, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    metrics = {}
    for p in policies:
        props = p["Properties"]
        assert props["PolicyType"] == "TargetTrackingScaling"
        assert props["ScalingTargetId"] == {"Ref": "ScalableTarget"}
        spec = props["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
        metrics[spec["PredefinedMetricType"]] = spec
    assert set(metrics) == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}
    label = json.dumps(metrics["ALBRequestCountPerTarget"]["ResourceLabel"])
    assert "LoadBalancer.LoadBalancerFullName" in label
    assert "TargetGroup.TargetGroupFullName" in label


def test_task_role_allows_exactly_what_the_store_calls(cfn: dict[str, Any]) -> None:
    env = _environment(cfn)
    assert env["GATEWAY_CREATE_TABLES"] == "false"  # so the runtime set applies
    expected = set(dynamodb_tables.IAM_ACTIONS_RUNTIME) - NOT_IAM_ACTIONS

    role = _resource(cfn, "TaskRole", "AWS::IAM::Role")
    assert "ManagedPolicyArns" not in role
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    actions: set[str] = set()
    for s in statements:
        assert s["Effect"] == "Allow"
        assert s["Resource"] == [{"Fn::GetAtt": ["MainTable", "Arn"]},
                                 {"Fn::GetAtt": ["UsageTable", "Arn"]}]
        actions.update([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    assert actions == expected

    # Anything else on the task role belongs to the optional collector sidecar.
    for name, res in _of_type(cfn, "AWS::IAM::Policy").items():
        if {"Ref": "TaskRole"} in res["Properties"].get("Roles", []):
            assert res.get("Condition") == "OtelCollector", name
            assert "dynamodb" not in json.dumps(res["Properties"]), name


def test_tables_match_the_code(cfn: dict[str, Any]) -> None:
    main = _resource(cfn, "MainTable", "AWS::DynamoDB::Table")
    usage = _resource(cfn, "UsageTable", "AWS::DynamoDB::Table")
    for props, spec in ((main, dynamodb_tables.main_table_spec("x")),
                        (usage, dynamodb_tables.usage_table_spec("x"))):
        for key in ("AttributeDefinitions", "KeySchema", "BillingMode"):
            assert props[key] == spec[key], key
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert "GlobalSecondaryIndexes" not in props
    assert main["TableName"] == {"Ref": "TableName"}
    usage_name = usage["TableName"]["Fn::Sub"].replace("${TableName}", "Gw")
    assert usage_name == dynamodb_tables.usage_table_name("Gw")
    env = _environment(cfn)
    assert env["DYNAMODB_TABLE_NAME"] == {"Ref": "MainTable"}
    assert env["DYNAMODB_USAGE_TABLE_NAME"] == {"Ref": "UsageTable"}


def test_environment_names_are_ones_the_gateway_reads(cfn: dict[str, Any]) -> None:
    read = set(re.findall(r'e\.get\("([A-Z0-9_]+)"', (ROOT / "core" / "settings.py").read_text()))
    assert "GATEWAY_SHUTDOWN_GRACE_S" in read
    gateway = _gateway_container(cfn)
    secrets = {s["Name"]: s["ValueFrom"] for s in gateway["Secrets"]}
    provider_keys = set(secrets) - read
    for name in set(_environment(cfn)) | set(secrets):
        assert name in read or name.startswith("OTEL_") or name in provider_keys, name
    assert not set(_environment(cfn)) & set(secrets)

    # ADMIN_API_KEY and the provider keys come from Secrets Manager, never plain environment.
    assert secrets["ADMIN_API_KEY"] == {"Ref": "AdminApiKeySecret"}
    provider_json = json.loads(_resource(
        cfn, "ProviderKeysSecret", "AWS::SecretsManager::Secret")["SecretString"])
    assert provider_keys == set(provider_json)
    for name in provider_keys:
        assert secrets[name] == {"Fn::Sub": f"${{ProviderKeysSecret}}:{name}::"}
    execution = _resource(cfn, "ExecutionRole", "AWS::IAM::Role")
    (statement,) = execution["Policies"][0]["PolicyDocument"]["Statement"]
    assert statement["Action"] == "secretsmanager:GetSecretValue"
    assert statement["Resource"] == [{"Ref": "AdminApiKeySecret"}, {"Ref": "ProviderKeysSecret"}]


# --- The Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]


def _stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            words = rest.split()
            stages.append(Stage(words[2] if len(words) > 2 else f"stage{len(stages)}"))
        elif stages:
            stages[-1].instructions.append((ins, rest.strip()))
    return stages


def _env_pairs(stage: Stage) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            pairs[key] = value
    return pairs


def test_runtime_stage() -> None:
    builder, runtime = _stages()
    assert builder.name == "builder"
    (user,) = runtime.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert runtime.all("EXPOSE") == ["8080"]
    (health,) = runtime.all("HEALTHCHECK")
    assert "/healthz" in health
    # Exec form, so no shell sits between the container runtime and the gateway.
    assert json.loads(runtime.all("ENTRYPOINT")[0]) == ["gateway-entrypoint"]
    assert json.loads(runtime.all("CMD")[0]) == ["serve"]
    copies = runtime.all("COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "--from=builder /opt/tiktoken /opt/tiktoken" in copies
    env = _env_pairs(runtime)
    assert env["TIKTOKEN_CACHE_DIR"] == _env_pairs(builder)["TIKTOKEN_CACHE_DIR"]
    assert env["SERVER_PORT"] == "8080"
    assert env["GATEWAY_DATA_DIR"] == "/data"


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in
               (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for stage in _stages():
        for rest in stage.all("COPY"):
            if rest.startswith("--from="):
                continue
            for src in rest.split()[:-1]:
                assert src in allowed, src


def test_requirements_pin_every_dependency() -> None:
    pins: dict[str, str] = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dep in pyproject["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in docker/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


# --- The image recipe -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The image recipe: the Dockerfile's builder stage performed in a temp dir (a fresh venv
    for /opt/venv). Yields the runtime stage's environment, with the image's paths mapped."""
    root = tmp_path_factory.mktemp("image")
    paths = {"/opt/venv": str(root / "venv"), "/opt/tiktoken": str(root / "tiktoken"),
             "/data": str(root / "data")}

    def local(text: str) -> str:
        for image_path, here in paths.items():
            text = text.replace(image_path, here)
        return text.replace("$PATH", os.environ["PATH"])

    builder, runtime = _stages()
    (workdir,) = builder.all("WORKDIR")
    context = root / "src"
    context.mkdir()
    env = dict(os.environ)
    for ins, rest in builder.instructions:
        if ins == "ENV":
            # The one difference from the image: let pip use this machine's cache.
            env.update({k: local(v) for k, v in _env_pairs(Stage("", [(ins, rest)])).items()
                        if k != "PIP_NO_CACHE_DIR"})
        elif ins == "COPY":
            *sources, dest = rest.split()
            for src in sources:
                _copy(ROOT / src, context / dest / Path(src).name if dest.endswith("/")
                      else context / dest)
        elif ins == "RUN":
            command = local(rest)
            if re.fullmatch(r"python -m venv \S+", command):
                # The base image's python; here, the one running the tests.
                command = f"{shlex.quote(sys.executable)} -m venv {command.split()[-1]}"
            r = subprocess.run(["/bin/sh", "-c", command], cwd=context, env=env,
                               capture_output=True, text=True, timeout=540, check=False)
            assert r.returncode == 0, f"RUN {rest}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        elif ins == "WORKDIR":
            assert rest == workdir
    yield {k: local(v) for k, v in _env_pairs(runtime).items()}


class TestImageRecipe:
    """The image recipe test: the Dockerfile's builder steps in a fresh venv, then the gateway
    started through the image's entry point, healthy, and stopped by SIGTERM with exit 0."""

    def test_tokenizer_files_are_baked(self, image: dict[str, str]) -> None:
        cache = Path(image["TIKTOKEN_CACHE_DIR"])
        files = sorted(p.stat().st_size for p in cache.iterdir())
        assert len(files) == 2 and min(files) > 1_000_000  # cl100k_base and o200k_base

    def test_installed_not_editable(self, image: dict[str, str]) -> None:
        python = Path(image["VIRTUAL_ENV"]) / "bin" / "python"
        r = subprocess.run([str(python), "-c", "import llm_gateway; print(llm_gateway.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/")
        assert r.stdout.strip().startswith(image["VIRTUAL_ENV"])

    def test_serves_and_stops_on_sigterm(self, image: dict[str, str]) -> None:
        cache = Path(image["TIKTOKEN_CACHE_DIR"])
        before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        port = free_port()
        env = {**image, "SERVER_PORT": str(port), "GATEWAY_HOST": "127.0.0.1",
               "ADMIN_API_KEY": "sk-admin-image-recipe", "GATEWAY_SHUTDOWN_GRACE_S": "5"}
        env.pop("GATEWAY_WORKERS", None)  # the entry point picks it
        Path(image["GATEWAY_DATA_DIR"]).mkdir(exist_ok=True)
        url = f"http://127.0.0.1:{port}"
        with open(Path(image["GATEWAY_DATA_DIR"]) / "gateway.log", "w+b") as out, running(
                [str(ENTRYPOINT), "serve"], f"{url}/healthz", env=env, deadline_s=60,
                output=out) as proc:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                assert r.status == 200
            # The entry point exec'd: the process ECS signals is the gateway itself.
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert any(part.endswith(b"llm-gateway") for part in cmdline), cmdline
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            log = read_output(out)
            assert code == 0, log
            workers = re.search(r'"workers":(\d+)', log)
            assert workers and 1 <= int(workers[1]) <= (os.cpu_count() or 1), log
        assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    else:
        shutil.copy2(src, dest)
