"""Validate docker/ without a Docker engine (``make test-deploy``, tests/test_deploy.py).

    python -m scripts.deploy_check           # check every file, print the problems
    python -m scripts.deploy_check lock      # rewrite docker/requirements.txt from .venv

No Docker engine runs here, so nothing is built or started. What can be checked
is checked with the code Docker itself runs, in ``scripts/deploycheck`` (Go,
built once into ``.cache/bin`` like the FerretDB launcher):

- the Dockerfile through BuildKit's parser and the lint rules of
  ``docker build --check``, every stage and instruction; the build context as
  ``.dockerignore`` leaves it, and every COPY source must be in it;
- the compose file through compose-go, the loader of ``docker compose config``
  (schema, interpolation, references between services, volumes, networks).

On top, the rules this deployment depends on (the functions below): a
version-pinned base, a non-root final stage with no compilers or package
installs, the health check, the command; Redis with AOF and no eviction,
journaled MongoDB writes, every host's settings valid for ``core.settings`` and
equal where hosts must agree, flushers with unique explicit instance names,
stop grace longer than the service's own; a lock file that pins every runtime
dependency the image's code imports.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from core.settings import Settings, SettingsError, load_settings
from scripts.stack import ROOT, StackError, go_build

DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_NAME = "docker/compose.yaml"
LOCK = ROOT / "docker" / "requirements.txt"
PYPROJECT = ROOT / "pyproject.toml"
CHECKER_SRC = ROOT / "scripts" / "deploycheck"
CHECKER_BIN = ROOT / ".cache" / "bin" / "deploycheck"

Report = dict[str, Any]

# --------------------------------------------------------------- the Go checker


IMAGE_HOST = "0.0.0.0"  # containers listen on every address: ports are published


def ensure_checker() -> Path:
    """``.cache/bin/deploycheck``, built with Go when missing or older than its sources."""
    return go_build(
        CHECKER_SRC,
        CHECKER_BIN,
        "scripts/deploycheck (BuildKit's Dockerfile parser and compose-go)",
        "Go is needed to build scripts/deploycheck (BuildKit's Dockerfile parser and "
        "compose-go), as for the FerretDB launcher: install Go (https://go.dev/dl/)",
    )


def _run_checker(*args: str) -> Report:
    done = subprocess.run(
        [str(ensure_checker()), *args], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise StackError(f"deploycheck {' '.join(args)} failed: {done.stderr.strip()}")
    report: Report = json.loads(done.stdout)
    return report


def dockerfile_report(dockerfile: Path = DOCKERFILE, context: Path = ROOT) -> Report:
    return _run_checker("dockerfile", str(context), str(dockerfile))


def compose_report(compose: Path = COMPOSE) -> Report:
    return _run_checker("compose", str(compose))


# ------------------------------------------------------------------ the project


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def app_packages() -> list[str]:
    return list(pyproject()["tool"]["setuptools"]["packages"])


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


# ------------------------------------------------------------------- Dockerfile

PINNED_IMAGE = re.compile(r"^[\w.\-/:]+?:\d+\.\d+\.\d+[\w.\-]*(@sha256:[0-9a-f]{64})?$")
DIGEST_IMAGE = re.compile(r"^[\w.\-/:]+@sha256:[0-9a-f]{64}$")
PACKAGE_INSTALL = re.compile(
    r"\b(apt-get|apt|aptitude|dnf|yum|microdnf)\s+(?:-\S+\s+)*install\b"
    r"|\bapk\s+(?:-\S+\s+)*add\b|\bpip3?\s+(?:-\S+\s+)*install\b|-m\s+pip\s+install\b"
)
BUILD_TOOLS = re.compile(
    r"(?<![\w./-])(gcc|g\+\+|cc|c\+\+|clang|make|cmake|build-essential|libc6-dev"
    r"|[\w.+-]+-dev|cargo|rustc|go|golang|git)(?![\w./+-])"
)
ROOT_USERS = {"", "root", "0"}
CONTEXT_FORBIDDEN = (".git/", ".venv/", "var/", ".cache/", ".hypothesis/", "tests/", "k6/")
CONTEXT_MAX_BYTES = 5 * 1024 * 1024
DEFAULT_PORT = str(Settings().port)
SERVE = ["python", "-m", "scripts.serve"]


def _where(stage: Report, cmd: Report | None = None) -> str:
    line = cmd["line"] if cmd else stage["line"]
    return f"Dockerfile line {line} (stage {stage['name'] or '?'})"


def _commands(stage: Report, instruction: str) -> list[Report]:
    return [c for c in stage["commands"] if c["instruction"] == instruction]


def dockerfile_problems(report: Report, packages: Iterable[str] | None = None) -> list[str]:
    """What keeps the Dockerfile from being the image this deployment needs."""
    problems: list[str] = []
    if report.get("error"):
        return [f"Dockerfile does not build: {report['error']}"]
    problems += [
        f"Dockerfile line {w['line']}: {w['rule']}: {w['message']} (docker build --check)"
        for w in report["lint"]
    ]
    problems += [f"Dockerfile {m}" for m in report["missing_sources"]]
    stages: list[Report] = report["stages"]
    if len(stages) < 2:
        return [*problems, "Dockerfile: want a build stage and a runtime stage (multi-stage)"]
    names = {s["name"] for s in stages if s["name"]}
    images = {s["name"]: s["image"] for s in stages}
    for stage in stages:
        image = stage["image"]
        if image in names:
            continue
        if not (PINNED_IMAGE.match(image) or DIGEST_IMAGE.match(image)) or ":latest" in image:
            problems.append(
                f"{_where(stage)}: base image {image!r} is not pinned to a version "
                "(name:MAJOR.MINOR.PATCH…, or a digest)"
            )
    final = stages[-1]
    problems += _final_stage_problems(final, images, list(packages or app_packages()))
    problems += _context_problems(report)
    return problems


def _final_stage_problems(final: Report, images: dict[str, str], packages: list[str]) -> list[str]:
    problems: list[str] = []
    users = _commands(final, "user")
    if not users:
        problems.append(f"{_where(final)}: the final stage has no USER: it would run as root")
    else:
        user = users[-1]["args"][0].split(":")[0]
        if user in ROOT_USERS:
            problems.append(f"{_where(final, users[-1])}: the final stage runs as root ({user!r})")
    for cmd in _commands(final, "run"):
        text = " ".join(cmd["args"])
        if PACKAGE_INSTALL.search(text):
            problems.append(
                f"{_where(final, cmd)}: the final stage installs packages; "
                "install them in the build stage and copy the virtualenv"
            )
        if tool := BUILD_TOOLS.search(text):
            problems.append(f"{_where(final, cmd)}: build tool {tool.group(1)!r} in final stage")
    for cmd in _commands(final, "copy") + _commands(final, "add"):
        if cmd["from"]:
            if cmd["from"] in images and images[cmd["from"]] != final["image"]:
                problems.append(
                    f"{_where(final, cmd)}: copies from stage {cmd['from']!r}, built on "
                    f"{images[cmd['from']]!r}, not the final base {final['image']!r} "
                    "(a virtualenv's interpreter must be the same)"
                )
            for source in cmd["args"]:
                if "venv" not in source:
                    problems.append(
                        f"{_where(final, cmd)}: copies {source!r} from another stage; "
                        "only the runtime virtualenv belongs in the final stage"
                    )
        elif any(s.strip("./") == "" for s in cmd["args"]):
            problems.append(f"{_where(final, cmd)}: copies the whole build context")
    copied = [s.rstrip("/") for c in _commands(final, "copy") if not c["from"] for s in c["args"]]
    for package in packages:
        if not any(s == package or s.startswith(f"{package}/") for s in copied):
            problems.append(f"{_where(final)}: the final stage does not copy package {package!r}")
    problems += _health_problems(final, copied)
    cmds = _commands(final, "cmd")
    if not cmds or cmds[-1]["shell_form"] or cmds[-1]["args"] != SERVE:
        problems.append(f"{_where(final)}: CMD must be {json.dumps(SERVE)} (exec form)")
    if _commands(final, "entrypoint"):
        problems.append(f"{_where(final)}: an ENTRYPOINT would wrap the CMD; none expected")
    env: dict[str, str] = {}
    for cmd in _commands(final, "env"):
        env.update(cmd["env"])
    if env.get("HOST") != IMAGE_HOST:
        problems.append(f"{_where(final)}: no ENV HOST=0.0.0.0: it would listen on loopback only")
    exposed = {p.split("/")[0] for c in _commands(final, "expose") for p in c["args"]}
    if env.get("PORT", DEFAULT_PORT) not in exposed:
        problems.append(f"{_where(final)}: EXPOSE {env.get('PORT', DEFAULT_PORT)} missing")
    return problems


def _health_problems(final: Report, copied: list[str]) -> list[str]:
    checks = _commands(final, "healthcheck")
    if not checks:
        return [f"{_where(final)}: no HEALTHCHECK in the final stage"]
    cmd = checks[-1]
    test: list[str] = cmd["health"]["test"]
    if not test or test[0] != "CMD":
        return [f"{_where(final, cmd)}: HEALTHCHECK must be a CMD in exec form (got {test!r})"]
    # the probe it runs is a file of this repository that asks GET /health
    names = {Path(a).name for a in test[1:]}
    probes = [ROOT / s for s in copied if Path(s).name in names]
    if not probes or not all(p.is_file() and "/health" in p.read_text() for p in probes):
        return [f"{_where(final, cmd)}: HEALTHCHECK does not run a copied probe of GET /health"]
    return []


def _context_problems(report: Report) -> list[str]:
    problems: list[str] = []
    if not report["ignore_file"]:
        problems.append("no .dockerignore: the whole repository (.venv, var, .git) is sent")
    unwanted: dict[str, int] = {}
    for path in report["context_files"]:
        if path.startswith(CONTEXT_FORBIDDEN) or "__pycache__/" in path:
            top = path.split("/")[0] + "/" if path.startswith(CONTEXT_FORBIDDEN) else "__pycache__/"
            unwanted[top] = unwanted.get(top, 0) + 1
    for top, count in sorted(unwanted.items()):
        problems.append(f"build context holds {count} file(s) of {top} (.dockerignore it)")
    if report["context_bytes"] > CONTEXT_MAX_BYTES:
        problems.append(f"build context is {report['context_bytes']:,} bytes (over 5 MiB)")
    return problems


# ---------------------------------------------------------------------- compose

# settings each host picks for itself; every other one must agree across hosts
PER_HOST = ("roles", "workers", "flushers", "instance_name", "host", "port", "log_level",
            "flush_concurrency")  # fmt: skip
DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
DOCKER_STOP_GRACE_SECONDS = 10.0


def seconds(duration: str | None, default: float) -> float:
    """A compose duration ("1m30s") in seconds."""
    if not duration:
        return default
    parts = DURATION.findall(duration)
    if "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


def redis_options(command: list[str]) -> dict[str, str]:
    """``redis-server --name value …`` as {name: value}."""
    options: dict[str, str] = {}
    for i, word in enumerate(command):
        if word.startswith("--") and i + 1 < len(command):
            options[word[2:]] = command[i + 1]
    return options


def _image_service(services: dict[str, Report], repository: str) -> str | None:
    found = [n for n, s in services.items() if str(s.get("image", "")).startswith(f"{repository}:")]
    return found[0] if len(found) == 1 else None


def is_app_service(service: Report) -> bool:
    build = service.get("build") or {}
    return str(build.get("dockerfile", "")).endswith("docker/Dockerfile")


def compose_problems(report: Report) -> list[str]:
    """What keeps the compose file from being the deployment docs/OPERATIONS.md describes."""
    if report.get("error"):
        return [f"{COMPOSE_NAME} does not load (docker compose config): {report['error']}"]
    services: dict[str, Report] = report["project"]["services"]
    problems: list[str] = []
    mongo = _image_service(services, "mongo")
    redis = _image_service(services, "redis")
    if not mongo:
        problems.append("want one MongoDB service (image mongo:7.x.y)")
    if not redis:
        problems.append("want one Redis service (image redis:7.x.y)")
    for name, service in services.items():
        image = str(service.get("image", ""))
        if not is_app_service(service) and not re.match(r"^[\w./-]+:\d+\.\d+\.\d+", image):
            problems.append(f"{name}: image {image!r} is not pinned to a version")
        if service.get("restart") in (None, "no"):
            problems.append(f"{name}: no restart policy")
    if mongo:
        problems += _store_problems(services[mongo], mongo, "/data/db", r"^mongo:7\.")
    if redis:
        problems += _store_problems(services[redis], redis, "/data", r"^redis:7\.")
        problems += _redis_problems(services[redis], redis)
    apps = {n: s for n, s in services.items() if is_app_service(s)}
    problems += _app_problems(apps, mongo, redis)
    return [f"{COMPOSE_NAME}: {p}" for p in problems]


def _store_problems(service: Report, name: str, data_dir: str, image: str) -> list[str]:
    problems: list[str] = []
    if not re.match(image, str(service.get("image", ""))):
        problems.append(f"{name}: want image {image[1:]}…, got {service.get('image')!r}")
    volumes = service.get("volumes") or []
    if not any(v.get("type") == "volume" and v.get("target") == data_dir for v in volumes):
        problems.append(f"{name}: no named volume at {data_dir}: data dies with the container")
    health = service.get("healthcheck") or {}
    if not health.get("test") or health.get("disable"):
        problems.append(f"{name}: no healthcheck (the service waits for it)")
    return problems


def _redis_problems(service: Report, name: str) -> list[str]:
    command = list(service.get("command") or [])
    options = redis_options(command)
    problems: list[str] = []
    if not command or command[0] != "redis-server":
        problems.append(f"{name}: command must start redis-server with its options")
    if options.get("appendonly") != "yes":
        problems.append(f"{name}: no --appendonly yes: queue and tails would not survive a restart")
    if options.get("appendfsync") not in ("always", "everysec"):
        problems.append(f"{name}: --appendfsync must be always or everysec")
    if options.get("maxmemory-policy", "noeviction") != "noeviction":
        problems.append(f"{name}: --maxmemory-policy must be noeviction: eviction drops the queue")
    return problems


def _app_problems(apps: dict[str, Report], mongo: str | None, redis: str | None) -> list[str]:
    problems: list[str] = []
    if not apps:
        return ["no service is built from docker/Dockerfile"]
    settings: dict[str, Settings] = {}
    for name, service in apps.items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None}
        env.setdefault("HOST", IMAGE_HOST)  # the image's ENV (checked in the Dockerfile)
        try:
            settings[name] = load_settings(env)
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
            continue
        s = settings[name]
        if s.runs("http") and not s.keys_required:
            problems.append(f"{name}: serves without API keys (AUTH=open): anyone who reaches "
                            "its published port reads and writes every account")  # fmt: skip
        if urlsplit(s.redis_url).hostname != redis:
            problems.append(f"{name}: REDIS_URL {s.redis_url!r} does not name the Redis service")
        mongo_url = urlsplit(s.mongo_url)
        if mongo_url.hostname != mongo:
            problems.append(f"{name}: MONGO_URL {s.mongo_url!r} does not name the MongoDB service")
        query = {k.lower(): v[-1].lower() for k, v in parse_qs(mongo_url.query).items()}
        if query.get("journal") != "true" and query.get("w") != "majority":
            problems.append(
                f"{name}: MONGO_URL must ask for journaled writes "
                "(journal=true or w=majority), or a crash may lose acknowledged batches"
            )
        depends = service.get("depends_on") or {}
        for store in filter(None, (redis, mongo)):
            if (depends.get(store) or {}).get("condition") != "service_healthy":
                problems.append(f"{name}: no depends_on {store} with condition service_healthy")
        if (service.get("healthcheck") or {}).get("disable"):
            problems.append(f"{name}: its healthcheck is disabled")
        grace = seconds(service.get("stop_grace_period"), DOCKER_STOP_GRACE_SECONDS)
        if grace <= s.shutdown_grace_seconds:
            problems.append(
                f"{name}: stop_grace_period {grace:g}s is not over SHUTDOWN_GRACE_SECONDS="
                f"{s.shutdown_grace_seconds:g}: Docker would kill a flusher still draining"
            )
        ports = service.get("ports") or []
        if s.runs("http") and not any(
            str(p.get("target")) == str(s.port) and p.get("published") for p in ports
        ):
            problems.append(f"{name}: an HTTP host publishes no port to its PORT {s.port}")
        if s.runs("flusher"):
            if not service.get("environment", {}).get("INSTANCE_NAME"):
                problems.append(
                    f"{name}: runs flushers without INSTANCE_NAME: the default "
                    "uses the container's hostname, which changes when it is recreated"
                )
            if ((service.get("deploy") or {}).get("replicas") or 1) > 1:
                problems.append(f"{name}: flusher replicas would share one INSTANCE_NAME")
    problems += _agreement_problems(settings)
    return problems


def _agreement_problems(settings: dict[str, Settings]) -> list[str]:
    problems: list[str] = []
    defaults = Settings()
    shared = {n: dataclasses.replace(s, **{f: getattr(defaults, f) for f in PER_HOST})
              for n, s in settings.items()}  # fmt: skip
    first = next(iter(shared), None)
    for name, s in shared.items():
        if first and s != shared[first]:
            differ = [f.name.upper() for f in dataclasses.fields(s)
                      if getattr(s, f.name) != getattr(shared[first], f.name)]  # fmt: skip
            problems.append(f"{name}: {', '.join(differ)} differ from {first}'s")
    hosts = list(settings.items())
    for role, least in (("http", 2), ("flusher", 1), ("rollups", 1)):
        if sum(s.runs(role) for _, s in hosts) < least:
            problems.append(f"want at least {least} host(s) with the {role} role")
    flusher_names = [s.instance for _, s in hosts if s.runs("flusher")]
    for dup in sorted({i for i in flusher_names if flusher_names.count(i) > 1}):
        problems.append(f"INSTANCE_NAME {dup!r} is used by more than one flusher host")
    return problems


# ------------------------------------------------------------ lock and imports

LOCK_NAME = "docker/requirements.txt"
REGENERATE = "regenerate with `python -m scripts.deploy_check lock`"
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def read_lock(text: str) -> tuple[dict[str, str], list[str]]:
    pins: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if m := LOCK_LINE.match(line):
            pins[canonicalize_name(m.group(1))] = m.group(2)
        else:
            problems.append(f"{LOCK_NAME} line {number}: not NAME==VERSION: {raw!r}")
    return pins, problems


def python_files(report: Report) -> Iterator[Path]:
    """The repository's Python files the final stage copies."""
    final = report["stages"][-1]
    sources = [s.rstrip("/") for c in _commands(final, "copy") if not c["from"] for s in c["args"]]
    for path in report["context_files"]:
        if path.endswith(".py") and any(path == s or path.startswith(f"{s}/") for s in sources):
            yield ROOT / path


def imported_modules(path: Path) -> set[str]:
    """Top-level modules a file imports at run time (not under ``if TYPE_CHECKING``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def lock_problems(report: Report, lock_text: str) -> list[str]:
    """docker/requirements.txt pins every runtime dependency and every one the image imports."""
    pins, problems = read_lock(lock_text)
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{LOCK_NAME}: {req} is not pinned; {REGENERATE}")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{LOCK_NAME}: {name}=={pins[name]} is not {req}; {REGENERATE}")
    local = set(app_packages()) | {"__future__"}
    providers = _providers()
    for path in python_files(report):
        relative = path.relative_to(ROOT)
        for module in sorted(imported_modules(path) - local - set(sys.stdlib_module_names)):
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            if not dists:
                problems.append(f"{relative} imports {module}: no installed distribution has it")
            elif not dists & set(pins):
                problems.append(
                    f"{relative} imports {module} ({', '.join(sorted(dists))}), which the image "
                    f"lacks: add it to [project.dependencies], then {REGENERATE}"
                )
    return problems


def runtime_closure() -> dict[str, str]:
    """{name: installed version} of [project.dependencies] and everything they require."""
    found: dict[str, str] = {}
    todo = [(r, frozenset[str]()) for r in runtime_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras or {""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        found[key[0]] = dist.version
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return dict(sorted(found.items()))


def write_lock() -> None:
    lines = [
        "# The image's runtime dependencies, exact versions: [project.dependencies] of",
        "# pyproject.toml and what they require, as installed in .venv (what the tests ran).",
        "# Regenerate: python -m scripts.deploy_check lock",
        *(f"{name}=={version}" for name, version in runtime_closure().items()),
    ]
    LOCK.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------- main


def all_problems() -> list[str]:
    dockerfile = dockerfile_report()
    problems = dockerfile_problems(dockerfile)
    problems += compose_problems(compose_report())
    problems += lock_problems(dockerfile, LOCK.read_text() if LOCK.exists() else "")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", choices=["check", "lock"], default="check")
    args = parser.parse_args(argv)
    if args.action == "lock":
        write_lock()
        print(f"wrote {LOCK.relative_to(ROOT)}")
        return 0
    problems = all_problems()
    for problem in problems:
        print(problem, file=sys.stderr)
    checked = "docker/Dockerfile, docker/compose.yaml, .dockerignore, docker/requirements.txt"
    print(f"{checked}: {len(problems)} problem(s)" if problems else f"{checked}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
