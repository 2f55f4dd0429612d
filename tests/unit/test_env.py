"""Launch detection from a given environment: torchrun, srun (one task per rank), or a single process."""

from __future__ import annotations

import pytest

from parallel.env import detect, first_host

# What srun gives the second of two tasks on two nodes (seen on the local cluster, tests/slurm/).
SRUN_TASK_1 = {
    "SLURM_JOB_ID": "4321",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_NODELIST": "n[1-2]",
}
TORCHRUN_RANK_3 = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("n[1-2]", "n1"),
        ("n1", "n1"),
        ("n2,n1", "n2"),
        ("gpu[07-09,12]", "gpu07"),
        ("a[3,5-6],b1", "a3"),
        ("rack[2-3]-node[10-11]", "rack2-node10"),
        ("node-1.cluster", "node-1.cluster"),
    ],
)
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_task_takes_rank_world_and_rendezvous_from_slurm():
    env = detect("gloo", SRUN_TASK_1)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 1, 2, 0)
    assert env.backend == "gloo" and env.master_addr == "n1"
    assert env.master_port == 29500 + 4321 % 10000
    assert not env.is_main


def test_user_master_addr_and_port_win_under_srun():
    env = detect("gloo", {**SRUN_TASK_1, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "12345"})
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 12345)


def test_job_ids_give_different_ports():
    ports = {detect("gloo", {**SRUN_TASK_1, "SLURM_JOB_ID": str(job)}).master_port for job in range(100, 110)}
    assert len(ports) == 10


def test_torchrun_variables_win_over_slurm():
    env = detect("gloo", {**SRUN_TASK_1, **TORCHRUN_RANK_3})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 1)
    assert env.master_addr is None  # torchrun sets MASTER_ADDR/PORT for its workers itself


@pytest.mark.parametrize(
    "environ",
    [
        {},
        # the batch script itself: SLURM_PROCID and SLURM_NTASKS, but no job step
        {k: v for k, v in SRUN_TASK_1.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"},
        # a one-task step (a Hydra/submitit sweep job)
        {**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
    ],
    ids=["no launcher", "batch script", "one-task step"],
)
def test_single_process(environ):
    env = detect("auto", environ)
    assert (env.launcher, env.rank, env.world_size, env.backend) == ("single", 0, 1, None)
