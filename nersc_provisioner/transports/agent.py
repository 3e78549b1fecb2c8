"""The agent protocol: the script that answers on the remote side, and our side's
lines to it and from it.

One agent runs per SSH connection, on a session with a PTY (which also makes sshd
set TCP_NODELAY on the whole connection).  It answers ``alive``, ``signal`` and
``cleanup`` requests and renews the leases of the kernels it watches.  A request
is one line, ``COMMAND SEQ ARGS...``; every answer is ``NPR SEQ ANSWER``.  Every
word is checked (:func:`nersc_provisioner.shell.check_token`) before it is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..shell import check_token, join

AGENT = r"""# nersc_provisioner agent: one per SSH connection, on a PTY session
stty -echo 2>/dev/null
base=$HOME/.nersc_provisioner/kernels; every=$1; watched=""
verify() {  # verify PID START ID: the process is that kernel, not a reused PID
  # Builtins only (no cut/tr/grep): an interrupt waits for this answer.
  local stat arg; local -a fields args
  { read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 1
  # Fields after "(comm)" start at field 3, so the start time (field 22) is [19].
  read -r -a fields <<< "${stat##*) }"
  [ "${fields[19]}" = "$2" ] || return 1
  { mapfile -d '' -t args < "/proc/$1/cmdline"; } 2>/dev/null || return 1
  for arg in "${args[@]}"; do
    case $arg in *"$base/$3/connection.json"*) return 0 ;; esac
  done
  return 1
}
renew() { for k in $watched; do [ -d "$base/$k" ] && : > "$base/$k/lease"; done; }
unwatchdog() {  # end kernel $1's watchdog (its whole session), verified by its command line
  w=$(cat "$base/$1/watchdog" 2>/dev/null) || return 0
  tr '\0' ' ' < "/proc/$w/cmdline" 2>/dev/null | grep -qF -- "npr-watchdog $base/$1 " &&
    kill -- "-$w" 2>/dev/null
  return 0
}
echo "NPR 0 ready $(hostname)"
renewed=$SECONDS
while :; do
  # Renew every $every seconds whether requests keep coming or not.
  if [ $((SECONDS - renewed)) -ge "$every" ]; then renew; renewed=$SECONDS; fi
  IFS=' ' read -r -t "$every" cmd seq a b c d
  status=$?
  if [ "$status" -gt 128 ]; then continue; fi  # timed out: renew at the top
  if [ "$status" -ne 0 ]; then exit 0; fi  # our side went away
  case $cmd in
    watch) watched="$watched $a"; renew; echo "NPR $seq ok" ;;
    unwatch) watched=$(printf '%s\n' $watched | grep -vx -- "$a" | tr '\n' ' ')
      echo "NPR $seq ok" ;;
    alive) if verify "$a" "$b" "$c"; then echo "NPR $seq alive"; else echo "NPR $seq dead"; fi ;;
    signal) if verify "$b" "$c" "$d"; then
        kill -s "$a" -- "-$b" 2>/dev/null || kill -s "$a" "$b"; echo "NPR $seq ok"
      else echo "NPR $seq gone"; fi ;;
    cleanup) unwatchdog "$a"; rm -rf -- "$base/$a"; echo "NPR $seq ok" ;;
    renew) renew; echo "NPR $seq ok" ;;
    *) echo "NPR $seq error unknown command" ;;
  esac
done
"""


def agent_command(renew_every: int) -> str:
    """The agent's exec command line (it carries no secret)."""
    return join(["bash", "--noprofile", "--norc", "-c", AGENT, "npr-agent", str(int(renew_every))])


def request_line(seq: int, command: str, args: Sequence[str]) -> bytes:
    """One request, every word checked: ``COMMAND SEQ ARGS...``."""
    words = [check_token(command, "command"), *(check_token(a, "argument") for a in args)]
    return (" ".join([words[0], str(seq), *words[1:]]) + "\n").encode()


def parse_reply(raw: bytes) -> tuple[int, str] | None:
    """``(seq, answer)`` from an ``NPR SEQ ANSWER`` line; None for anything else (the
    PTY echoes, a shell's noise)."""
    words = raw.decode(errors="replace").strip().split(" ", 2)
    if len(words) >= 3 and words[0] == "NPR" and words[1].isdigit():
        return int(words[1]), words[2]
    return None
