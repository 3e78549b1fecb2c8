"""The settings registry against everything that lists settings: traits, variables, flags, docs.

nersc_provisioner/settings_registry.py declares each setting once. The traits, the
environment reader and the install flags are made from it; these tests check that what
users meet (a provisioner's keys and defaults, a NERSC_PROVISIONER_* variable, an
install flag, a docs table) is what the registry says. No rig: they run in seconds.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode

from nersc_provisioner import ConfigError
from nersc_provisioner.cli import _parser, main
from nersc_provisioner.provisioners import PROVISIONERS
from nersc_provisioner.settings import env_var_name, environment_defaults, environment_keys
from nersc_provisioner.settings_registry import (
    BY_NAME,
    PROVISIONER_SCOPES,
    SETTINGS,
    SLURM_KEYS,
    Scope,
    Setting,
    in_scope,
    settings_of,
)
from nersc_provisioner.slurm import commands
from nersc_provisioner.systems import SYSTEMS
from nersc_provisioner.transports.ssh import DEFAULT_SSH_CONFIG

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: A valid value of every setting, as the provisioner holds it. Flags, variables and the
#: written kernel.json are derived from these; a new setting needs one here.
VALID: dict[str, Any] = {
    "modules": ["python", "cudatoolkit/12.2"],
    "module_use": ["/opt/m1", "/opt/m2"],
    "purge": True,
    "module_init": "lmod",
    "setup": ["conda activate a", "export B=1"],
    "container": "docker:org/image:tag",
    "container_runtime": "podman-hpc",
    "container_args": ["--gpu", "-e"],
    "cwd": "/work",
    "launch_timeout": 7.5,
    "host": "login.example.org",
    "user": "alice",
    "port": 2222,
    "identity_file": "/keys/id",
    "ssh_config": "/etc/alt_ssh_config",
    "known_hosts": ["/kh/a", "/kh/b"],
    "remote_python": "/opt/py/bin/python",
    "remote_cwd": "/scratch",
    "lease_timeout": 60,
    "reconnect_grace": 30.0,
    "connection_persist": 5.0,
    "data_path": "direct",
    "slurm": {"qos": "debug"},
    "queue_timeout": 30.0,
    "transport_encryption": "required",
}
SLURM_VALID: dict[str, Any] = {
    "qos": "debug", "constraint": "cpu", "time": "30", "account": "m1234", "nodes": 2,
    "gpus": "4", "partition": "p", "reservation": "r", "extra_args": ["--mem=8G"],
    "job_id": "123", "keep": True,
}  # fmt: skip
TRAIT_TYPES = {
    "str": Unicode, "bool": Bool, "int": Int, "float": Float, "list": List,
    "mapping": Dict, "choice": CaselessStrEnum,
}  # fmt: skip
#: install's own flags, which write no setting.
INSTALL_OWN = {
    "-h", "--help", "--name", "--display-name", "--user", "--prefix", "--sys-prefix", "--env",
    "--provisioner", "--python", "--kernel-argv", "--no-check",
}  # fmt: skip


def test_every_setting_has_a_valid_sample() -> None:
    assert set(VALID) == set(BY_NAME)
    assert set(SLURM_VALID) == {key.name for key in SLURM_KEYS}
    assert len(BY_NAME) == len(SETTINGS)  # no name twice


def test_each_provisioner_has_exactly_its_registry_settings() -> None:
    assert set(PROVISIONER_SCOPES) == set(PROVISIONERS)
    for name, cls in PROVISIONERS.items():
        assert cls.config_keys() == sorted(s.name for s in settings_of(name)), name
    assert {scope for s in SETTINGS for scope in s.scopes} == set(Scope)


def _expected_help(provisioner: str, declared: Setting) -> str:
    if provisioner == "nersc-local" and Scope.NODE_SSH in declared.scopes:
        return declared.node_help
    return declared.help


@pytest.mark.parametrize("provisioner", sorted(PROVISIONERS))
def test_every_trait_is_as_the_registry_declares_it(jupyter_dirs: Path, provisioner: str) -> None:
    cls = PROVISIONERS[provisioner]
    created = cls()
    traits = cls.class_traits(config=True)
    wrong = []
    for declared in settings_of(provisioner):
        trait = traits[declared.name]
        default = declared.default_value()
        if declared.system_default:
            default = getattr(SYSTEMS[provisioner], declared.system_default)
        value = getattr(created, declared.name)
        facts = {
            "type": (type(trait), TRAIT_TYPES[declared.kind]),
            "help": (trait.help, _expected_help(provisioner, declared)),
            "default": ((type(value), value), (type(default), default)),
        }
        if declared.kind == "list":
            facts["items"] = (type(trait._trait), Unicode)
        if declared.kind == "choice":
            facts["choices"] = (tuple(trait.values), declared.choices)
        wrong += [
            f"{declared.name} {fact}: {a!r} != {b!r}" for fact, (a, b) in facts.items() if a != b
        ]
    assert not wrong, "\n".join(wrong)


def _as_variable(declared: Setting, value: Any) -> str:
    if declared.kind == "list":
        return declared.delimiter.join(value)
    return str(value).lower() if declared.kind == "bool" else str(value)


@pytest.mark.parametrize("declared", SETTINGS, ids=[s.name for s in SETTINGS])
def test_the_declared_variable_is_read_and_no_other(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch, declared: Setting
) -> None:
    value = VALID[declared.name]
    monkeypatch.setenv(env_var_name(declared.name), _as_variable(declared, value))
    expected = {declared.name: value} if declared.environment else {}
    assert environment_defaults() == expected
    assert (declared.name in environment_keys()) == declared.environment


def test_a_list_variable_is_split_on_its_delimiter(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items are stripped and empty ones dropped, whatever the delimiter."""
    lists = [s for s in SETTINGS if s.kind == "list" and s.environment]
    for declared in lists:
        d = declared.delimiter
        monkeypatch.setenv(env_var_name(declared.name), f"a{d} b{d}{d}")
    assert environment_defaults() == {s.name: ["a", "b"] for s in lists}


@pytest.mark.parametrize("provisioner", sorted(PROVISIONERS))
def test_every_variable_reaches_the_provisioners_that_have_it(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch, provisioner: str
) -> None:
    for declared in SETTINGS:
        if declared.environment:
            value = _as_variable(declared, VALID[declared.name])
            monkeypatch.setenv(env_var_name(declared.name), value)
    created = PROVISIONERS[provisioner]()
    for declared in settings_of(provisioner):
        expected = VALID[declared.name] if declared.environment else declared.default_value()
        assert getattr(created, declared.name) == expected, declared.name


def _install_actions() -> dict[str, Any]:
    install = _parser()._subparsers._group_actions[0].choices["install"]
    return {option: action for action in install._actions for option in action.option_strings}


def test_every_install_flag_is_as_declared_and_none_is_missing() -> None:
    actions = _install_actions()
    declared = [*((s, "config") for s in SETTINGS), *((k, "slurm") for k in SLURM_KEYS)]
    wrong = []
    for setting, namespace in declared:
        if setting.flag is None:
            continue
        action = actions[setting.flag.name]
        facts = {
            "dest": (action.dest, f"{namespace}.{setting.name}"),
            "help": (action.help, setting.flag.help),
            "metavar": (action.metavar, setting.flag.metavar),
            "repeatable": (type(action).__name__ == "_AppendAction", setting.kind == "list"),
            "switch": (type(action).__name__ == "_StoreTrueAction", setting.kind == "bool"),
            "type": (action.type, {"int": int, "float": float}.get(setting.kind)),
            "choices": (tuple(action.choices or ()), setting.choices),
        }
        wrong += [
            f"{setting.flag.name} {k}: {a!r} != {b!r}" for k, (a, b) in facts.items() if a != b
        ]
    assert not wrong, "\n".join(wrong)
    flags = {s.flag.name for s, _ in declared if s.flag is not None}
    assert set(actions) - INSTALL_OWN == flags


def _flag_argv(declared: Setting, value: Any) -> list[str]:
    assert declared.flag is not None
    if declared.kind == "bool":
        return [declared.flag.name]
    items = value if declared.kind == "list" else [value]
    return [f"{declared.flag.name}={item}" for item in items]


@pytest.mark.parametrize("provisioner", sorted(PROVISIONERS))
def test_every_flag_writes_its_key(jupyter_dirs: Path, tmp_path: Path, provisioner: str) -> None:
    argv = ["install", "--prefix", str(tmp_path), "--name", "x", "--provisioner", provisioner]
    expected: dict[str, Any] = {}
    for declared in settings_of(provisioner):
        if declared.flag is not None:
            argv += _flag_argv(declared, VALID[declared.name])
            expected[declared.name] = VALID[declared.name]
    for key in SLURM_KEYS:
        argv += _flag_argv(key, SLURM_VALID[key.name])
    expected["slurm"] = SLURM_VALID
    assert main([*argv, "--no-check"]) == 0
    written = tmp_path / "share" / "jupyter" / "kernels" / "x" / "kernel.json"
    config = json.loads(written.read_text())["metadata"]["kernel_provisioner"]["config"]
    assert config == expected
    assert list(config) == [s.name for s in settings_of(provisioner) if s.name in expected]


def test_nersc_local_refuses_every_remote_flag_naming_them(
    jupyter_dirs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = settings_of("nersc-local")
    remote = [s for s in in_scope(Scope.REMOTE) if s.flag is not None and s not in local]
    argv = [arg for s in remote for arg in _flag_argv(s, VALID[s.name])]
    assert main(["install", "--user", "--slurm-qos", "debug", *argv]) == 1
    names = ", ".join(s.flag.name for s in remote if s.flag is not None)
    assert (
        f"error: {names}: the remote host flags need a remote provisioner"
        in capsys.readouterr().err
    )


def test_the_slurm_keys_are_those_slurm_options_reads() -> None:
    assert tuple(key.name for key in SLURM_KEYS) == commands.SLURM_KEYS
    defaults = commands.SlurmOptions()
    for key in SLURM_KEYS:
        value = getattr(defaults, key.name)
        assert (list(value) if key.kind == "list" else value) == key.default_value(), key.name


def test_the_ssh_config_default_is_the_transport_s() -> None:
    assert BY_NAME["ssh_config"].default == DEFAULT_SSH_CONFIG


# --- the docs ------------------------------------------------------------------------------


@dataclass
class Table:
    doc: str
    heading: str
    header: list[str]
    rows: list[list[str]]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def tables(name: str) -> list[Table]:
    found: list[Table] = []
    heading = ""
    lines = (DOCS / name).read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not lines[number - 1].startswith("|"):
            found.append(Table(name, heading, _cells(line), []))
        elif line.startswith("|") and not line.startswith("|---"):
            found[-1].rows.append(_cells(line))
    return found


def doc_type(declared: Setting) -> str:
    if declared.kind == "choice":
        words = [f"`{choice}`" for choice in declared.choices]
        text = f"{', '.join(words[:-1])} or {words[-1]}"
    else:
        text = {"list": "list of str", "mapping": "mapping"}.get(declared.kind, declared.kind)
    return f"{text} ({declared.unit})" if declared.unit else text


def doc_default(declared: Setting) -> str:
    if declared.system_default:
        systems = [SYSTEMS["nersc-perlmutter"], SYSTEMS["nersc-cori"]]
        return " / ".join(f'`"{getattr(s, declared.system_default)}"`' for s in systems)
    return f"`{json.dumps(declared.default_value())}`"


def doc_variable(declared: Setting) -> str:
    return f"`{env_var_name(declared.name)}`" if declared.environment else "none"


def doc_parsing(declared: Setting) -> str:
    if not declared.environment:
        return ""
    if declared.kind == "list":
        split = {"\n": "newline", " ": "space"}.get(declared.delimiter, f"`{declared.delimiter}`")
        return f"list, split on {split}"
    return "string" if declared.kind == "str" else declared.kind


def _row_problems(table: Table, row: list[str]) -> list[str]:
    key, cells = row[0].strip("`"), dict(zip(table.header, row, strict=True))
    declared = BY_NAME[key]
    default = doc_default(declared)
    problems = []
    if cells["type"] != doc_type(declared):
        problems.append(f"type {cells['type']!r}, registry: {doc_type(declared)!r}")
    if not re.match(re.escape(default) + r"($|:| \()", cells["default"]):
        problems.append(f"default {cells['default']!r}, registry: {default!r}")
    if not cells["environment variable"].startswith(doc_variable(declared)):
        problems.append(f"variable {cells['environment variable']!r}: {doc_variable(declared)!r}")
    parsing = cells.get("how the variable is parsed", doc_parsing(declared))
    if parsing != doc_parsing(declared):
        problems.append(f"parsing {parsing!r}, registry: {doc_parsing(declared)!r}")
    return [f"{table.doc} ({table.heading}) `{key}`: {p}" for p in problems]


SECTIONS = {
    "Wrapper settings (all provisioners)": Scope.WRAPPER,
    "Remote settings (`nersc-perlmutter`, `nersc-cori`)": Scope.REMOTE,
    "Slurm settings (all provisioners)": Scope.SLURM,
    "Transport encryption": Scope.ENCRYPTION,
    "SSH settings of `nersc-local` (with `slurm` only)": Scope.NODE_SSH,
}


def test_the_configuration_tables_are_the_registry() -> None:
    """docs/configuration.md: one table per scope, every setting, its facts as declared."""
    found = [t for t in tables("configuration.md") if t.header[:2] == ["key", "type"]]
    assert {t.heading for t in found} == set(SECTIONS)
    problems = []
    for table in found:
        keys = [row[0].strip("`") for row in table.rows]
        expected = [s.name for s in in_scope(SECTIONS[table.heading])]
        if sorted(keys) != sorted(expected):
            problems.append(f"{table.heading}: keys {keys}, registry: {expected}")
        for row in table.rows:
            problems += _row_problems(table, row) if row[0].strip("`") in BY_NAME else []
    assert not problems, "\n".join(problems)


def test_the_remote_kernels_tables_agree_with_the_registry() -> None:
    found = [t for t in tables("remote-kernels.md") if t.header[:3] == ["key", "type", "default"]]
    assert len(found) == 2
    problems = [p for t in found for row in t.rows for p in _row_problems(t, row)]
    assert not problems, "\n".join(problems)


def test_the_compute_nodes_table_lists_the_slurm_keys() -> None:
    (table,) = [t for t in tables("compute-nodes.md") if t.header[:3] == ["key", "type", "becomes"]]
    assert [row[0].strip("`") for row in table.rows] == [key.name for key in SLURM_KEYS]
    for row, key in zip(table.rows, SLURM_KEYS, strict=True):
        assert row[1].startswith(doc_type(key)), (row[1], key.name)


def _flag_cell(cell: str) -> tuple[str, str | None]:
    words = re.split(r"[ =]", cell.strip("`"), maxsplit=1)
    return words[0], words[1] if len(words) > 1 else None


def _doc_metavar(declared: Setting) -> str | None:
    assert declared.flag is not None
    if declared.choices:
        return "{" + ",".join(declared.choices) + "}"
    return declared.flag.metavar


def test_the_cli_page_names_every_flag_with_its_key_and_metavar() -> None:
    """docs/cli.md: the install synopsis and the flag tables, against the registry."""
    by_flag = {s.flag.name: (s.name, s) for s in SETTINGS if s.flag is not None}
    by_flag |= {k.flag.name: (f"slurm.{k.name}", k) for k in SLURM_KEYS if k.flag is not None}
    problems, seen = [], set()
    for table in tables("cli.md"):
        if table.header[:2] != ["flag", "config key"]:
            continue
        for row in table.rows:
            flag, metavar = _flag_cell(row[0])
            if flag not in by_flag:
                continue
            seen.add(flag)
            key, declared = by_flag[flag]
            if row[1] != f"`{key}`" or metavar != _doc_metavar(declared):
                problems.append(
                    f"cli.md row {row[:2]}: registry {flag} {_doc_metavar(declared)}, `{key}`"
                )
    problems += [f"cli.md: no table row for {flag}" for flag in sorted(set(by_flag) - seen)]
    text = (DOCS / "cli.md").read_text()
    synopsis = text[text.index("python -m nersc_provisioner install [") :].split("```")[0]
    for flag, (_, declared) in by_flag.items():
        shown = re.findall(re.escape(flag) + r"(?=[\] =])(?:[ =]([^\] ]+))?\]", synopsis)
        if [m or None for m in shown] != [_doc_metavar(declared)]:
            problems.append(f"cli.md synopsis: {flag} {shown}, registry {_doc_metavar(declared)}")
    assert not problems, "\n".join(problems)


NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen",
)  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "pattern", "scope"),
    [
        ("configuration.md", r"has the (\w+) \*\*wrapper settings\*\*", Scope.WRAPPER),
        ("configuration.md", r"the (\w+) \*\*Slurm settings\*\*", Scope.SLURM),
        ("configuration.md", r"have (\w+) more \*\*remote settings\*\*", Scope.REMOTE),
        ("configuration.md", r"has (\w+) SSH settings of its own", Scope.NODE_SSH),
        ("how-it-works.md", r"with (\w+) more settings \(`RemoteOptions`\)", Scope.REMOTE),
    ],
)
def test_the_counts_of_settings_in_the_docs(doc: str, pattern: str, scope: Scope) -> None:
    text = " ".join((DOCS / doc).read_text().split())
    (word,) = re.findall(pattern, text)
    assert NUMBERS.index(word) == len(in_scope(scope))


def test_the_settings_without_a_variable_are_named() -> None:
    text = " ".join((DOCS / "configuration.md").read_text().split())
    (named,) = re.findall(r"\(([^()]*) have no environment variable\)", text)
    assert set(re.findall(r"`(\w+)`", named)) == {s.name for s in SETTINGS if not s.environment}


def test_every_list_of_valid_keys_quoted_in_the_docs_is_real(jupyter_dirs: Path) -> None:
    quoted = 0
    for doc in sorted(DOCS.glob("*.md")):
        lines = doc.read_text().splitlines()
        for number, line in enumerate(lines):
            if "What to do: valid keys are:" in line:
                (name,) = re.findall(r"in the (nersc-[a-z]+) config", lines[number - 1])
                with pytest.raises(ConfigError) as info:
                    PROVISIONERS[name](no_such_key=1)
                assert line.endswith(f"What to do: {info.value.hint}"), f"{doc.name}:{number + 1}"
                quoted += 1
            for listed in re.findall(r"valid keys are: ([a-z_, ]+); pass anything else", line):
                assert listed.split(", ") == [key.name for key in SLURM_KEYS], doc.name
    assert quoted >= 2


def test_an_install_command_in_the_docs_uses_real_flags() -> None:
    """The flags of every `install` command quoted in docs/ exist (a renamed flag shows)."""
    actions = _install_actions()
    unknown = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text().replace("\\\n", " ")
        for command in re.findall(r"nersc_provisioner install ([^\n`|]*)", text):
            for word in shlex.split(command):
                flag = word.split("=")[0]
                if flag.startswith("--") and flag not in actions and flag != "--help":
                    unknown.append(f"{doc.name}: {flag}")
    assert not unknown, "\n".join(sorted(set(unknown)))
