"""The step script: start a kernel as a Slurm job step inside an allocation.

It runs on a node of the job (over the SSH connection to that node) and

1. starts ``srun --jobid J --overlap ... bash -s`` in a session of its own, with
   the launch script (:func:`~.remote.build_launch_script`, in foreground mode)
   on srun's stdin, from a 0600 file in a 0700 directory: the key is on no
   command line;
2. echoes what the launch script prints (``NPR_PID``, ``NPR_PORT``,
   ``NPR_DONE`` ...), which srun relays from the step's task to a file;
3. returns as soon as the kernel is up, leaving srun (and so the step)
   running for as long as the kernel lives.

If srun ends before the kernel is up, it prints ``NPR_STEP_EXIT CODE`` and
the tail of srun's stderr.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..shell import check_token, join, quote

#: Where step files live on the node, as a shell expression.
STEP_BASE = '"$HOME/.nersc_provisioner/steps"'


def build_step_script(launch_script: str, *, srun_argv: Sequence[str], kernel_id: str) -> str:
    """The script to feed to ``bash --noprofile --norc -s`` on the job's node, which
    runs ``launch_script`` as the step ``srun_argv`` (``slurm.commands.step_argv``)."""
    kid = check_token(kernel_id, "kernel id")
    srun = join(srun_argv)
    return "\n".join(
        [
            "umask 077",
            f"npr_steps={STEP_BASE}",
            f"npr_d=$npr_steps/{kid}",
            'mkdir -p -- "$npr_steps" && rm -rf -- "$npr_d" && mkdir -m 700 -- "$npr_d" || '
            '{ echo "NPR_FAIL cannot create $npr_d"; exit 1; }',
            f'printf "%s" {quote(launch_script)} > "$npr_d/launch.sh" || '
            '{ echo "NPR_FAIL cannot write $npr_d/launch.sh"; exit 1; }',
            # Open the script, then unlink it: srun reads it from the open file,
            # and the key it holds does not stay on disk.
            'exec 5< "$npr_d/launch.sh"; rm -f -- "$npr_d/launch.sh"',
            ': > "$npr_d/out"',
            f'setsid {srun} <&5 > "$npr_d/out" 2> "$npr_d/err" &',
            "npr_srun=$!",
            "exec 5<&-",
            # Relay the task's report until the kernel is up, or srun has ended.
            'exec 4< <(tail -n +1 -s 0.1 -F --pid="$npr_srun" "$npr_d/out" 2>/dev/null)',
            "npr_tail=$!",
            "npr_up=0",
            "while IFS= read -r line <&4; do",
            '  printf "%s\\n" "$line"',
            "  case $line in NPR_DONE*) npr_up=1; break ;; esac",
            "done",
            'kill "$npr_tail" 2>/dev/null; exec 4<&-',
            'if [ "$npr_up" = 1 ]; then rm -rf -- "$npr_d"; exit 0; fi',
            'wait "$npr_srun"; npr_code=$?',
            'echo "NPR_STEP_EXIT $npr_code"',
            'tail -n 20 "$npr_d/err"',
            'rm -rf -- "$npr_d"',
            "exit 1",
            "",
        ]
    )
