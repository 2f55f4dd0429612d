"""A real SLURM cluster of two emulated nodes (n1, n2) on this machine, loopback only, for the session.

munge, slurmctld and one slurmd per node are started in a temporary folder (see
../shared/slurm/LOCAL_CLUSTER.md) and stopped by their pid files. Tests skip, with the reason, where
SLURM is not installed, not run as root, or where n1/n2 cannot be made to resolve to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
MUNGE_PID = Path("/run/munge/munged.pid")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def alive(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` when that process runs."""
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def slurm_conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=4 SocketsPerBoard=1 "
        "CoresPerSocket=4 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""ClusterName=stillroom
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort={ctld_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
InactiveLimit=0
MinJobAge=300
KillWait=5
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalCluster:
    """Clients' environment (``env``, with SLURM_CONF) and helpers to submit and poll jobs."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[Path] = []  # pid files of the daemons we started, in start order

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        for sub in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        self.conf.write_text(slurm_conf(self.root, ctld_port, node_ports))
        if alive(MUNGE_PID) is None:
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.started.append(MUNGE_PID)
        self.run("slurmctld", "-f", str(self.conf))
        self.started.append(self.root / "run" / "slurmctld.pid")
        for node in NODES:
            self.run("slurmd", "-f", str(self.conf), "-N", node)
            self.started.append(self.root / "run" / f"slurmd-{node}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
            if states and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after 60 s: {states}; see {self.root / 'log'}")

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for pid_file in reversed(self.started):
            pid = alive(pid_file)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        for pid_file in self.started:
            deadline = time.monotonic() + 10
            while alive(pid_file) is not None and time.monotonic() < deadline:
                time.sleep(0.2)

    def sbatch(self, *args: str, cwd: Path, env: dict) -> str:
        """Submit with ``env`` (SLURM_CONF added); the job id."""
        return (
            self.run("sbatch", "--parsable", *args, cwd=cwd, env={**env, "SLURM_CONF": str(self.conf)})
            .stdout.strip()
            .split(";")[0]
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, timeout: float = 300, until=None) -> dict[str, str]:
        """Poll until the job ends (or ``until(fields)`` holds); its last fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if until(fields) if until else fields["JobState"] in TERMINAL_STATES:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout} s")


def skip_reason() -> str | None:
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does it)"
    if shutil.which("munged") is None:
        return "munge is not installed (apt-get install munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root (SlurmUser=root)"
    if not all(resolves_to_loopback(n) for n in NODES):
        try:
            with open("/etc/hosts", "a") as hosts:
                hosts.write(f"127.0.0.1 {' '.join(NODES)}\n")
        except OSError as e:
            return f"node names {NODES} do not resolve to 127.0.0.1 and /etc/hosts is not writable: {e}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> LocalCluster:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
