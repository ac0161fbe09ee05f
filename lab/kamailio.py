"""A real Kamailio registrar/proxy on loopback for integration tests and benchmarks.

`Kamailio` renders ``tests/kamailio/kamailio.cfg`` (a template) into a private temp folder with
free ports and a fresh self-signed certificate, runs ``kamailio -DD -E`` in the foreground in its
own process group, and waits until UDP, TCP and the ctl socket answer. ``stop()`` and ``start()``
keep the same ports, so a test can simulate a registrar outage. Registrations are read back with
``kamcmd ul.dump``.

Several people run tests on one machine at once, so nothing here uses a fixed port, and the ports
are picked *below* the kernel's ephemeral range: a port the kernel never hands out to outgoing
connections stays free while Kamailio is stopped for an outage test.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "kamailio" / "kamailio.cfg"

# Static accounts of the template (besides loadNNNN users, who all share LOAD_PASSWORD).
USERS: dict[str, str] = {
    "alice": "alicepw",
    "bob": "bobpw",
    "carol": "carolpw",
    "dave": "davepw",
    "erin": "erinpw",
    "frank": "frankpw",
}
LOAD_PASSWORD = "loadpw"


class KamailioError(RuntimeError):
    """Kamailio did not start, died, or a kamcmd call failed."""


class PortInUse(KamailioError):
    """Kamailio could not bind one of its ports (someone took it since we probed)."""


# --------------------------------------------------------------------------- ports and processes


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, udp: bool = True, tcp: bool = True, tries: int = 200) -> int:
    """A port number that is currently free for UDP and/or TCP on ``host``.

    Picked at random below the kernel's ephemeral range (see the module docstring); falls back to
    kernel-assigned ports when that range leaves no room.
    """
    low, _ = _ephemeral_range()
    start = 20000 if low > 21000 else 1024
    for _ in range(tries):
        port = random.randrange(start, low) if low - start > 1000 else _kernel_port(host)
        if (not udp or _bindable(host, port, socket.SOCK_DGRAM)) and (
            not tcp or _bindable(host, port, socket.SOCK_STREAM)
        ):
            return port
    raise KamailioError(f"no free port found on {host}")


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def guarded_argv(argv: Sequence[str], *, thread_bound: bool = True) -> list[str]:
    """Prefix ``argv`` with ``setpriv --pdeathsig TERM`` so the child dies with the test process.

    Linux delivers the parent-death signal when the *thread* that forked the child exits, so a
    long-lived child (Kamailio) is only guarded when spawned from the main thread; pass
    ``thread_bound=False`` to force it anyway.
    """
    setpriv = shutil.which("setpriv")
    on_main = threading.current_thread() is threading.main_thread()
    if setpriv is None or (thread_bound and not on_main):
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", *argv]


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group, ignoring a group that is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- certificate


def make_self_signed_cert(cert_path: Path, key_path: Path, host: str = "127.0.0.1") -> None:
    """Write a self-signed P-256 certificate for ``host`` (IP SAN + localhost) and its key.

    CA:TRUE with keyCertSign, so the same file also serves as the trust anchor (``ca_file``).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- ul.dump parsing


class UlContact(TypedDict):
    """One binding from ``ul.dump`` ("[not set]" becomes None)."""

    aor: str
    contact: str
    expires: int | None  # seconds left; None for "permanent"/"expired"/"deleted" (see raw)
    received: str | None
    instance: str | None  # +sip.instance, as stored (with the <urn:...> brackets)
    reg_id: int | None
    call_id: str | None
    cseq: int | None
    user_agent: str | None
    socket: str | None  # e.g. "tcp:127.0.0.1:25060": the Kamailio socket the REGISTER came in on
    tcpconn_id: int | None
    ruid: str | None
    raw: dict[str, str]  # every field of the Contact struct, verbatim


# Parsed kamcmd output: a struct is an ordered list of (key, value) pairs, where keys repeat
# (several "Info:" or "Contact:" entries) and a value is either text or a nested struct.
Node = list[tuple[str, "str | Node"]]

_NOT_SET = "[not set]"


def parse_kamcmd_struct(text: str) -> Node:
    """Parse kamcmd's indented ``Key: value`` / ``Key: {`` ... ``}`` output into nested pairs."""
    root: Node = []
    stack: list[Node] = [root]
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line == "{":
            continue
        if line == "}":
            if len(stack) > 1:
                stack.pop()
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue  # unkeyed array items do not occur in ul.dump
        value = value.strip()
        if value == "{":
            child: Node = []
            stack[-1].append((key.strip(), child))
            stack.append(child)
        else:
            stack[-1].append((key.strip(), value))
    return root


def _text(node: Node, key: str) -> str | None:
    for k, v in node:
        if k == key and isinstance(v, str):
            return None if v == _NOT_SET else v
    return None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _structs(node: Node) -> Iterable[Node]:
    """``node`` and every struct nested in it, depth first."""
    yield node
    for _, v in node:
        if isinstance(v, list):
            yield from _structs(v)


def parse_ul_dump(text: str) -> list[UlContact]:
    """Flatten ``kamcmd ul.dump`` (or ``ul.lookup``) output into one record per binding.

    An AOR record is any struct holding an ``AoR`` value and a ``Contacts`` struct: ul.dump nests
    them as Domains/Domain/AoRs/Info, ul.lookup returns one at the top level.
    """
    contacts: list[UlContact] = []
    for record in _structs(parse_kamcmd_struct(text)):
        aor = _text(record, "AoR")
        if aor is None:
            continue
        for contacts_node in (v for k, v in record if k == "Contacts" and isinstance(v, list)):
            for k, c in contacts_node:
                if k == "Contact" and isinstance(c, list):
                    contacts.append(_ul_contact(aor, c))
    return contacts


def _ul_contact(aor: str, node: Node) -> UlContact:
    raw = {k: v for k, v in node if isinstance(v, str)}
    return UlContact(
        aor=aor,
        contact=_text(node, "Address") or "",
        expires=_int(_text(node, "Expires")),
        received=_text(node, "Received"),
        instance=_text(node, "Instance"),
        reg_id=_int(_text(node, "Reg-Id")),
        call_id=_text(node, "Call-ID"),
        cseq=_int(_text(node, "CSeq")),
        user_agent=_text(node, "User-Agent"),
        socket=_text(node, "Socket"),
        tcpconn_id=_int(_text(node, "Tcpconn-Id")),
        ruid=_text(node, "Ruid"),
        raw=raw,
    )


# --------------------------------------------------------------------------- the process


def _options_probe(host: str, port: int, transport: str) -> bytes:
    local = f"{host}:9"  # never used for routing: replies go back by rport/the connection
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {local};rport;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{host}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{host}:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _probe_udp(host: str, port: int, timeout: float) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(_options_probe(host, port, "UDP"), (host, port))
            data = sock.recv(65535)
        except OSError:
            return False
    return data.startswith(b"SIP/2.0 200")


def _probe_tcp(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_options_probe(host, port, "TCP"))
            data = sock.recv(65535)
    except OSError:
        return False
    return data.startswith(b"SIP/2.0 200")


class Kamailio:
    """One Kamailio instance on loopback; see the module docstring.

    ``defines`` become ``-A`` switches of the template (AUTH_SHA256, AUTH_NO_QOP, NO_RECEIVED,
    NO_RETARGET, TOTAG_COMPAT, WITH_DEBUG). Memory and worker counts are parameters because the benchmark
    needs more than the tests.
    """

    def __init__(
        self,
        *,
        defines: Iterable[str] = (),
        host: str = "127.0.0.1",
        children: int = 2,
        tcp_children: int = 2,
        shm_mb: int = 64,
        pkg_mb: int = 8,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        ctl_max_kb: int = 1024,
        template: Path = DEFAULT_TEMPLATE,
        workdir: Path | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.defines = tuple(defines)
        self.host = host
        self.domain = host  # the registrar keys AORs by the To host; realm = To domain too
        self.children, self.tcp_children = children, tcp_children
        self.shm_mb, self.pkg_mb = shm_mb, pkg_mb
        self.min_expires, self.max_expires = min_expires, max_expires
        self.default_expires = default_expires
        self.ctl_max_kb = ctl_max_kb
        self.template = template
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="kam-"))
        self.config_path = self.workdir / "kamailio.cfg"
        self.ctl_path = self.workdir / "kamailio_ctl"
        self.cert_file = self.workdir / "cert.pem"
        self.key_file = self.workdir / "key.pem"
        self.ca_file = self.cert_file  # self-signed: the certificate is its own trust anchor
        self.log_path = self.workdir / "kamailio.log"
        self.udp_port = 0
        self.tcp_port = 0  # always equal to udp_port: Kamailio listens udp+tcp on one number
        self.tls_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[int], Kamailio] | None = None
        self._starts = 0

    # ----- lifecycle

    def start(self) -> None:
        """Start (or restart, on the same ports) and return once it answers on UDP and TCP."""
        if self.running:
            return
        self.stop()  # reap a crashed instance and whatever is left of its group
        if not self.cert_file.exists():
            make_self_signed_cert(self.cert_file, self.key_file, self.host)
        first = self.udp_port == 0
        for _attempt in range(5 if first else 1):
            if first:
                self._pick_ports()
            try:
                self._launch()
                return
            except PortInUse:
                if not first:
                    raise
        raise KamailioError("could not find free ports for Kamailio after 5 attempts")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left of it."""
        if self._halt(timeout):
            self._wait_ports_released()

    def _halt(self, timeout: float = 5.0) -> bool:
        proc = self._proc
        if proc is None:
            return False
        self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc.poll() is None:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid, signal.SIGKILL)  # stragglers (children) and a hung main process
        proc.wait()
        return True

    def restart(self) -> None:
        """Stop and start again on the same ports (the location table is lost: memory only)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temp folder (if this object created it)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> Kamailio:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----- addresses

    def port(self, transport: str = "udp") -> int:
        return self.tls_port if transport.lower() == "tls" else self.udp_port

    def uri(self, transport: str = "udp") -> str:
        """The proxy's own SIP URI for ``transport`` (usable as registrar/outbound proxy URI)."""
        t = transport.lower()
        return f"sip:{self.host}:{self.port(t)}" + ("" if t == "udp" else f";transport={t}")

    def target(self, transport: str = "udp") -> str:
        """``host:port`` for sipp and socket code."""
        return f"{self.host}:{self.port(transport)}"

    def aor(self, user: str) -> str:
        return f"sip:{user}@{self.domain}"

    # ----- inspection

    def kamcmd(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``kamcmd -s unix:<ctl> args...`` and return its stdout."""
        res = subprocess.run(
            ["kamcmd", "-s", f"unix:{self.ctl_path}", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if res.returncode != 0 or res.stdout.startswith("error:"):
            raise KamailioError(f"kamcmd {' '.join(args)} failed: {res.stdout.strip()} {res.stderr.strip()}")
        return res.stdout

    def ul_dump(self) -> list[UlContact]:
        """All bindings in the location table.

        kamcmd cannot read replies above ~64 KB ("reply too big"), about 250 bindings: use
        `ul_lookup` / `contact_count` for big tables.
        """
        return parse_ul_dump(self.kamcmd("ul.dump"))

    def ul_lookup(self, aor_user: str) -> list[UlContact]:
        """Bindings of one AOR (works at any table size); [] when it has none."""
        try:
            return parse_ul_dump(self.kamcmd("ul.lookup", "location", aor_user))
        except KamailioError as exc:
            if "not found" in str(exc).lower() or "has no contacts" in str(exc).lower():
                return []  # no record, or a record whose contacts all expired
            raise

    def registered_contacts(self, aor_user: str) -> list[str]:
        """Contact URIs bound to ``aor_user``."""
        return [c["contact"] for c in self.ul_lookup(aor_user)]

    def ul_remove_contact(self, aor_user: str, contact: str) -> None:
        """Drop one binding (exact Contact URI as in ``ul_dump()["contact"]``)."""
        self.kamcmd("ul.rm_contact", "location", aor_user, contact)

    def contact_count(self) -> int:
        """Number of bindings in the location table (usrloc statistics, any table size)."""
        out = self.kamcmd("stats.get_statistics", "location_contacts")
        match = re.search(r"location_contacts\s*=\s*(\d+)", out)
        if match is None:
            raise KamailioError(f"unexpected statistics output: {out!r}")
        return int(match.group(1))

    def ul_remove(self, aor_user: str) -> None:
        """Drop every binding of ``aor_user`` (as if they expired)."""
        try:
            self.kamcmd("ul.rm", "location", aor_user)
        except KamailioError as exc:
            if "not found" not in str(exc).lower():
                raise

    def log_text(self) -> str:
        """Kamailio's log (stderr) since the first start; restarts are marked with '=== start N'."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----- internals

    def _pick_ports(self) -> None:
        self.udp_port = self.tcp_port = free_port(self.host, udp=True, tcp=True)
        self.tls_port = free_port(self.host, udp=False, tcp=True)
        while self.tls_port == self.udp_port:
            self.tls_port = free_port(self.host, udp=False, tcp=True)
        self._render()

    def _render(self) -> None:
        values = {
            "KAMDIR": str(self.workdir),
            "HOST": self.host,
            "SIP_PORT": str(self.udp_port),
            "TLS_PORT": str(self.tls_port),
            "CHILDREN": str(self.children),
            "TCP_CHILDREN": str(self.tcp_children),
            "MIN_EXPIRES": str(self.min_expires),
            "MAX_EXPIRES": str(self.max_expires),
            "DEFAULT_EXPIRES": str(self.default_expires),
            "CTL_MAX_KB": str(self.ctl_max_kb),
        }
        text = self.template.read_text()
        for name, value in values.items():
            text = text.replace(f"@{name}@", value)
        leftover = re.findall(r"@[A-Z_]+@", text)
        if leftover:
            raise KamailioError(f"unrendered placeholders in {self.template}: {sorted(set(leftover))}")
        self.config_path.write_text(text)

    def _argv(self) -> list[str]:
        argv = [
            "kamailio", "-f", str(self.config_path), "-DD", "-E",
            "-m", str(self.shm_mb), "-M", str(self.pkg_mb),
            "-Y", str(self.workdir), "-w", str(self.workdir),
        ]
        for define in self.defines:
            argv += ["-A", define]
        return argv

    def _launch(self) -> None:
        self._starts += 1
        self.ctl_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self._starts}: {' '.join(self._argv())}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                guarded_argv(self._argv()),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills workers too
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, kill_group, proc.pid)
        try:
            self._wait_ready(proc)
        except BaseException:
            self._halt()  # no waiting for the ports: after PortInUse someone else holds them
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        ready = {"udp": False, "tcp": False}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._raise_startup_failure(proc.returncode)
            ready["udp"] = ready["udp"] or _probe_udp(self.host, self.udp_port, 0.1)
            ready["tcp"] = ready["tcp"] or (ready["udp"] and _probe_tcp(self.host, self.tcp_port, 0.5))
            if all(ready.values()) and self.ctl_path.exists() and proc.poll() is None:
                return
            time.sleep(0.02)
        raise KamailioError(f"Kamailio not ready after {self.startup_timeout}s: {ready}; log {self.log_path}")

    def _raise_startup_failure(self, code: int | None) -> None:
        tail = self.log_text().rsplit("=== start", 1)[-1][-3000:]  # this start's output only
        if "Address already in use" in tail:
            raise PortInUse(f"Kamailio could not bind its ports (exit {code})")
        raise KamailioError(f"Kamailio exited during start-up (exit {code}); log tail:\n{tail}")

    def _wait_ports_released(self, timeout: float = 2.0) -> None:
        # The kernel frees the sockets when the last worker is gone; restarts need them free.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _bindable(self.host, self.udp_port, socket.SOCK_DGRAM):
                return
            time.sleep(0.01)
