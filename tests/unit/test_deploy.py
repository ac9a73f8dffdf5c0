"""deploy/: the image, the compose file, the Prometheus scrape config and the
Grafana dashboard, checked without a Docker engine.

Each file is parsed and held against the real thing it depends on: compose command lines go
through the real `epd` argparse parser and `build_config` with the compose environment (after
compose-style `${VAR:-default}` / `${VAR:?msg}` interpolation with sample values), so they yield
valid configs; metrics ports match the scrape targets; every PromQL expression of the dashboard
uses only metric and label names that services/edge/metrics.py exports, and is valid PromQL (promtool);
the scrape config passes `promtool check config`.

The scale variant (docker-compose.scale.yml, a bridge network with a scaled encoder service) is
checked the same way, and its containers' shell parts run for real with /bin/sh and python3 (only
`epd` itself is replaced by a recorder): the entrypoint must give each container its own address
as EPD_HOST and hand the command to `epd` unchanged, and the health checks must ask that address.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from common.config import EncoderConfig, LanguageConfig
from services.edge import metrics
from services.language import encoders
from services.language.encoders import resolve_addresses
from services.tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TCP = DEPLOY / "docker-compose.tcp.yml"
COMPOSE_SCALE = DEPLOY / "docker-compose.scale.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
PROMETHEUS_SCALE = DEPLOY / "prometheus.scale.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "epd.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "epd.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

HOST_IP = "10.0.0.5"
SAMPLE_ENV = {"EPD_HOST": HOST_IP, "GRAFANA_ADMIN_PASSWORD": "sample-password"}
ROLES = {"encoder": EncoderConfig, "language": LanguageConfig}
PROMTOOL_HINT = "promtool is installed by `make setup` (Debian package prometheus): apt-get install -y prometheus"


# ------------------------------------------------------------------------------------ compose model


class MissingVariable(ValueError):
    """A `${VAR:?msg}` whose variable is unset: compose refuses to start."""


class Reset:
    """A value tagged `!reset` in an override file."""


class Override:
    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags; `<<` merge keys are SafeLoader's own."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(loader.construct_object(node, deep=True))
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e},
    ${VAR:+a}, ${VAR+a}, with nested expressions in d/e/a."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise ValueError(f"unclosed ${{ in {text!r}")
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            out.append(_expand(text[i + 2 : j - 1], env))
            i = j
        else:
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1 :])
            if not m:
                raise ValueError(f"bare $ in {text!r} (write $$)")
            out.append(env.get(m.group(), ""))
            i += 1 + m.end()
    return "".join(out)


def _expand(body: str, env: dict[str, str]) -> str:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.S)
    if not m:
        raise ValueError(f"invalid interpolation ${{{body}}}")
    name, op, arg = m.groups()
    value = env.get(name)
    if op is None:
        return value or ""
    missing = value is None or (op.startswith(":") and value == "")
    kind = op[-1]
    if kind == "-":
        return interpolate(arg, env) if missing else value
    if kind == "?":
        if missing:
            raise MissingVariable(f"{name}: {interpolate(arg, env)}")
        return value
    return "" if missing else interpolate(arg, env)  # "+"


def _interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, Override):
        return Override(_interpolate_tree(node.value, env))
    return node


REPLACED_LISTS = {"command", "entrypoint", "test"}  # compose overrides these instead of appending


def _merge(base, over, key=""):
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                merged.pop(k, None)
            else:
                merged[k] = _merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED_LISTS:
        return base + [v for v in over if v not in base]
    return over


def load_compose(*files: pathlib.Path, env: dict[str, str] | None = None) -> dict:
    env = SAMPLE_ENV if env is None else env
    model: dict = {}
    for f in files:
        doc = yaml.load(f.read_text(), Loader=ComposeLoader)
        model = _merge(model, _interpolate_tree(doc, env))
    return model


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def service_config(service: dict):
    """The config `epd` builds in this container: command line + container environment."""
    argv = service["command"]
    assert isinstance(argv, list), "use the exec form for command: (a list)"
    args = cli.make_parser().parse_args([str(a) for a in argv])
    assert args.command in ROLES, argv
    return cli.build_config(ROLES[args.command], args, environ=service_env(service))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def configs(compose) -> dict:
    return {role: service_config(compose["services"][role]) for role in ROLES}


# ------------------------------------------------------------------------------------ compose


def test_interpolation_follows_compose_rules():
    env = {"A": "a", "E": ""}
    assert interpolate("${A}-${A:-x}-${E:-x}-${E-x}-${U-x}-$$A-$A", env) == "a-a-x--x-$A-a"
    assert interpolate("${U:-${A}:1}", env) == "a:1"
    assert interpolate("${A:+yes}${U:+no}", env) == "yes"
    with pytest.raises(MissingVariable, match="U: say"):
        interpolate("${U:?say}", env)
    with pytest.raises(MissingVariable):
        interpolate("${E:?say}", env)


def test_compose_has_the_four_services(compose):
    assert {"encoder", "language", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_refuses_to_start_without_epd_host():
    with pytest.raises(MissingVariable, match="EPD_HOST"):
        load_compose(COMPOSE, env={"GRAFANA_ADMIN_PASSWORD": "x"})
    with pytest.raises(MissingVariable, match="EPD_HOST"):
        load_compose(COMPOSE, env={"EPD_HOST": "", "GRAFANA_ADMIN_PASSWORD": "x"})


@pytest.mark.parametrize("role", ROLES)
def test_epd_services_reserve_a_gpu_and_rdma(compose, role):
    svc = compose["services"][role]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices, role
    for d in devices:
        assert d["driver"] == "nvidia" and "gpu" in d["capabilities"], d
        assert ("count" in d) != ("device_ids" in d), (
            f"{role}: a GPU reservation needs count or device_ids"
        )
        if "device_ids" in d:
            assert all(
                re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+", str(x)) for x in d["device_ids"]
            ), d
    assert svc["network_mode"] == "host" and svc["ipc"] == "host"
    assert "ports" not in svc, "host networking publishes no ports"
    assert svc["ulimits"]["memlock"] in (-1, {"soft": -1, "hard": -1})
    assert "IPC_LOCK" in svc["cap_add"]
    assert any(str(d).split(":")[0] == "/dev/infiniband" for d in svc["devices"])
    assert svc["restart"] == "unless-stopped"
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_service_commands_build_valid_configs(configs):
    enc, lang = configs["encoder"], configs["language"]
    for cfg in (enc, lang):
        assert cfg.host == HOST_IP, (
            "EPD_HOST is the gRPC bind address and the Mooncake session host"
        )
        assert cfg.device == "cuda:0" and cfg.protocol == "rdma"
    assert (enc.port, enc.metrics_port) == (50051, 9101)
    assert (lang.port, lang.metrics_port) == (50052, 9102)
    assert lang.encoder == (f"{enc.host}:{enc.port}",)


def test_compose_variables_override_defaults():
    env = {
        **SAMPLE_ENV,
        "EPD_PROTOCOL": "tcp",
        "ENCODER_ADDR": "10.0.0.9:50051",
        "EPD_RDMA_DEVICE": "mlx5_0",
    }
    services = load_compose(COMPOSE, env=env)["services"]
    lang = service_config(services["language"])
    assert (
        lang.protocol == "tcp"
        and lang.encoder == ("10.0.0.9:50051",)
        and lang.rdma_device == "mlx5_0"
    )


def test_tcp_override_drops_rdma_devices():
    services = load_compose(COMPOSE, COMPOSE_TCP)["services"]
    for role in ROLES:
        assert "devices" not in services[role], role
        cfg = service_config(services[role])
        assert cfg.protocol == "tcp" and cfg.host == HOST_IP
        assert services[role]["deploy"]["resources"]["reservations"]["devices"], "still on a GPU"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(a) * units[b] for a, b in parts)


@pytest.mark.parametrize("role", ROLES)
def test_healthcheck_asks_the_services_own_grpc_port(compose, configs, role):
    check = compose["services"][role]["healthcheck"]
    test = check["test"]
    assert test[:3] == ["CMD", "epd", "health"], test
    args = cli.make_parser().parse_args(test[2:])  # the real `epd health` parser
    assert args.command == "health"
    cfg = configs[role]
    assert args.address == f"{cfg.host}:{cfg.port}", (
        "the health check must reach the bound gRPC address"
    )
    assert _seconds(check["timeout"]) > args.timeout, (
        "compose must not kill the check before it answers"
    )
    assert _seconds(check["start_period"]) >= 60


def test_language_waits_for_a_healthy_encoder(compose):
    assert (
        compose["services"]["language"]["depends_on"]["encoder"]["condition"] == "service_healthy"
    )


def test_graceful_stop_outlasts_shutdown_grace(compose, configs):
    for role in ROLES:
        assert (
            _seconds(compose["services"][role]["stop_grace_period"])
            > configs[role].shutdown_grace_s
        )


def test_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"


# ------------------------------------------------------------------------------------ scaled encoders

SCALE_ENV = {
    "GRAFANA_ADMIN_PASSWORD": "sample-password"
}  # no EPD_HOST: each container finds its own
FAKE_EPD = """#!{python}
import json, os, sys
print(json.dumps({{"env": {{k: v for k, v in os.environ.items() if k.startswith("EPD_")}}, "argv": sys.argv[1:]}}))
"""


@pytest.fixture(scope="module")
def scale() -> dict:
    return load_compose(COMPOSE_SCALE, env=SCALE_ENV)


@pytest.fixture(scope="module")
def container_bin(tmp_path_factory) -> pathlib.Path:
    """A PATH for running a container's shell commands here: the real python3 (the image's is
    the venv's) and an `epd` that only records the environment and arguments it was given."""
    d = tmp_path_factory.mktemp("container-bin")
    (d / "python3").symlink_to(sys.executable)
    (d / "epd").write_text(FAKE_EPD.format(python=sys.executable))
    (d / "epd").chmod(0o755)
    return d


def _own_address() -> str:
    """What the compose file's snippet computes in a container: its address on the network."""
    return socket.gethostbyname(socket.gethostname())


def run_like_docker(
    argv: list[str], env: dict[str, str], container_bin: pathlib.Path
) -> tuple[dict, list[str]]:
    """Run argv (entrypoint + command, or a healthcheck) with the real /bin/sh and python3, as the
    container would; returns the EPD_* environment and the arguments `epd` was started with."""
    run = subprocess.run(
        argv,
        env={**env, "PATH": f"{container_bin}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return out["env"], out["argv"]


def scaled_config(service: dict, container_bin: pathlib.Path):
    """The config `epd` builds in a container of the scale file: the entrypoint runs for real."""
    argv = [*service["entrypoint"], *map(str, service["command"])]
    env, args = run_like_docker(argv, service_env(service), container_bin)
    assert args == list(map(str, service["command"])), (
        "the entrypoint must pass the command on unchanged"
    )
    parsed = cli.make_parser().parse_args(args)
    assert parsed.command in ROLES, args
    return cli.build_config(ROLES[parsed.command], parsed, environ=env)


@pytest.fixture(scope="module")
def scale_configs(scale, container_bin) -> dict:
    return {role: scaled_config(scale["services"][role], container_bin) for role in ROLES}


def test_scale_file_needs_only_the_grafana_password():
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        load_compose(COMPOSE_SCALE, env={})
    assert {"encoder", "language", "prometheus", "grafana"} <= set(
        load_compose(COMPOSE_SCALE)["services"]
    )


def test_scaled_encoder_has_nothing_fixed_per_container(scale):
    """`--scale encoder=N` starts N identical containers: no name, hostname or host port of its own."""
    svc = scale["services"]["encoder"]
    for key in ("container_name", "hostname", "ports", "network_mode", "mac_address"):
        assert key not in svc, f"encoder: {key} cannot be shared by several replicas"
    for role in ROLES:
        nets = scale["services"][role]["networks"]
        assert nets and set(nets) <= set(scale["networks"]), (
            f"{role}: on the compose bridge network"
        )
        assert "network_mode" not in scale["services"][role], (
            f"{role}: no host network (no service DNS there)"
        )
    assert "network_mode" not in scale["services"]["prometheus"]


def test_scaled_services_advertise_their_own_container_address(scale_configs):
    """EPD_HOST is each container's own address, set by the entrypoint: gRPC, /metrics and the
    Mooncake session the peers write to are bound to it; Mooncake over TCP across the bridge."""
    own = _own_address()
    enc, lang = scale_configs["encoder"], scale_configs["language"]
    for cfg in (enc, lang):
        assert cfg.host == own and cfg.protocol == "tcp" and cfg.device == "cuda:0"
    assert (enc.port, enc.metrics_port) == (50051, 9101)
    assert (lang.port, lang.metrics_port, lang.tp) == (50052, 9102, 1)


def test_language_finds_every_encoder_replica_by_the_service_name(scale, scale_configs):
    lang, enc = scale_configs["language"], scale_configs["encoder"]
    (address,) = lang.encoder_addresses()
    host, port = address.rsplit(":", 1)
    assert host in scale["services"] and host == "encoder" and int(port) == enc.port
    # Docker's DNS answers the name with one A record per replica: the language uses each.
    replicas = ["172.20.0.4", "172.20.0.2", "172.20.0.3"]

    def lookup(h, p, *_):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p)) for ip in replicas]

    found, names = resolve_addresses(lang.encoder_addresses(), lambda a: encoders.lookup(a, lookup))
    assert found == [f"{ip}:{enc.port}" for ip in sorted(replicas)]
    assert names == [address], "the name is looked up again as replicas come and go"


def test_language_publishes_one_host_port_per_replica(scale, scale_configs):
    (mapping,) = scale["services"]["language"]["ports"]
    published, target = mapping.rsplit(":", 1)
    assert int(target) == scale_configs["language"].port
    lo, _, hi = published.partition("-")
    assert hi and int(hi) - int(lo) >= 1, (
        "a range, so several language replicas can each publish one"
    )


@pytest.mark.parametrize("role", ROLES)
def test_scaled_healthcheck_asks_the_containers_own_address(
    scale, scale_configs, container_bin, role
):
    svc = scale["services"][role]
    check = svc["healthcheck"]
    kind, script = check["test"]
    assert kind == "CMD-SHELL"
    _, argv = run_like_docker(["/bin/sh", "-c", script], service_env(svc), container_bin)
    args = cli.make_parser().parse_args(argv)  # the real `epd health` parser
    cfg = scale_configs[role]
    assert args.command == "health" and args.address == f"{cfg.host}:{cfg.port}"
    assert _seconds(check["timeout"]) > args.timeout and _seconds(check["start_period"]) >= 60


def test_scaled_services_reserve_a_gpu_and_stop_gracefully(scale, scale_configs):
    for role in ROLES:
        svc = scale["services"][role]
        (d,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert d["driver"] == "nvidia" and "gpu" in d["capabilities"]
        assert all(re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+", str(x)) for x in d["device_ids"]), d
        assert "devices" not in svc, "no /dev/infiniband: TCP only"
        assert _seconds(svc["stop_grace_period"]) > scale_configs[role].shutdown_grace_s
        assert (
            DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]
        ).resolve() == DOCKERFILE
    assert scale["services"]["language"]["depends_on"]["encoder"]["condition"] == "service_healthy"


def test_scale_prometheus_discovers_every_replica_by_dns(scale, scale_configs):
    run = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS_SCALE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    prom = yaml.safe_load(PROMETHEUS_SCALE.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    enc, lang = scale_configs["encoder"], scale_configs["language"]
    for job, service, ports in (
        ("epd-encoder", "encoder", {enc.metrics_port}),
        ("epd-language", "language", {lang.metrics_port + r for r in range(lang.tp)}),
    ):
        sds = jobs[job]["dns_sd_configs"]
        assert all(sd["type"] == "A" and sd["names"] == [service] for sd in sds), sds
        assert {sd["port"] for sd in sds} == ports, (job, sds)
        assert service in scale["services"]
    svc = scale["services"]["prometheus"]
    assert (
        "9090:9090" in svc["ports"] and svc["networks"] == scale["services"]["encoder"]["networks"]
    )
    flags = dict(f.lstrip("-").split("=", 1) for f in svc["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert (DEPLOY / mounts[flags["config.file"]]).resolve() == PROMETHEUS_SCALE
    commented = [int(p) for p in re.findall(r"#\s*port:\s*([0-9]+)", PROMETHEUS_SCALE.read_text())]
    assert commented == list(range(lang.metrics_port + 1, lang.metrics_port + 1 + len(commented)))


def test_scale_grafana_reaches_prometheus_through_its_network(scale):
    """Grafana shares Prometheus's network namespace, so the provisioned data source
    (localhost:9090, the same files as docker-compose.yml) is Prometheus; 3000 is published there."""
    graf, prom = scale["services"]["grafana"], scale["services"]["prometheus"]
    assert graf["network_mode"] == "service:prometheus" and "ports" not in graf
    assert "3000:3000" in prom["ports"] and graf["environment"]["GF_SERVER_HTTP_PORT"] == "3000"
    ds = next(
        d
        for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]
        if d["type"] == "prometheus"
    )
    assert re.fullmatch(r"http://(localhost|127\.0\.0\.1):9090/?", ds["url"]), ds["url"]
    base = load_compose(COMPOSE)["services"]["grafana"]
    assert graf["volumes"] == base["volumes"] and graf["image"] == base["image"]
    for name, svc in scale["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"


def test_readme_documents_scaling_encoders():
    section = _readme_operating()
    assert (
        "docker compose -f deploy/docker-compose.scale.yml up -d --build --scale encoder="
        in section
    )
    assert "dns_sd_configs" in section and "prometheus.scale.yml" in section


# ------------------------------------------------------------------------------------ Prometheus


def _prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def _targets(job: str) -> list[str]:
    jobs = {j["job_name"]: j for j in _prometheus()["scrape_configs"]}
    assert job in jobs, f"scrape job {job} missing"
    return [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]


def test_scrape_targets_match_the_metrics_ports(compose, configs):
    prom = _prometheus()
    assert prom["global"]["scrape_interval"] == "5s"
    svc = compose["services"]["prometheus"]
    assert svc["network_mode"] == "host", (
        "the services' /metrics listen on EPD_HOST of the host network"
    )
    aliases = dict(h.split(":", 1) for h in svc.get("extra_hosts", []))
    enc, lang = configs["encoder"], configs["language"]
    expected = {
        "epd-encoder": {enc.metrics_port},
        "epd-language": {lang.metrics_port + r for r in range(lang.tp)},
    }  # rank R on metrics_port + R
    for job, ports in expected.items():
        targets = _targets(job)
        hosts = {t.rsplit(":", 1)[0] for t in targets}
        assert ports <= {int(t.rsplit(":", 1)[1]) for t in targets}, (job, targets)
        for host in hosts:
            assert aliases.get(host, host) == HOST_IP, (
                f"{job}: {host} is not the services' EPD_HOST"
            )
    # The commented-out rank targets continue the sequence 9103, 9104, ... for --tp > 1.
    commented = [int(p) for p in re.findall(r"#\s*-\s*epd-host:([0-9]+)", PROMETHEUS.read_text())]
    assert commented == list(range(lang.metrics_port + 1, lang.metrics_port + 1 + len(commented)))


def test_prometheus_container_reads_this_file(compose):
    svc = compose["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v[0-9]+\.[0-9]+\.[0-9]+", svc["image"]), "pin the image"
    flags = dict(f.lstrip("-").split("=", 1) for f in svc["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert (DEPLOY / mounts[flags["config.file"]]).resolve() == PROMETHEUS
    assert flags["web.listen-address"].rsplit(":", 1)[1] == "9090"


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, PROMTOOL_HINT
    return path


def test_promtool_check_config():
    run = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------------------------ Grafana


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    out = []
    for p in _dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return [p for p in out if p.get("type") != "row"]


def _targets_of_dashboard() -> list[dict]:
    return [t for p in _panels() for t in p["targets"]]


def _exprs() -> list[str]:
    exprs = [t["expr"] for t in _targets_of_dashboard()]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def _promql(expr: str) -> str:
    """Grafana variables replaced by what Grafana sends for 'All'."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$role", ".*")
        .replace("$instance", ".*")
    )


def _metric_labels() -> dict[str, set[str]]:
    """Sample name -> label names, from the metric definitions of services/edge/metrics.py."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    labels: dict[str, set[str]] = {}
    for role, rank in (("encoder", None), ("language", 0)):
        for w in vars(metrics.Metrics(role, rank)).values():
            if isinstance(w, MetricWrapperBase):
                for s in suffixes[w._type]:
                    labels.setdefault(w._name + s, set()).update(
                        w._labelnames, {"le"} if s == "_bucket" else ()
                    )
    return labels


EXPORTED = metrics.exported_names("encoder") | metrics.exported_names("language", 0)
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped sample


def test_metric_label_table_covers_every_exported_name():
    assert set(_metric_labels()) >= EXPORTED


def test_dashboard_uses_only_exported_metric_names():
    used = {name for e in _exprs() for name in re.findall(r"\bepd_[a-z_]+\b", e)}
    unknown = used - EXPORTED
    assert not unknown, f"not exported by services/edge/metrics.py: {sorted(unknown)}"
    families = [
        "epd_transfer_bytes_total",
        "epd_transfer_seconds_bucket",
        "epd_rounds_per_request",
        "epd_pool_blocks",
        "epd_failures_total",
        "epd_inflight_transfers",
        "epd_requests_total",
        "epd_resumes_total",
        "epd_alloc_wait_seconds_bucket",
        "epd_integrity_failures_total",
        "epd_rpc_seconds_bucket",
        "epd_rpc_seconds_count",
    ]
    for family in families:
        assert any(n.startswith(family) for n in used), f"no panel shows {family}"


def test_dashboard_uses_only_existing_label_names():
    table = _metric_labels()
    for expr in _exprs():
        names = set(re.findall(r"\bepd_[a-z_]+\b", expr))
        allowed = set().union(*(table[n] for n in names)) | TARGET_LABELS
        used = set()
        for body in re.findall(r"\bepd_[a-z_]+\s*\{([^}]*)\}", expr):
            used |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            used |= {x.strip() for x in group.split(",") if x.strip()}
        used |= set(re.findall(r"label_values\([^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", expr))
        assert used <= allowed, f"{expr}: unknown labels {sorted(used - allowed)}"


def test_dashboard_legends_name_labels_the_query_keeps():
    for t in _targets_of_dashboard():
        kept = set()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]):
            kept |= {x.strip() for x in group.split(",")}
        legend = set(
            re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", t.get("legendFormat", ""))
        )
        assert legend <= kept, f"{t['expr']}: legend uses {sorted(legend - kept)}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {
        "groups": [
            {
                "name": "epd-dashboard",
                "rules": [
                    {"record": f"epd_dashboard:expr{i}", "expr": _promql(e)}
                    for i, e in enumerate(t["expr"] for t in _targets_of_dashboard())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    run = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_panels_have_a_title_and_the_provisioned_datasource():
    dash = _dashboard()
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prom = next(d for d in ds if d["type"] == "prometheus")
    assert dash["uid"] and dash["title"] == "EPD embedding transfer" and dash["schemaVersion"] >= 36
    panels = _panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        assert p.get("title"), p
        assert p["datasource"] == {"type": "prometheus", "uid": prom["uid"]}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"] and t["expr"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == prom["uid"], var["name"]


def test_grafana_provisioning_matches_the_compose_mounts(compose):
    svc = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:[0-9]+\.[0-9]+\.[0-9]+", svc["image"]), (
        "pin the image"
    )
    mounts = {}
    for v in svc["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            mounts[dst] = (DEPLOY / src).resolve()
    assert mounts["/etc/grafana/provisioning"] == (DEPLOY / "grafana" / "provisioning").resolve()
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    for p in providers:
        folder = p["options"]["path"]
        assert folder in mounts, f"dashboard provider path {folder} is not mounted in compose"
        assert (mounts[folder] / DASHBOARD.name).resolve() == DASHBOARD
    home = svc["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, name = home.rsplit("/", 1)
        assert (mounts[folder] / name).exists(), home
    ds = next(
        d
        for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]
        if d["type"] == "prometheus"
    )
    assert svc["network_mode"] == compose["services"]["prometheus"]["network_mode"] == "host"
    assert re.fullmatch(r"http://(localhost|127\.0\.0\.1):9090/?", ds["url"]), ds["url"]


# ------------------------------------------------------------------------------------ image


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if buf and raw.lstrip().startswith("#"):
            continue
        buf += raw.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def _args(instructions) -> dict[str, str]:
    return {k: v for op, arg in instructions if op == "ARG" for k, _, v in [arg.partition("=")]}


def test_dockerfile_builds_a_cuda_image_with_the_gpu_extra():
    ins = _dockerfile()
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) == 1
    base = re.fullmatch(
        r"nvidia/cuda:([0-9]+)\.([0-9]+)\.[0-9]+-(cudnn-)?runtime-ubuntu[0-9.]+", froms[0]
    )
    assert base, f"pin a CUDA runtime base image: {froms[0]}"
    cuda = base.group(1) + base.group(2)
    assert base.group(1) == "12", (
        "mooncake-transfer-engine is the CUDA 12 build (CUDA 13: a separate package)"
    )
    args = _args(ins)
    runs = " ".join(a for op, a in ins if op == "RUN")
    expanded = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: args.get(m.group(1), m.group(0)), runs)
    torch = re.search(
        r'pip install "?torch==([0-9.]+)"? --index-url "?https://download\.pytorch\.org/whl/cu([0-9]+)',
        expanded,
    )
    assert torch, "install a pinned CUDA build of torch from the PyTorch index"
    assert torch.group(2) == cuda, f"torch cu{torch.group(2)} on a CUDA {cuda} base"
    # The image runs the torch release the tests run (the Makefile's CPU pin), in its CUDA build.
    tested = re.search(r"^TORCH\s*\?=\s*torch==([0-9.]+)$", (ROOT / "Makefile").read_text(), re.M)
    assert tested and torch.group(1) == tested.group(1), (
        f"the image pins torch {torch.group(1)}, the tests run {tested and tested.group(1)}"
    )
    assert re.search(r'pip install "?\.\[([a-z0-9_-]+,)*gpu(,[a-z0-9_-]+)*\]"?', runs), (
        'install the project with its gpu extra: pip install ".[gpu]"'
    )
    pyproject = (ROOT / "pyproject.toml").read_text()
    # 0.3.12.post1 and later acknowledge TCP writes only once they landed (the write fence relies on it).
    assert re.search(r'gpu = \["mooncake-transfer-engine>=0\.3\.12\.post1"', pyproject)
    assert re.search(r'cpu = \["mooncake-transfer-engine-non-cuda>=0\.3\.12\.post1"', pyproject)
    for pkg in ("libibverbs1", "librdmacm1", "libnuma1", "ibverbs-providers", "python3-venv"):
        assert re.search(rf"\b{re.escape(pkg)}\b", runs), pkg
    entry = [a for op, a in ins if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["epd"]


def _ignored(path: str, patterns: list[str]) -> bool:
    import fnmatch

    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes
        ):
            hit = not neg
    return hit


def test_dockerfile_copies_existing_files_not_excluded_from_the_context():
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".venv", ".git"):
        assert _ignored(must, patterns), f".dockerignore must exclude {must}"
    assert _ignored("common/__pycache__/x.pyc", patterns)
    for op, arg in _dockerfile():
        if op == "COPY":
            words = [w for w in shlex.split(arg) if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context (repo root)"
                assert not _ignored(src.strip("./") or ".", patterns) or src == ".", (
                    f"COPY {src} is dockerignored"
                )


# ------------------------------------------------------------------------------------ README


def _readme_operating() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Operating\n" in text, "README needs an Operating section"
    return text.split("\n## Operating\n", 1)[1].split("\n## ", 1)[0]


def test_readme_operating_documents_every_metric_and_panel():
    section = _readme_operating()
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", n) for n in EXPORTED}
    for family in families:
        shown = family + "_total" if family + "_total" in EXPORTED else family
        assert f"`{shown}`" in section, f"README Operating: no row for {shown}"
    for p in _panels():
        assert f"| {p['title']} |" in section, f"README Operating: no row for panel {p['title']!r}"
    for port in ("50051", "50052", "9101", "9102", "9090", "3000"):
        assert port in section, port
