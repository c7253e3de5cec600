"""docs/operations.md promises that every command in it is run by `make rehearse` or by a test:
each command of its ```sh blocks must appear, as written, in rehearsal/ or tests/.

"As written" allows what a runbook must leave open: example values (an email, a key prefix, a
month, `<time>`), `NAME=value` arguments (any value), and paths (the same last two parts: the
rehearsal's vault or backup lives elsewhere than a real one). `sudo` and quotes are ignored, and
`make` with options (`make -C "$REPO" build`, the rehearsal's `"${MAKE_ON[@]}"`) is `make`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs" / "operations.md"

# Commands no machine here can run, each with the reason; everything else must be exercised.
NOT_RUNNABLE = {
    "certbot certonly": "needs a public DNS name and Let's Encrypt (the rehearsal VM has neither)",
}

_EXAMPLE = re.compile(r"@example\.com$|^sk_[0-9a-f]{8}$|^\d{4}-\d{2}$|<[a-z]+>|example\.com")


def runbook_commands() -> list[str]:
    commands: list[str] = []
    in_block = False
    for line in RUNBOOK.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = stripped == "```sh"
            continue
        if in_block and stripped:
            command = re.sub(r"\s+#\s.*$", "", stripped)  # the explanation after the command
            commands.append(command)
    return commands


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return [w for w in words if w != "sudo"]


def pattern(command: str) -> re.Pattern[str]:
    """What a line that runs `command` looks like (see the module's docstring)."""
    words = _words(command)
    parts: list[str] = []
    for word in words:
        if word.startswith("ARGS="):  # make api ARGS='...': its words, each one checked
            inner = [_part(w) for w in _words(word.removeprefix("ARGS="))]
            parts.append(r"ARGS=" + r"\s+".join(inner))
        else:
            parts.append(_part(word))
    if words and words[0] == "make":
        return re.compile(r"\bmake\b.*?\s" + r"\s+".join(parts[1:]) + r"(\s|$)")
    return re.compile(r"(^|\s)" + r"\s+".join(parts) + r"(\s|$)")


def _part(word: str) -> str:
    if re.fullmatch(r"[A-Z_]+=.*", word):
        return re.escape(word.split("=", 1)[0]) + r"=\S+"
    if _EXAMPLE.search(word):
        return r"\S+"
    if "/" in word and not word.startswith(("http://", "https://")):
        tail = "/".join(word.rstrip("/").split("/")[-2:])
        return r"\S*" + re.escape(tail)
    return re.escape(word)


def exercised_lines() -> list[str]:
    """Every line of the rehearsal and the tests, as the patterns see them."""
    sources = [*sorted((REPO / "rehearsal").glob("*")), *sorted((REPO / "tests").rglob("*.py"))]
    lines: list[str] = []
    for source in sources:
        if not source.is_file() or source == Path(__file__).resolve():
            continue
        for line in source.read_text(errors="replace").splitlines():
            line = line.replace('"${MAKE_ON[@]}"', "make")
            lines.append(" ".join(_words(line.replace('"', "").replace("'", ""))))
    return lines


def test_the_runbook_has_commands() -> None:
    commands = runbook_commands()
    assert len(commands) >= 20, commands
    assert any(c.startswith("make rollback") for c in commands)


def test_every_runbook_command_is_run_by_the_rehearsal_or_a_test() -> None:
    lines = exercised_lines()
    missing = []
    for command in runbook_commands():
        if any(" ".join(_words(command)).startswith(skip) for skip in NOT_RUNNABLE):
            continue
        found = pattern(command)
        if not any(found.search(line) for line in lines):
            missing.append(f"{command}    (looked for /{found.pattern}/)")
    assert not missing, "run by nothing:\n" + "\n".join(missing)


def test_the_patterns_tell_run_from_not_run() -> None:
    """The matcher itself: what must count as running a command, and what must not."""
    rotate = pattern(".cache/ansible-venv/bin/ansible-vault edit ansible/group_vars/all/vault.yml")
    assert rotate.search("EDITOR=x /r/.cache/ansible-venv/bin/ansible-vault edit /r/all/vault.yml")
    keys = pattern("make api ARGS='keys revoke sk_1a2b3c4d'")
    assert keys.search("timeout 60 make api ARGS=keys revoke $PREFIX")
    assert not keys.search("timeout 60 make api ARGS=keys list $EMAIL")
    build = pattern("make build")
    assert build.search("make -C $REPO --no-print-directory build")
    assert not build.search("make -C $REPO --no-print-directory build-arm64")
    assert not pattern("make rollback").search("make releases")
