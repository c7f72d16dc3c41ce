"""What a container runs: docker's rules for turning an image config plus `run` flags into a spec.

Pure: no effects. The spec is stored in the container's state.json and used again by `start`,
`exec`, `inspect` and `bundle`.
"""

from __future__ import annotations

from cowfs.errors import InvalidInput
from cowfs.record import asdict, field, record

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORKS = ("none", "host")


@record
class Volume:
    host: str
    container: str
    read_only: bool = False


@record
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None


@record
class RunOptions:
    """The flags of `cowfs run`, as given."""

    command: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    volumes: list[str] = field(default_factory=list)
    read_only: bool = False
    network: str = "none"
    memory: str | None = None
    pids_limit: int | None = None
    cpus: float | None = None
    tty: bool = False
    interactive: bool = False


@record
class ContainerSpec:
    args: list[str]
    env: list[str]
    cwd: str
    user: str  # "" (root), "uid[:gid]" or "name[:group]": resolved against the container's files
    hostname: str
    tty: bool = False
    interactive: bool = False
    read_only: bool = False
    network: str = "none"
    volumes: list[Volume] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ContainerSpec:
        data = dict(data)
        data["volumes"] = [Volume(**v) for v in data.get("volumes", [])]
        data["limits"] = Limits(**data.get("limits", {}))
        return cls(**data)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_memory(text: str) -> int:
    """docker's --memory syntax: a number with an optional b, k, m or g suffix (and a b after
    the unit: 64mb). Parsed by hand: `re` is not loaded on the start path."""
    number, unit = text.strip().lower(), ""
    if number[-2:-1] in ("b", "k", "m", "g") and number.endswith("b"):
        number, unit = number[:-2], number[-2]
    elif number[-1:] in ("b", "k", "m", "g"):
        number, unit = number[:-1], number[-1]
    whole, dot, fraction = number.partition(".")
    if not whole.isdecimal() or (dot and not fraction.isdecimal()):
        raise InvalidInput(f"invalid memory size {text!r} (use e.g. 64m or 1g)")
    value = int(float(number) * _UNITS[unit])
    if value < 4 << 20:
        raise InvalidInput(f"memory limit {text!r} is too small (minimum 4m)")
    return value


def parse_volume(text: str) -> Volume:
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        host, ctr, mode = parts
    elif len(parts) == 2:
        (host, ctr), mode = parts, "rw"
    else:
        raise InvalidInput(f"invalid volume {text!r} (use HOST:CONTAINER[:ro])")
    if not host.startswith("/") or not ctr.startswith("/"):
        raise InvalidInput(f"invalid volume {text!r}: both paths must be absolute")
    if ctr.rstrip("/") == "" or ".." in ctr.split("/"):
        raise InvalidInput(f"invalid volume {text!r}: bad container path")
    return Volume(host, ctr, mode == "ro")


def parse_env(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise InvalidInput(f"invalid environment variable {item!r} (use KEY=VALUE)")
        out.append((key, value))
    return out


def merge_env(base: list[str], extra: list[tuple[str, str]]) -> list[str]:
    """Later entries replace earlier ones with the same key; order of first appearance is kept."""
    env: dict[str, str] = {}
    for key, value in [tuple(e.split("=", 1)) if "=" in e else (e, "") for e in base] + extra:
        env[key] = value
    return [f"{k}={v}" for k, v in env.items()]


def build(image_config: dict, opts: RunOptions, container_id: str) -> ContainerSpec:
    """Apply docker's rules: --entrypoint replaces Entrypoint and drops the image's Cmd; a given
    command replaces Cmd; Env from the image then -e; WorkingDir unless -w; User unless -u."""
    cfg = image_config.get("config") or {}
    if opts.entrypoint is not None:
        entrypoint = [opts.entrypoint] if opts.entrypoint else []
        cmd = list(opts.command)
    else:
        entrypoint = list(cfg.get("Entrypoint") or [])
        cmd = list(opts.command) if opts.command else list(cfg.get("Cmd") or [])
    args = entrypoint + cmd
    if not args:
        raise InvalidInput("no command specified (the image has no Entrypoint or Cmd)")
    if opts.network not in NETWORKS:
        raise InvalidInput(f"unknown network {opts.network!r} (use none or host)")
    hostname = opts.hostname or container_id[:12]
    if len(hostname) > 64:
        raise InvalidInput("hostname longer than 64 characters")
    base_env = list(cfg.get("Env") or [])
    if not any(e.startswith("PATH=") for e in base_env):
        base_env.insert(0, f"PATH={DEFAULT_PATH}")
    extra = [("HOSTNAME", hostname)]
    if opts.tty:
        extra.append(("TERM", "xterm"))
    env = merge_env(base_env, extra + parse_env(opts.env))
    cwd = opts.workdir or cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidInput(f"working directory {cwd!r} must be absolute")
    if opts.pids_limit is not None and opts.pids_limit < 1:
        raise InvalidInput("--pids-limit must be at least 1")
    if opts.cpus is not None and opts.cpus <= 0:
        raise InvalidInput("--cpus must be positive")
    limits = Limits(
        memory=parse_memory(opts.memory) if opts.memory else None,
        pids=opts.pids_limit,
        cpus=opts.cpus,
    )
    return ContainerSpec(
        args=args,
        env=env,
        cwd=cwd,
        user=opts.user if opts.user is not None else (cfg.get("User") or ""),
        hostname=hostname,
        tty=opts.tty,
        interactive=opts.interactive,
        read_only=opts.read_only,
        network=opts.network,
        volumes=[parse_volume(v) for v in opts.volumes],
        limits=limits,
    )
