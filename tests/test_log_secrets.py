"""No log call of ours hands a selector, token or password to the logger unmasked (the runtime
check with real traffic is tests/hostile/test_storage.py; this one covers the lines that traffic
did not reach, such as warnings on timeouts and failures)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})
SECRET_NAMES = ("selector", "token", "password")


def unmasked_log_arguments() -> list[str]:
    found: list[str] = []
    for package in ("sipis", "storage", "lab", "contract"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in LOG_METHODS and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in ("log", "logger", "logging")):
                    continue
                for argument in node.args[1:]:
                    text = ast.unparse(argument)
                    if any(name in text for name in SECRET_NAMES) and "mask(" not in text and "safe_url(" not in text:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    return found


def test_no_log_call_passes_a_selector_token_or_password_unmasked() -> None:
    assert unmasked_log_arguments() == []
