"""The --slurm-* install flags, and `check` for a Slurm kernel spec against the rig."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nersc_provisioner.cli import main
from tests.commands import run_cli
from tests.kernels import poll_until
from tests.rig import Rig, job_entries, job_state, sbatch

HOSTILE = ("a b", "x;touch /tmp/npr-slurm-cli-canary", "$(id)", "`id`", "q'\"")

#: A step line of `check`: mark, name, seconds, detail.
STEP = re.compile(r"^\[(ok  |FAIL)\] (.{32}) +(\d+\.\d\d) s  (.*)$")

SLURM_STEPS = [
    "resolve ssh config",
    "check certificate expiry",
    "connect and verify host key",
    "submit",
    "queue wait",
    "node ssh",
    "probe in a step",
    "start kernel and run a cell",
    "cancel the Slurm job",
]


def spec_config(jupyter_dirs: Path, name: str) -> dict[str, object]:
    spec = json.loads((jupyter_dirs / "kernels" / name / "kernel.json").read_text())
    config: dict[str, object] = spec["metadata"]["kernel_provisioner"]["config"]
    return config


# --- install ------------------------------------------------------------------------


def test_install_writes_every_slurm_flag_verbatim(jupyter_dirs: Path) -> None:
    qos, constraint, time_, partition, reservation = HOSTILE
    result = run_cli(
        "install", "--user", "--name", "all-slurm", "--provisioner", "nersc-perlmutter",
        "--slurm-qos", qos, "--slurm-constraint", constraint, "--slurm-time", time_,
        "--slurm-account", "m1234", "--slurm-nodes", "2", "--slurm-gpus", "4",
        "--slurm-partition", partition, "--slurm-reservation", reservation,
        "--slurm-arg=--mem=8G", "--slurm-arg=--comment=a b; $(id)", "--slurm-arg", "x y",
        "--slurm-job-id", "12345", "--slurm-keep", "--queue-timeout", "600",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert spec_config(jupyter_dirs, "all-slurm") == {
        "slurm": {
            "qos": "a b",
            "constraint": "x;touch /tmp/npr-slurm-cli-canary",
            "time": "$(id)",
            "account": "m1234",
            "nodes": 2,
            "gpus": "4",
            "partition": "`id`",
            "reservation": "q'\"",
            "extra_args": ["--mem=8G", "--comment=a b; $(id)", "x y"],
            "job_id": "12345",
            "keep": True,
        },
        "queue_timeout": 600.0,
    }
    assert not Path("/tmp/npr-slurm-cli-canary").exists()
    shown = run_cli("show", "all-slurm")
    assert shown.returncode == 0, shown.stderr
    assert "--jobid=12345" in shown.stdout  # the step runs in the given job


def test_show_quotes_each_slurm_value_as_one_word(jupyter_dirs: Path) -> None:
    assert main(["install", "--user", "--name", "shown", "--provisioner", "nersc-cori",
                 "--slurm-qos", "a b", "--slurm-arg=--comment=$(id)"]) == 0  # fmt: skip
    shown = run_cli("show", "shown")
    assert shown.returncode == 0, shown.stderr
    assert "--nodes=1 '--qos=a b' '--comment=$(id)' --wrap 'exec sleep infinity'" in shown.stdout
    assert "sbatch --parsable" in shown.stdout


def test_only_the_flags_given_go_into_the_spec(jupyter_dirs: Path) -> None:
    assert main(["install", "--user", "--name", "one", "--provisioner", "nersc-cori",
                 "--slurm-qos", "debug"]) == 0  # fmt: skip
    assert spec_config(jupyter_dirs, "one") == {"slurm": {"qos": "debug"}}
    assert main(["install", "--user", "--name", "none", "--provisioner", "nersc-cori"]) == 0
    assert spec_config(jupyter_dirs, "none") == {}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--slurm-nodes", "0"], ["--slurm-nodes", "nodes", "positive whole number"]),
        (["--slurm-account=-x"], ["--slurm-account", "account", "'-x'"]),
        (["--slurm-qos", "a\nb"], ["--slurm-qos", "qos"]),
        (["--slurm-job-id", "12;rm -rf ~"], ["--slurm-job-id", "job id"]),
        (["--slurm-arg=--x\nevil"], ["--slurm-arg", "extra argument"]),
        (["--queue-timeout", "0"], ["--queue-timeout", "positive"]),
        (["--queue-timeout", "-5", "--slurm-qos", "debug"], ["--queue-timeout"]),
    ],
    ids=["nodes-0", "account-dash", "qos-newline", "job-id", "arg-newline", "qt-0", "qt-neg"],
)
def test_bad_slurm_values_fail_naming_the_flag_and_write_nothing(
    jupyter_dirs: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: list[str]
) -> None:
    code = main(["install", "--user", "--name", "bad", "--provisioner", "nersc-perlmutter", *flags])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: "), err
    for word in words:
        assert word in err.split("What to do")[0], err
    assert "What to do:" in err
    assert not (jupyter_dirs / "kernels" / "bad").exists()


def test_nersc_local_takes_the_slurm_flags_and_the_node_ssh_flags(jupyter_dirs: Path) -> None:
    result = run_cli(
        "install", "--user", "--name", "loc",  # nersc-local: the default
        "--slurm-qos", "debug", "--slurm-time", "10", "--slurm-arg=--mem=8G",
        "--queue-timeout", "120", "--identity-file", "/keys/id x",
        "--known-hosts", "/kh/one", "--known-hosts", "/kh/two", "--ssh-config", "",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = json.loads((jupyter_dirs / "kernels" / "loc" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "nersc-local"
    assert spec_config(jupyter_dirs, "loc") == {
        "slurm": {"qos": "debug", "time": "10", "extra_args": ["--mem=8G"]},
        "queue_timeout": 120.0,
        "identity_file": "/keys/id x",
        "known_hosts": ["/kh/one", "/kh/two"],
        "ssh_config": "",  # '' (ignore ~/.ssh/config) is kept, not dropped as empty
    }
    shown = run_cli("show", "loc")
    assert shown.returncode == 0, shown.stderr
    assert "--qos=debug" in shown.stdout
    assert "--mem=8G" in shown.stdout


def test_nersc_local_with_only_slurm_flags_writes_no_ssh_keys(jupyter_dirs: Path) -> None:
    assert main(["install", "--user", "--name", "loc", "--slurm-qos", "debug"]) == 0
    assert spec_config(jupyter_dirs, "loc") == {"slurm": {"qos": "debug"}}


@pytest.mark.parametrize(
    "flags",
    [["--identity-file", "/k"], ["--known-hosts", "/kh"], ["--ssh-config", ""]],
    ids=["identity-file", "known-hosts", "ssh-config"],
)
def test_nersc_local_refuses_the_node_ssh_flags_without_slurm(
    jupyter_dirs: Path, flags: list[str]
) -> None:
    result = run_cli("install", "--user", "--name", "loc", "--queue-timeout", "60", *flags)
    assert result.returncode == 1
    assert flags[0] in result.stderr
    assert "need --slurm-* flags" in result.stderr
    assert "What to do:" in result.stderr
    assert not (jupyter_dirs / "kernels" / "loc").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--host", "h"],
        ["--remote-user", "u"],
        ["--ssh-port", "22"],
        ["--remote-python", "/p"],
        ["--remote-cwd", "/d"],
        ["--lease-timeout", "60"],
    ],
    ids=lambda flags: flags[0],
)
def test_nersc_local_refuses_the_remote_host_flags_even_with_slurm(
    jupyter_dirs: Path, flags: list[str]
) -> None:
    result = run_cli("install", "--user", "--name", "loc", "--slurm-qos", "debug", *flags)
    assert result.returncode == 1
    assert flags[0] in result.stderr
    assert "need a remote provisioner" in result.stderr
    assert "--provisioner nersc-perlmutter" in result.stderr
    assert not (jupyter_dirs / "kernels" / "loc").exists()


def test_a_dash_value_needs_the_equals_form(jupyter_dirs: Path) -> None:
    result = run_cli(
        "install", "--user", "--name", "dash", "--provisioner", "nersc-cori",
        "--slurm-arg", "--mem=8G",
    )  # fmt: skip
    assert result.returncode == 2  # argparse: "expected one argument"
    assert "--slurm-arg" in result.stderr
    assert not (jupyter_dirs / "kernels" / "dash").exists()


def test_install_help_explains_the_slurm_flags() -> None:
    help_text = " ".join(run_cli("install", "--help").stdout.split())
    assert "Slurm: run the kernel as a step of a Slurm job on a compute node" in help_text
    for flag, explained in [
        ("--slurm-qos", "interactive (Cori) or debug"),
        ("--slurm-constraint", "gpu or cpu"),
        ("--slurm-time", "1:00:00"),
        ("--slurm-account", "m1234"),
        ("--slurm-nodes", "the kernel runs on the first"),
        ("--slurm-gpus", "GPUs"),
        ("--slurm-partition", "partition"),
        ("--slurm-reservation", "reservation"),
        ("--slurm-arg", "--slurm-arg=--mem=8G"),
        ("--slurm-job-id", "never cancelled"),
        ("--slurm-keep", "leave the job running"),
        ("--queue-timeout", "wait in the queue"),
        ("--identity-file", "nersc-local with Slurm: the key for the job's node"),
        ("--known-hosts", "nersc-local with Slurm: for the job's node"),
        ("--ssh-config", "nersc-local with Slurm: for the job's node"),
    ]:
        assert flag in help_text
        assert explained in help_text, flag
    assert "with nersc-local (Jupyter running on a login node itself), sbatch runs here" in (
        help_text
    )


# --- check against the rig ------------------------------------------------------------


def install_rig_spec(compute_node_rig: Rig, name: str, tmp_path: Path, *extra: str) -> None:
    ssh = compute_node_rig.ssh
    assert ssh is not None
    assert ssh.remote_python
    no_config = tmp_path / "ssh_config"  # empty: ~/.ssh/config plays no part
    no_config.write_text("")
    result = run_cli(
        "install", "--user", "--name", name, "--provisioner", "nersc-cori",
        "--host", ssh.host, "--remote-user", ssh.user, "--identity-file", str(ssh.identity_file),
        "--known-hosts", str(ssh.known_hosts), "--ssh-config", str(no_config),
        "--remote-python", ssh.remote_python, "--slurm-time", "10", "--queue-timeout", "300",
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def steps_of(stdout: str) -> list[tuple[str, str, float, str]]:
    """(mark, name, seconds, detail) of each step line; every "[" line must be one."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("["):
            match = STEP.match(line)
            assert match, f"not a timed step line: {line!r}"
            mark, name, seconds, detail = match.groups()
            found.append((mark.strip(), name.strip(), float(seconds), detail))
    return found


def gone(user: str, job_id: str, timeout: float = 30) -> bool:
    """True once the job and its steps have left the queue (COMPLETING included)."""
    return poll_until(lambda: not job_entries(job_id, user), timeout, step=0.5)


@pytest.mark.rig
@pytest.mark.kernel
def test_check_runs_every_slurm_step_and_cancels_its_job(
    compute_node_rig: Rig, jupyter_dirs: Path, tmp_path: Path
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    node = compute_node_rig.slurm.node  # type: ignore[union-attr]
    install_rig_spec(compute_node_rig, "slurm-check", tmp_path)
    checked = run_cli("check", "slurm-check", timeout=600)
    print(checked.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    steps = steps_of(checked.stdout)
    assert [s[1] for s in steps] == SLURM_STEPS, checked.stdout
    assert all(s[0] == "ok" for s in steps), checked.stdout
    details = {name: detail for _, name, _, detail in steps}
    seconds = {name: secs for _, name, secs, _ in steps}

    submitted = re.match(r"job (\d+) submitted: sbatch .*--time=10", details["submit"])
    assert submitted, details["submit"]
    job_id = submitted.group(1)
    waited = re.match(
        rf"job {job_id} running on {node} after (\d+\.\d) s in the queue", details["queue wait"]
    )
    assert waited, details["queue wait"]
    assert abs(float(waited.group(1)) - seconds["queue wait"]) < 5
    assert details["node ssh"].startswith(f"{node} ({compute_node_rig.slurm.node_addr})")  # type: ignore[union-attr]
    assert "SHA256:" in details["node ssh"]
    assert "ipykernel" in details["probe in a step"]
    assert f"srun step of job {job_id} on {node}" in details["probe in a step"]
    assert f"on {node} " in details["start kernel and run a cell"]
    assert f"(in Slurm job {job_id})" in details["start kernel and run a cell"]
    assert f"job {job_id}" in details["cancel the Slurm job"]

    assert gone(user, job_id), job_entries(job_id, user)
    assert job_state(job_id) in ("CANCELLED", ""), job_state(job_id)  # "": already purged


@pytest.mark.rig
def test_a_failing_step_still_cancels_the_job(
    compute_node_rig: Rig, jupyter_dirs: Path, tmp_path: Path
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    install_rig_spec(compute_node_rig, "slurm-bad-python", tmp_path)
    folder = jupyter_dirs / "kernels" / "slurm-bad-python"
    spec = json.loads((folder / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["remote_python"] = "/no/such/python"
    (folder / "kernel.json").write_text(json.dumps(spec))
    checked = run_cli("check", "slurm-bad-python", timeout=600)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    steps = steps_of(checked.stdout)
    names = [s[1] for s in steps]
    assert names == [*SLURM_STEPS[:7], "cancel the Slurm job"], checked.stdout
    assert steps[6][0] == "FAIL"
    assert "/no/such/python" in checked.stdout
    assert steps[-1][0] == "ok"
    job_id = re.match(r"job (\d+)", steps[3][3]).group(1)  # type: ignore[union-attr]
    assert gone(user, job_id), job_entries(job_id, user)


@pytest.mark.rig
@pytest.mark.kernel
def test_check_leaves_the_users_own_job_running(
    compute_node_rig: Rig, jupyter_dirs: Path, tmp_path: Path
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    job_id = sbatch("--time=10", "--wrap", "exec sleep infinity", user=user)
    try:
        install_rig_spec(compute_node_rig, "slurm-mine", tmp_path, "--slurm-job-id", job_id)
        checked = run_cli("check", "slurm-mine", timeout=600)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        steps = steps_of(checked.stdout)
        assert [s[1] for s in steps] == SLURM_STEPS[:-1], checked.stdout  # no cancel step
        assert f"attached to your job {job_id}" in steps[3][3]
        assert f"job {job_id} running on" in steps[4][3]
        # The check has exited: nothing of it is left that could still cancel the job.
        assert job_state(job_id) == "RUNNING"
    finally:
        subprocess.run(["scancel", job_id], check=False)


@pytest.mark.rig
def test_ctrl_c_during_the_check_cancels_the_job(
    compute_node_rig: Rig, jupyter_dirs: Path, tmp_path: Path
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    install_rig_spec(compute_node_rig, "slurm-interrupted", tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nersc_provisioner", "check", "slurm-interrupted"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only where it is not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[ok  ] submit"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "check interrupted" in output
    job_id = re.search(r"job (\d+) submitted", output).group(1)  # type: ignore[union-attr]
    assert f"job {job_id}, submitted by this check" in output  # the cancel step ran
    assert gone(user, job_id), job_entries(job_id, user)


# --- check of a nersc-local spec with slurm (Jupyter on the login node) ---------------------


def install_local_rig_spec(compute_node_rig: Rig, name: str, *extra: str) -> None:
    """nersc-local with slurm, as root on this machine: sbatch here, ssh to the node."""
    ssh = compute_node_rig.ssh
    assert ssh is not None
    result = run_cli(
        "install", "--user", "--name", name, "--python", sys.executable,
        "--identity-file", str(ssh.identity_file), "--known-hosts", str(ssh.known_hosts),
        "--ssh-config", "", "--slurm-time", "10", "--queue-timeout", "300", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.rig
@pytest.mark.kernel
def test_check_of_nersc_local_with_slurm_runs_the_steps_here(
    compute_node_rig: Rig, jupyter_dirs: Path
) -> None:
    node = compute_node_rig.slurm.node  # type: ignore[union-attr]
    node_addr = compute_node_rig.slurm.node_addr  # type: ignore[union-attr]
    install_local_rig_spec(compute_node_rig, "local-slurm-check")
    checked = run_cli("check", "local-slurm-check", timeout=600)
    print(checked.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    steps = steps_of(checked.stdout)
    assert [s[1] for s in steps] == SLURM_STEPS[3:], checked.stdout  # no login steps
    assert all(s[0] == "ok" for s in steps), checked.stdout
    details = {name: detail for _, name, _, detail in steps}

    submitted = re.match(r"job (\d+) submitted: sbatch .*--time=10", details["submit"])
    assert submitted, details["submit"]
    job_id = submitted.group(1)
    assert re.match(rf"job {job_id} running on {node} after", details["queue wait"]), details
    assert details["node ssh"].startswith(f"{node} ({node_addr}) as root, directly from here")
    assert str(compute_node_rig.ssh.identity_file) in details["node ssh"]  # type: ignore[union-attr]
    assert "SHA256:" in details["node ssh"]
    assert f"srun step of job {job_id} on {node}" in details["probe in a step"]
    assert f"on {node} " in details["start kernel and run a cell"]
    assert f"(in Slurm job {job_id})" in details["start kernel and run a cell"]
    assert details["cancel the Slurm job"] == f"job {job_id}, submitted by this check, cancelled"

    assert gone("root", job_id), job_entries(job_id, "root")
    assert job_state(job_id) in ("CANCELLED", ""), job_state(job_id)


@pytest.mark.rig
def test_check_leaves_the_users_pending_job_in_the_queue_on_timeout(
    compute_node_rig: Rig, jupyter_dirs: Path
) -> None:
    job_id = sbatch("--time=10", "--begin=now+1hour", "--wrap", "exec sleep infinity")
    try:
        install_local_rig_spec(compute_node_rig, "local-slurm-mine", "--slurm-job-id", job_id)
        spec = jupyter_dirs / "kernels" / "local-slurm-mine" / "kernel.json"
        data = json.loads(spec.read_text())
        data["metadata"]["kernel_provisioner"]["config"]["queue_timeout"] = 2
        spec.write_text(json.dumps(data))
        checked = run_cli("check", "local-slurm-mine", timeout=120)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        steps = steps_of(checked.stdout)
        assert [(s[0], s[1]) for s in steps] == [("ok", "submit"), ("FAIL", "queue wait")]
        assert f"attached to your job {job_id} (PENDING)" in steps[0][3]
        assert f"your Slurm job {job_id} is still PENDING" in steps[1][3]
        assert "left in the queue" in steps[1][3]
        assert "cancel" not in checked.stdout.lower()
        assert job_state(job_id) == "PENDING"
    finally:
        subprocess.run(["scancel", job_id], check=False)
