"""``engine=flower``: the Flower app, ``flwr run``, and a local SuperLink + SuperNodes.

A Flower deployment is one SuperLink (the server side: it runs the ServerApp) and one SuperNode per
client (each runs the ClientApp for its ``partition-id``). ``flwr run APP SUPERLINK`` submits a run;
the *app* is a folder whose ``pyproject.toml`` names the ServerApp and ClientApp. fedtalora's app is
:func:`write_app`'s ``pyproject.toml``: it points at :mod:`fedtalora.flower.server_app` and
:mod:`fedtalora.flower.client_app` of the **installed** fedtalora package and declares no
dependencies, so start the SuperLink with ``--disable-runtime-dependency-installation`` (otherwise it
``uv sync``-s the app into a fresh environment, see ``docs/flower.md``).

* :func:`submit` -- what ``fedtalora run ... engine=flower`` does: ``flwr run`` with the run's config,
  streaming the server's log, then reads the run directory's ``metrics.json``;
* :class:`LocalDeployment` -- a SuperLink and N SuperNodes as subprocesses on ``127.0.0.1`` (free
  ports, a private ``FLWR_HOME``), insecure loopback, for tests and benchmarks; :meth:`~LocalDeployment.stop`
  ends every process it started and all their descendants, even those that detached.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, FedTaLoRAError
from .procs import alive as _alive
from .procs import descendants, kill_tree

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..fed.loop import RunResult

logger = logging.getLogger(__name__)

APP_NAME = "fedtalora-flower"

APP_PYPROJECT = """\
# The fedtalora Flower app (written by `fedtalora flower-app`). The ServerApp and ClientApp live in the
# installed fedtalora package (pip install 'fedtalora[flower]' on the server and on every client);
# dependencies stay empty: start the SuperLink with --disable-runtime-dependency-installation.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtalora-flower"
version = "1.0.0"
description = "Fed-TaLoRA federated class-incremental learning (fedtalora) on Flower"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedtalora"

[tool.flwr.app.components]
serverapp = "fedtalora.flower.server_app:app"
clientapp = "fedtalora.flower.client_app:app"

[tool.flwr.app.config]
# a fedtalora preset name or YAML path (on the server)
config = "tiny-vit"
# space-separated key=value overrides, as on the fedtalora command line
overrides = ""
# the run directory on the server (empty: output.dir/output.name)
run-dir = ""
# the partition manifest the clients read (empty: RUN_DIR/partitions.json; a node's own
# --node-config "partitions='...'" wins)
partitions = ""
# continue run-dir from its latest checkpoint
resume = false
"""


def write_app(dest: str | Path, cfg: RunConfig | None = None, *, force: bool = False) -> Path:
    """Write the Flower app folder (its ``pyproject.toml``) to ``dest``; returns the folder.

    With ``cfg``, also write ``config.yaml`` (``engine=flower``) and the partition manifest
    ``partitions.json`` it draws (this loads the dataset), and make them the app's default run config:
    copy ``partitions.json`` to every client machine (``--node-config "partitions='...'"``) when the
    clients do not share the server's file system.

    Everything is computed first (the dataset loaded, the partitions drawn), then the folder is
    created and each file written atomically: a bad config or missing data leaves ``dest`` untouched.
    Files already in ``dest`` are replaced only with ``force``.

    Raises:
        OutputError: ``dest`` is a file, cannot be created or written, or (without ``force``) already holds
            one of the app's files.
    """
    from ..errors import OutputError
    from ..safeio import atomic_write_text

    path = Path(dest).expanduser().resolve()
    _check_app_dest(path, ("pyproject.toml", *(("config.yaml", "partitions.json") if cfg is not None else ())), force)
    files: dict[str, str] = {}
    text = APP_PYPROJECT
    if cfg is not None:
        from ..config import from_dict
        from ..fed.build import Experiment

        data = cfg.to_dict()
        data["engine"] = "flower"
        cfg = from_dict(data)
        partitions = json.dumps(Experiment.build(cfg).partitions_json())  # may fail: before anything is written
        files["config.yaml"] = cfg.to_yaml()
        files["partitions.json"] = partitions
        text = text.replace('config = "tiny-vit"', f"config = {json.dumps(str(path / 'config.yaml'))}")
        text = text.replace('partitions = ""', f"partitions = {json.dumps(str(path / 'partitions.json'))}", 1)
    files["pyproject.toml"] = text
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"flower-app: cannot create the folder {path}: {e.strerror or e}") from None
    for name, content in files.items():
        atomic_write_text(path / name, content, fsync=False)
    return path


def _check_app_dest(path: Path, names: tuple[str, ...], force: bool) -> None:
    """Refuse (before anything is computed) a ``dest`` that is a file, or holds one of ``names`` without ``force``."""
    from ..errors import OutputError

    if path.exists() and not path.is_dir():
        raise OutputError(f"flower-app: {path} exists and is not a folder")
    there = [n for n in names if (path / n).exists() or (path / n).is_symlink()]
    if there and not force:
        raise OutputError(f"flower-app: {path / there[0]} already exists; pass --force to replace "
                          f"{'it' if len(there) == 1 else 'the app files there'}")
    busy = [n for n in there if (path / n).is_dir()]
    if busy:
        raise OutputError(f"flower-app: {path / busy[0]} is a folder; it cannot be replaced by a file")


FLWR_DEFAULT_CONNECTIONS = ("local", "supergrid")
"""The SuperLink connections of the ``config.toml`` that ``flwr`` 1.42 creates when there is none."""


def flwr_config_path(env: dict[str, str] | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``): where ``flwr run`` looks up SuperLinks."""
    home = (os.environ if env is None else env).get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "config.toml"


def superlink_problem(name: str, config: Path, *, probe_seconds: float = 0.0) -> str | None:
    """Why ``flwr run APP NAME`` would not find the SuperLink connection ``NAME`` (empty: the default) in
    Flower's ``config`` file, or None when it would. Read-only: unlike ``flwr``, creates no file.

    With ``probe_seconds > 0``, a connection with an ``address`` must also accept a TCP connection there within
    that time (:func:`address_problem`), so that an unreachable SuperLink is one line here, not ``flwr run``'s
    output followed by ours."""
    import tomllib

    from ..safeio import is_file, read_text

    label = f"flower.superlink={name!r}" if name else "flower.superlink (empty: the default connection)"
    if not is_file(config):
        if name in ("", *FLWR_DEFAULT_CONNECTIONS):
            return None  # flwr writes its default file, which defines these
        return (f"{label}: no such SuperLink connection ({config} does not exist; add the connection there, see "
                "docs/flower.md)")
    try:
        doc = tomllib.loads(read_text(config, max_bytes=2**20, error=ConfigError))
    except tomllib.TOMLDecodeError as e:
        return f"{label}: {config} is not valid TOML ({e})"
    except ConfigError as e:
        return f"{label}: {e}"
    table = doc.get("superlink")
    table = table if isinstance(table, dict) else {}
    wanted = name or table.get("default")
    defined = sorted(k for k, v in table.items() if isinstance(v, dict))
    if not isinstance(wanted, str) or not wanted:
        return f"{label}: {config} sets no default connection ([superlink] default = ...); name one"
    if wanted not in defined:
        return (f"{label}: no connection {wanted!r} in {config} "
                f"(defined: {', '.join(defined) if defined else 'none'})")
    address = table[wanted].get("address")
    if probe_seconds > 0 and address is not None:
        why = address_problem(address, probe_seconds)
        if why is not None:
            return f"{label}: the SuperLink of connection {wanted!r} ({config}) {why}"
    return None


def address_problem(address: object, timeout: float) -> str | None:
    """Why nothing accepts a TCP connection at ``HOST:PORT`` (``[::1]:PORT`` for IPv6) within ``timeout``
    seconds, or None when something does."""
    from ..safeio import short

    text = address if isinstance(address, str) else ""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"has the address {short(address)}, expected HOST:PORT"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except TimeoutError:
        return f"does not answer at {text} (no reply within {timeout:g} s); is it running?"
    except OSError as e:
        return f"is unreachable at {text} ({e.strerror or e}); is it running?"
    return None


def flwr_bin(name: str) -> str:
    """A Flower executable: next to this Python's, else on ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: pip install 'fedtalora[flower]'")
    return found


def run_config_arg(values: dict[str, Any]) -> str:
    """``flwr run --run-config`` text for string/bool values (TOML literals)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


def flwr_run_command(app: str | Path, superlink: str, run_config: dict[str, Any]) -> list[str]:
    """``flwr run APP [SUPERLINK] --run-config ... --stream``."""
    cmd = [flwr_bin("flwr"), "run", str(app)]
    if superlink:
        cmd.append(superlink)
    return [*cmd, "--run-config", run_config_arg(run_config), "--stream"]


_RUN_ID = re.compile(r"started run (\d+)")


def flwr_stop(run_id: int, superlink: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> bool:
    """``flwr stop RUN_ID [SUPERLINK]``: stop a run on the SuperLink (its ServerApp and ClientApp tasks)."""
    cmd = [flwr_bin("flwr"), "stop", str(run_id), *([superlink] if superlink else [])]
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        logger.error("flwr stop %d did not answer within %g s", run_id, timeout)
        return False
    if proc.returncode != 0:
        logger.error("flwr stop %d failed: %s", run_id, (proc.stdout + proc.stderr).strip()[-500:])
    return proc.returncode == 0


def _tee(stream: Any, found: list[int]) -> None:
    """Copy ``flwr run``'s output to ours, noting the run id it reports."""
    for line in iter(stream.readline, ""):
        if not found:
            m = _RUN_ID.search(line)
            if m:
                found.append(int(m.group(1)))
        sys.stdout.write(line)
        sys.stdout.flush()
    stream.close()


def submit(cfg: RunConfig, run_dir: Path | None, *, resume: bool = False,
           env: dict[str, str] | None = None) -> RunResult:
    """Submit the run to the SuperLink ``flower.superlink`` with ``flwr run`` and wait for it.

    The ServerApp writes ``run_dir`` on the SuperLink's machine; when that is this machine (or a shared
    file system), the result is read back from it. Interrupted (SIGINT, or SIGTERM through the CLI), it
    stops the run on the SuperLink (``flwr stop``: the ServerApp ends after its last completed round's
    checkpoint, ``fedtalora resume`` continues it) and ends ``flwr run``; KeyboardInterrupt propagates.
    """
    from ..fed.history import load_history
    from ..fed.loop import RunResult

    if run_dir is None:
        raise ConfigError("engine=flower needs a run directory (the ServerApp writes metrics.json there)")
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / ("config.yaml" if not resume else "config.flower.yaml")
    config_file.write_text(cfg.to_yaml())
    run_id: list[int] = []
    with tempfile.TemporaryDirectory(prefix="fedtalora-flower-app-") as tmp:
        app = write_app(Path(tmp) / APP_NAME)
        cmd = flwr_run_command(app, cfg.flower.superlink, {"config": str(config_file), "run-dir": str(run_dir),
                                                           "resume": resume})
        logger.info("submitting: %s", shlex.join(cmd))
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                bufsize=1, start_new_session=True)  # our SIGINT is ours to forward
        tee = threading.Thread(target=_tee, args=(proc.stdout, run_id), daemon=True)
        tee.start()
        try:
            returncode = proc.wait()
        except BaseException:
            if run_id:
                logger.warning("stopping Flower run %d on the SuperLink", run_id[0])
                flwr_stop(run_id[0], cfg.flower.superlink, env)
            else:
                logger.warning("interrupted before the SuperLink reported a run id: nothing to stop there")
            try:
                proc.wait(timeout=15)  # `flwr run --stream` ends with the run
            except subprocess.TimeoutExpired:
                pass
            kill_tree([proc.pid])
            raise
        finally:
            tee.join(timeout=5)
    if returncode != 0:
        raise FedTaLoRAError(f"flwr run exited with status {returncode} (see its output above)")
    metrics_file = run_dir / "metrics.json"
    try:
        history = load_history(metrics_file)
    except FedTaLoRAError:
        raise FedTaLoRAError(f"flwr run finished but {metrics_file} is missing or unreadable (the ServerApp "
                             "writes it on the SuperLink's machine)") from None
    if not history.complete:
        raise FedTaLoRAError(f"the Flower run did not complete: {metrics_file} is partial (see the log above)")
    return RunResult(history=history, run_dir=run_dir, model=None)


# --- a local deployment ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes (``partition-id`` 0..N-1) on 127.0.0.1.

    Use as a context manager; :meth:`stop` (also on errors) ends every process it started and their
    descendants (the SuperExecs, ServerApp and ClientApp processes). ``FLWR_HOME`` is a private folder
    with a ``config.toml`` whose default SuperLink connection is this one (:attr:`superlink_name`).

    Args:
        warm: nodes are :mod:`fedtalora.flower.node` (SuperNode + warm ClientApp executor, capped polls);
            False: plain ``flower-supernode`` (one ``flwr-clientapp`` process per message).
        executors: with ``warm``, run this many shared executors (:class:`~fedtalora.flower.worker.WarmExecutor`
            processes, each serving ``num_nodes / executors`` SuperNodes) instead of one per node: many nodes
            on one machine without one copy of torch, the data and the model per node.
        tls: the SuperLink serves TLS with a certificate from a fresh CA (:func:`~fedtalora.flower.tls.make_certificates`,
            in ``workdir/tls``); the nodes and ``flwr`` verify it.
        auth: SuperNode authentication (needs ``tls``): ``--enable-supernode-auth`` on the SuperLink, one
            key pair per node (``workdir/keys``), each public key registered with ``flwr supernode register``.
    """

    superlink_name = "local-deployment"

    def __init__(self, num_nodes: int, workdir: str | Path, *, env: dict[str, str] | None = None,
                 node_config: dict[str, str] | None = None, warm: bool = True, poll: float | None = None,
                 executors: int | None = None, tls: bool = False, auth: bool = False) -> None:
        if auth and not tls:
            raise ConfigError("SuperNode authentication needs TLS (tls=True)")
        if executors is not None and not (warm and 1 <= executors <= num_nodes):
            raise ConfigError(f"executors={executors}: needs warm nodes and 1 <= executors <= {num_nodes}")
        self.num_nodes = num_nodes
        self.warm = warm
        self.poll = poll
        self.executors = executors
        self.tls = tls
        self.auth = auth
        self.workdir = Path(workdir)
        self.env = dict(os.environ if env is None else env)
        self.node_config = dict(node_config or {})
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []
        self.roles: dict[int, str] = {}
        """Pid of every process started here -> ``superlink``, ``node-K`` or ``executor-J``."""
        self.port = 0
        self.flwr_home = self.workdir / "flwr-home"
        self.env["FLWR_HOME"] = str(self.flwr_home)
        # the SuperLink and SuperNodes start flower-superexec, flwr-serverapp, flwr-clientapp by name
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])

    def _spawn(self, cmd: list[str], log: str, role: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            out.close()
        self.procs.append(proc)
        self.pids.append(proc.pid)
        self.roles[proc.pid] = role
        return proc

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        """Start the SuperLink, wait until it listens, (register the node keys,) start the SuperNodes."""
        from .tls import make_certificates, make_node_key

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link = ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)]
        connection = f'address = "127.0.0.1:{self.port}"\n'
        if self.tls:
            certs = make_certificates(self.workdir / "tls", ("127.0.0.1", "localhost"))
            link += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                     "--ssl-keyfile", str(certs.server_key)]
            connection += f"root-certificates = {json.dumps(str(certs.ca_cert))}\n"
            node_tls = ["--root-certificates", str(certs.ca_cert)]
        else:
            link.insert(0, "--insecure")
            connection += "insecure = true\n"
            node_tls = ["--insecure"]
        if self.auth:
            link.append("--enable-supernode-auth")
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.superlink_name}"\n\n[superlink.{self.superlink_name}]\n{connection}')
        self._spawn([flwr_bin("flower-superlink"), *link], "superlink.log", "superlink")
        self._wait_port(self.port, timeout)
        keys = [make_node_key(self.workdir / "keys" / f"node_{k}") for k in range(self.num_nodes)] if self.auth else []
        if keys:
            self.register([public for _, public in keys])
        ports = [free_port() for _ in range(self.num_nodes)]
        for k in range(self.num_nodes):
            cfg = " ".join([f"partition-id={k}", *(f"{key}={json.dumps(v)}" for key, v in self.node_config.items())])
            args = [*node_tls, "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(ports[k]),
                    "--node-config", cfg]
            if keys:
                args += ["--auth-supernode-private-key", str(keys[k][0])]
            self._spawn(self.node_command(args), f"supernode-{k}.log", f"node-{k}")
        for j in range(self.executors or 0):
            served = [f"127.0.0.1:{p}" for p in ports[j::self.executors]]
            cmd = [sys.executable, "-m", "fedtalora.flower.worker", *(a for addr in served
                                                                        for a in ("--runtime-api-address", addr))]
            self._spawn(cmd, f"executor-{j}.log", f"executor-{j}")
        return self

    def register(self, public_keys: list[Path], timeout: float = 120.0) -> None:
        """``flwr supernode register`` each key with this SuperLink (in parallel)."""
        procs = [subprocess.Popen([flwr_bin("flwr"), "supernode", "register", str(key), self.superlink_name],
                                  env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for key in public_keys]
        for key, proc in zip(public_keys, procs, strict=True):
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise FedTaLoRAError(f"flwr supernode register {key.name} failed: {out.strip()[-500:]}")

    def node_command(self, args: list[str]) -> list[str]:
        """One client node: ``flower-supernode ARGS``, or the warm node launcher with the same arguments
        (without its own executor when the deployment shares executors)."""
        if not self.warm:
            return [flwr_bin("flower-supernode"), *args]
        extra = [] if self.poll is None else ["--poll", str(self.poll)]
        if self.executors is not None:
            extra.append("--no-executor")
        return [sys.executable, "-m", "fedtalora.flower.node", *extra, *args]

    def _wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise FedTaLoRAError(f"a Flower process exited at start-up; see {self.workdir}/*.log")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FedTaLoRAError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout:g} s")

    def stop(self) -> None:
        """End every process this deployment started, and their descendants."""
        kill_tree(self.pids)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def alive(self) -> list[int]:
        """Pids of this deployment's processes (and descendants) still running."""
        return [p for p in descendants(self.pids) if _alive(p)]

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
