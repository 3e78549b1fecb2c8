"""Remote-side scripts, built here and carried over the SSH channel at launch.

Nothing of ours is installed on the remote host.  Three bash scripts travel
over SSH:

* the **launch script** (sent on the stdin of one ``exec``): makes a 0700
  kernel directory, writes the connection file (0600, through the ``printf``
  builtin, so the key is on no command line), starts the kernel through the
  same wrapper as ``nersc-local`` in a session of its own, starts the
  watchdog, and reports the kernel's PID, start time and the ports the kernel
  chose;
* the **agent** (its script and protocol are :mod:`nersc_provisioner.transports.agent`),
  one per SSH connection: answers ``alive``, ``signal`` and ``cleanup`` requests, and
  renews the leases of the kernels it watches;
* the **watchdog**, one per kernel: ends the kernel when its lease has not
  been renewed for ``lease_timeout`` seconds (the Jupyter side died or lost
  contact), and removes the kernel directory when the kernel is gone.

Every value is quoted by :mod:`nersc_provisioner.shell`; the protocol tokens
(kernel ids, PIDs, signal names) are checked here before they are sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import LaunchError
from ..shell import check_token, quote
from .wrapper import READY_MARKER, EnvironmentSetup, build_script, launch_error_from_exit

#: Where kernels live on the remote side, as a shell expression (expanded there).
REMOTE_BASE = '"$HOME/.nersc_provisioner/kernels"'

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


@dataclass(frozen=True)
class RelayStart:
    """The session relay to start beside the kernel (:mod:`nersc_provisioner.session`).

    ``program`` is the relay's Python text; ``settings`` its JSON settings, which hold
    its secret: both are written by the ``printf`` builtin into the 0700 kernel
    directory (0600), so neither is on a command line.  The relay runs through the
    kernel's own wrapper (modules, setup lines) with ``python``, so it finds the Python
    and the pyzmq the kernel finds.
    """

    python: str
    program: str = field(repr=False)
    settings: str = field(repr=False)


@dataclass(frozen=True)
class RemoteLaunch:
    """Everything the launch script needs."""

    kernel_id: str
    argv: tuple[str, ...]  # with {connection_file} still in it
    # key as str, ports 0, ip 127.0.0.1; kept out of repr() so the key cannot reach a log
    connection: Mapping[str, object] = field(repr=False)
    setup: EnvironmentSetup = field(default_factory=EnvironmentSetup)
    lease_timeout: int = 1800
    watchdog_interval: int = 10
    #: In a Slurm job step: stay until the kernel exits, for the step ends with this script.
    foreground: bool = False
    #: The session relay, or None for the byte-for-byte tunnel.
    relay: RelayStart | None = None


def build_launch_script(launch: RemoteLaunch) -> str:
    """The launch script, to be fed to ``bash --noprofile --norc -s`` on the remote side."""
    kid = check_token(launch.kernel_id, "kernel id")
    info = json.dumps(dict(launch.connection), indent=2)
    # {connection_file} becomes "$npr_dir/connection.json": a quoted constant
    # around the expansion of $npr_dir, never the user's text unquoted.
    argv_words = []
    for arg in launch.argv:
        parts = arg.split("{connection_file}")
        if len(parts) > 1:  # every occurrence, as jupyter_client fills them in
            argv_words.append('"$npr_dir/connection.json"'.join(quote(p) for p in parts))
        else:
            argv_words.append(quote(arg))
    wrapper = build_script(launch.setup)
    ttl, every = int(launch.lease_timeout), int(launch.watchdog_interval)
    return "\n".join(
        [
            "umask 077",
            # One stream: sshd forwards stdout and stderr separately, so an error message
            # and the NPR_ line after it could otherwise arrive mixed into one line.
            "exec 2>&1",
            f"npr_base={REMOTE_BASE}",
            f"npr_dir=$npr_base/{kid}",
            'mkdir -p -- "$npr_base" || { echo "NPR_FAIL cannot create $npr_base"; exit 1; }',
            'rm -rf -- "$npr_dir"',
            'mkdir -m 700 -- "$npr_dir" || { echo "NPR_FAIL cannot create $npr_dir"; exit 1; }',
            f'printf "%s\\n" {quote(info)} > "$npr_dir/connection.json" || '
            '{ echo "NPR_FAIL cannot write $npr_dir/connection.json"; exit 1; }',
            ': > "$npr_dir/lease"',
            # The wrapper (it holds the kernel.json env) goes into a 0600 file, so
            # it is on no command line that other users of the host can read.
            f'printf "%s" {quote(wrapper)} > "$npr_dir/wrapper.sh"',
            'setsid bash --noprofile --norc "$npr_dir/wrapper.sh" 3 '
            + " ".join(argv_words)
            + ' 3>&1 >"$npr_dir/kernel.log" 2>&1 </dev/null &',
            "npr_pid=$!",
            'npr_start=$(cut -d" " -f22 "/proc/$npr_pid/stat" 2>/dev/null)',
            'printf "%s %s\\n" "$npr_pid" "$npr_start" > "$npr_dir/pid"',
            'echo "NPR_PID $npr_pid $npr_start $(hostname)"',
            f'setsid bash --noprofile --norc -c {quote(WATCHDOG)} npr-watchdog "$npr_dir" '
            f'"$npr_pid" {ttl} {every} </dev/null >/dev/null 2>&1 &',
            'npr_watchdog=$!; echo "$npr_watchdog" > "$npr_dir/watchdog"',
            *(_start_relay(launch.relay) if launch.relay else []),
            *_wait_for_ports(),
            "grep '_port\"' \"$npr_dir/connection.json\" | sed 's/^/NPR_PORT /'",
            *(_report_relay() if launch.relay else []),
            # The kernel wrote the file back with its ports; an ipykernel that knows
            # CurveZMQ keeps the curve keys in it, an older one drops them.
            'if grep -q \'"curve_secretkey"\' "$npr_dir/connection.json"; then echo NPR_CURVE on; '
            "else echo NPR_CURVE off; fi",
            "echo NPR_DONE",
            *(
                [
                    # The step lasts as long as this script: wait for the kernel.
                    'wait "$npr_pid"; npr_code=$?',
                    'kill -- "-$npr_watchdog" 2>/dev/null',
                    'exit "$npr_code"',
                ]
                if launch.foreground
                else []
            ),
            "",
        ]
    )


def _wait_for_ports() -> list[str]:
    """Wait until the kernel listens; if it dies first, report it and clean up."""
    return [
        # Started = five ports in the file and the shell port listening.  The
        # second half matters when the ports were given beforehand (data_path
        # direct, at a restart: ipykernel merges into our file, so it looks
        # complete from the start), and when a kernel writes its ports before
        # binding them.
        "while :; do",
        '  n=$(grep -c \'_port": [1-9]\' "$npr_dir/connection.json" 2>/dev/null)',
        '  p=$(sed -n \'s/.*"shell_port": \\([0-9]*\\).*/\\1/p\' "$npr_dir/connection.json" '
        "2>/dev/null)",
        '  if [ "${n:-0}" -ge 5 ] && [ "${p:-0}" -gt 0 ] && grep -q ":$(printf %04X "$p") '
        '00000000:0000 0A" /proc/net/tcp 2>/dev/null; then break; fi',
        '  if ! kill -0 "$npr_pid" 2>/dev/null; then',
        '    wait "$npr_pid"; npr_code=$?',
        '    echo "NPR_DIED $npr_code"',
        '    tail -n 40 "$npr_dir/kernel.log" 2>/dev/null',
        '    kill -- "-$npr_watchdog" 2>/dev/null',
        '    [ -n "${npr_relay:-}" ] && kill -- "-$npr_relay" 2>/dev/null',
        '    rm -rf -- "$npr_dir"',
        "    exit 1",
        "  fi",
        "  sleep 0.05",
        "done",
    ]


def _start_relay(relay: RelayStart) -> list[str]:
    """Start the relay as the kernel starts (through the same wrapper): it waits for the
    kernel's ports in the connection file, then for the kernel's answer on IOPub."""
    return [
        f'printf "%s" {quote(relay.settings)} > "$npr_dir/relay.json"',
        f'printf "%s" {quote(relay.program)} > "$npr_dir/relay.py"',
        f'setsid bash --noprofile --norc "$npr_dir/wrapper.sh" 3 {quote(relay.python)} '
        '"$npr_dir/relay.py" 3>"$npr_dir/relay.status" </dev/null >"$npr_dir/relay.out" '
        '2>"$npr_dir/relay.log" &',
        'npr_relay=$!; echo "$npr_relay" > "$npr_dir/relay.pid"',
    ]


def _report_relay() -> list[str]:
    """Once the kernel listens: the relay's port (NPR_RELAY_PORT N), or why it has none
    (NPR_RELAY_FAIL reason, with the end of its log): the caller falls back to the tunnel."""
    return [
        "npr_i=0",
        'until grep -q "^NPR_RELAY_" "$npr_dir/relay.out" 2>/dev/null || '
        '! kill -0 "$npr_relay" 2>/dev/null || [ "$npr_i" -ge 600 ]; do',
        "  sleep 0.05; npr_i=$((npr_i + 1))",
        "done",
        'if grep -q "^NPR_RELAY_PORT [0-9]" "$npr_dir/relay.out" 2>/dev/null; then',
        '  grep -m1 "^NPR_RELAY_PORT " "$npr_dir/relay.out"',
        "else",
        '  kill -- "-$npr_relay" 2>/dev/null',
        '  npr_why=$(sed -n "s/^NPR_RELAY_FAIL //p" "$npr_dir/relay.out" 2>/dev/null | head -n 1)',
        '  npr_log=$(grep -v "^NERSC_PROVISIONER_READY" "$npr_dir/relay.status" 2>/dev/null; '
        'tail -n 3 "$npr_dir/relay.log" 2>/dev/null)',
        '  npr_log=$(printf "%s" "$npr_log" | tr "\\n" " ")',
        '  echo "NPR_RELAY_FAIL ${npr_why:-the relay did not start} ${npr_log}"',
        "fi",
        'rm -f -- "$npr_dir/relay.json"',
    ]


WATCHDOG = r"""# nersc_provisioner watchdog: end the kernel when its lease is not renewed
d=$1; pid=$2; ttl=$3; every=$4
mine() { [ "$(cut -d' ' -f1 "$d/pid" 2>/dev/null)" = "$pid" ]; }  # not a restarted kernel's
while :; do
  sleep "$every"
  if ! kill -0 "$pid" 2>/dev/null || ! mine; then mine && rm -rf -- "$d"; exit 0; fi
  now=$(date +%s)
  seen=$(stat -c %Y "$d/lease" 2>/dev/null || date -r "$d/lease" +%s 2>/dev/null || echo 0)
  if [ $((now - seen)) -gt "$ttl" ]; then
    echo "watchdog: no contact for $((now - seen)) s (lease_timeout $ttl s):" \
      "ending kernel $pid" >> "$d/kernel.log"
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null
    mine && rm -rf -- "$d"
    exit 0
  fi
done
"""

# Shell functions shared by `ps` and `kill`: the kernel of directory $1 is the
# process whose command line names $1/connection.json (PID file or not).
FIND_KERNEL = r"""kernel_of() {  # "PID START" of the kernel of directory $d, or "0 0"
  set -- $(cat "$d/pid" 2>/dev/null) 0 0
  if [ "$(cut -d' ' -f22 "/proc/$1/stat" 2>/dev/null)" = "$2" ]; then echo "$1 $2"; return; fi
  for p in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
    case " $c " in
      *" $d/connection.json "*) echo "${p#/proc/} $(cut -d' ' -f22 "$p/stat")"; return ;;
    esac
  done
  echo "0 0"
}
"""

PS_SCRIPT = (
    FIND_KERNEL
    + r"""base=$HOME/.nersc_provisioner/kernels
for d in "$base"/*; do
  [ -d "$d" ] || continue
  k=$(basename "$d"); set -- $(kernel_of)
  state=dead
  if [ "$1" != 0 ]; then state=running; fi
  age=$(( $(date +%s) - $(stat -c %Y "$d/lease" 2>/dev/null || echo 0) ))
  echo "NPR_PS $k $1 $2 $state $age"
done
"""
)


def kernel_log_tail_script(kernel_id: str, lines: int = 10) -> str:
    """Print the last lines of a kernel's log (what it printed before it ended)."""
    kid = check_token(kernel_id, "kernel id")
    return f"tail -n {int(lines)} {REMOTE_BASE}/{kid}/kernel.log 2>/dev/null\n"


def kill_script(kernel_ids: Sequence[str]) -> str:
    """End these kernels (found by PID and start time, or by command line) and remove them.

    Prints ``NPR_KILLED ID`` or ``NPR_MISSING ID`` for each.
    """
    lines = [FIND_KERNEL]
    for kernel_id in kernel_ids:
        kid = check_token(kernel_id, "kernel id")
        lines += [
            f"d={REMOTE_BASE}/{kid}",
            'w=$(cat "$d/watchdog" 2>/dev/null) &&',
            "  tr '\\0' ' ' < \"/proc/$w/cmdline\" 2>/dev/null | "
            'grep -qF -- "npr-watchdog $d " && kill -- "-$w" 2>/dev/null',
            "set -- $(kernel_of)",
            'if [ "$1" != 0 ]; then',
            '  kill -TERM -- "-$1" 2>/dev/null; sleep 1; kill -KILL -- "-$1" 2>/dev/null',
            "fi",
            f'if [ -d "$d" ]; then rm -rf -- "$d"; echo "NPR_KILLED {kid}"; '
            f'else echo "NPR_MISSING {kid}"; fi',
        ]
    return "\n".join(lines) + "\n"


@dataclass
class LaunchReport:
    """What the launch script printed, parsed."""

    pid: int = 0
    start_time: str = ""
    node: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    done: bool = False
    died_code: int | None = None
    failure: str = ""
    step_exit: int | None = None  # srun ended before the kernel was up (Slurm mode)
    curve: bool | None = None  # the kernel kept the CurveZMQ keys (it encrypts)
    relay_port: int = 0  # the session relay listens here (remote 127.0.0.1)
    relay_failure: str = ""  # why there is no relay (the tunnel is used instead)
    other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Take one line of the launch script's output."""
        words = line.split()
        if line == READY_MARKER:
            self.ready = True
        elif words[:1] == ["NPR_PID"] and len(words) >= 3:
            self.pid, self.start_time = int(words[1]), words[2]
            self.node = words[3] if len(words) > 3 else ""
        elif words[:1] == ["NPR_PORT"]:
            match = re.search(r'"(\w+_port)":\s*(\d+)', line)
            if match:
                self.ports[match.group(1)] = int(match.group(2))
        elif words[:1] == ["NPR_DONE"]:
            self.done = True
        elif words[:1] == ["NPR_DIED"]:
            self.died_code = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        elif words[:1] == ["NPR_RELAY_PORT"] and len(words) == 2 and words[1].isdigit():
            self.relay_port = int(words[1])
        elif words[:1] == ["NPR_RELAY_FAIL"]:
            self.relay_failure = line[len("NPR_RELAY_FAIL ") :].strip() or "no reason given"
        elif words[:1] == ["NPR_CURVE"]:
            self.curve = words[1:2] == ["on"]
        elif words[:1] == ["NPR_STEP_EXIT"]:
            self.step_exit = int(words[1]) if len(words) > 1 and words[1].isdigit() else -1
        elif words[:1] == ["NPR_FAIL"]:
            self.failure = line[len("NPR_FAIL ") :]
        else:
            self.other.append(line)

    def error(self, host: str, command: Sequence[str]) -> LaunchError:
        """The error that names why the launch did not complete."""
        stderr = "\n".join(self.other)
        if self.failure:
            return LaunchError(
                f"cannot prepare the kernel directory on {host}: {self.failure}",
                hint="check that your home directory on the remote host is writable "
                "and not over quota",
                command=command,
                stderr=stderr,
            )
        if self.step_exit is not None and self.pid == 0:
            return LaunchError(
                f"Slurm could not start the kernel's job step on {host} "
                f"(srun exit code {self.step_exit})",
                hint="see srun's message below; the job may have ended (`squeue --me`), "
                "or srun may need options that the allocation lacks",
                command=command,
                exit_code=self.step_exit,
                stderr=stderr,
            )
        if not self.ready:
            error = launch_error_from_exit(self.died_code, stderr, command)
            error.message = f"{error.message} on {host}"
            return error
        return LaunchError(
            f"the kernel exited during startup on {host}",
            hint="see the kernel's output above (an import error, a crash); try the same "
            "command in a shell on the remote host",
            command=command,
            exit_code=self.died_code,
            stderr=stderr,
        )


PROBE_CODE = (
    "import sys; import ipykernel; "
    "print('NPR_PYTHON', sys.executable, sys.version.split()[0], ipykernel.__version__)"
)


def build_probe_script(setup: EnvironmentSetup, python: str) -> str:
    """Run the wrapper's setup, then report the Python and ipykernel it finds."""
    return "\n".join(
        [
            f"npr_wrapper={quote(build_script(setup))}",
            'bash --noprofile --norc -c "$npr_wrapper" nersc-kernel 3 '
            f"{quote(python)} -c {quote(PROBE_CODE)} 3>&1 2>&1",
            "",
        ]
    )
