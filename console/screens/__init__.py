"""The console's screens: one module per area (dashboard, detail/trace, logs, modals)."""

from console.screens.common import ConsoleScreen
from console.screens.dashboard import DashboardScreen
from console.screens.detail import CallTraceScreen, InstanceDetailScreen
from console.screens.health import AlarmsScreen, PbxScreen
from console.screens.logs import AuditScreen, CallsScreen, EventLogScreen, NodesScreen, PushLogScreen
from console.screens.modals import KEYMAP, ConfirmScreen, EventScreen, HelpScreen, keymap_for

__all__ = [
    "KEYMAP",
    "AlarmsScreen",
    "AuditScreen",
    "CallTraceScreen",
    "CallsScreen",
    "ConfirmScreen",
    "ConsoleScreen",
    "DashboardScreen",
    "EventLogScreen",
    "EventScreen",
    "HelpScreen",
    "InstanceDetailScreen",
    "NodesScreen",
    "PbxScreen",
    "PushLogScreen",
    "keymap_for",
]
