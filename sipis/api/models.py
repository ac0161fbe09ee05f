"""Request and response bodies of the app API.

Every model forbids unknown fields, so a typo in an app (``registar``) is a 422 naming the field
instead of a silently ignored setting. Every string has a length limit, and every string that ends
up in a SIP header excludes control characters so no CR/LF can inject a header into our REGISTERs.
Validation messages never repeat the submitted value: passwords and tokens must not come back.
The instance and held-call answers are the contract's documents (:class:`contract.documents.InstanceView`,
:class:`contract.documents.HeldCall`), documented in OpenAPI from those types directly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from sipis.sip.message import NameAddr, SipParseError, SipURI

# One place for the limits so the OpenAPI document and the checks agree.
URI_MAX = 256
CONTACT_MAX = 1024
NAME_MAX = 128
SECRET_MAX = 256
APP_ID_MAX = 256
PUSH_TOKEN_MAX = 4096
SELECTOR_PATTERN = r"^[A-Za-z0-9:._-]{1,64}$"
ALLOWED_TRANSPORTS = frozenset({"udp", "tcp", "tls"})

# No whitespace or control characters: user names, ids and tokens are single SIP/HTTP tokens.
_NO_SPACE = r"^[^\s\x00-\x1f\x7f]+$"
# User names travel inside quoted-strings (digest ``username="..."``): no quote or backslash either.
_USER_PATTERN = r'^[^\s\x00-\x1f\x7f"\\]+$'
# Display names may contain spaces but no control characters.
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"

_URI_PATTERN = r"^[sS][iI][pP][sS]?:[^\s\x00-\x1f\x7f]+$"
# Only documented, not enforced by pydantic, so a bad URI gets parse_sip_uri's clearer message.
_URI_SCHEMA = Field(json_schema_extra={"pattern": _URI_PATTERN})
UriText = Annotated[str, StringConstraints(min_length=1, max_length=URI_MAX), _URI_SCHEMA]
UserName = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX, pattern=_USER_PATTERN)]
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX, pattern=_PRINTABLE)]
Selector = Annotated[str, StringConstraints(pattern=SELECTOR_PATTERN)]


def check_storable(value: str) -> str:
    """Refuse text that could be acknowledged but never stored or sent: lone surrogates (no UTF-8
    form; JSON's ``\\udfff`` escape yields one) and NUL. Other control characters are refused by
    each field's own pattern where the wire forbids them."""
    if "\x00" in value:
        raise PydanticCustomError("storable", "NUL character not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("storable", "text is not valid Unicode (lone surrogate)") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        # Before the field's own checks, for every string field (secrets included): what the API
        # accepts, the storage writer must be able to write.
        return check_storable(value) if isinstance(value, str) else value


def _uri_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("sip_uri", message)


def parse_sip_uri(value: str, *, need_user: bool) -> SipURI:
    """Check a sip:/sips: URI for use as AOR, registrar or contact; messages never echo the value."""
    scheme, colon, _ = value.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        raise _uri_error("not a sip: or sips: URI")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise _uri_error("whitespace or control characters in URI")
    try:
        uri = SipURI.parse(value)
    except SipParseError:
        # The parser's message quotes the input, which may hold a password: say less.
        raise _uri_error("malformed sip: URI (user, host or port)") from None
    if uri.password is not None:
        raise _uri_error("URI must not carry a password")
    if uri.headers:
        raise _uri_error("URI must not carry headers (?...)")
    if need_user and not uri.user:
        raise _uri_error("URI has no user part (expected sip:user@host)")
    return uri


class AccountIn(_Strict):
    """The SIP account the SIPIS registers on the app's behalf."""

    aor: UriText = Field(description="Address of record, e.g. sip:alice@pbx.example.com")
    username: UserName
    password: SecretStr = Field(min_length=1, max_length=SECRET_MAX, description="Never returned.")
    auth_username: UserName | None = Field(None, description="Digest user name if it differs")
    registrar: UriText | None = Field(
        None, description="Registrar or outbound proxy (sip:/sips:; transport=udp|tcp|tls)"
    )
    display_name: DisplayName | None = None

    @field_validator("aor")
    @classmethod
    def _check_aor(cls, value: str) -> str:
        parse_sip_uri(value, need_user=True)
        return value

    @field_validator("registrar")
    @classmethod
    def _check_registrar(cls, value: str | None) -> str | None:
        if value is None:
            return None
        uri = parse_sip_uri(value, need_user=False)
        if "transport" in uri.params:
            transport = (uri.params["transport"] or "").lower()
            if transport not in ALLOWED_TRANSPORTS:
                raise _uri_error("transport must be udp, tcp or tls")
            if uri.scheme == "sips" and transport == "udp":
                raise _uri_error("sips: URI cannot use transport=udp")
        return value


class PushIn(_Strict):
    """Where to send the wake-up push."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"provider": "apns", "app_id": "com.example.softphone", "token": "apns-device-token",
         "voip_token": "pushkit-token"},
    ]})

    provider: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        description="Push provider name, e.g. fcm, apns, mediator"
    )
    app_id: Annotated[str, StringConstraints(min_length=1, max_length=APP_ID_MAX, pattern=_NO_SPACE)]
    token: Annotated[str, StringConstraints(min_length=1, max_length=PUSH_TOKEN_MAX, pattern=_NO_SPACE)]
    voip_token: Annotated[
        str, StringConstraints(min_length=1, max_length=PUSH_TOKEN_MAX, pattern=_NO_SPACE)
    ] | None = Field(None, description="iOS PushKit token for incoming calls")


class EnrollIn(_Strict):
    """Enrolment: the account, the push target and optionally the app's own identifiers."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "account": {"aor": "sip:alice@pbx.example.com", "username": "alice", "password": "s3cret",
                    "registrar": "sips:pbx.example.com:5061;transport=tls"},
        "push": {"provider": "fcm", "app_id": "com.example.softphone", "token": "fcm-registration-token"},
    }]})

    account: AccountIn
    push: PushIn
    instance_id: UUID | None = Field(None, description="RFC 5626 +sip.instance UUID; generated if absent")
    selector: Selector | None = Field(
        None, description="Re-use this selector (update); a new one is generated if absent"
    )


class StateIn(_Strict):
    """The app went to the foreground (``active``) or to sleep (``inactive``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"state": "inactive"},
        {"state": "active", "contact": "sip:alice@192.0.2.10:5061;transport=tls;ob"},
    ]})

    state: Literal["active", "inactive"]
    contact: Annotated[str, StringConstraints(min_length=1, max_length=CONTACT_MAX)] | None = Field(
        None, description="The app's own fresh Contact URI, used to hand calls over; the name-addr "
                          "form of its REGISTER (<sip:…>;+sip.instance=…) is accepted and its URI kept"
    )

    @field_validator("contact")
    @classmethod
    def _check_contact(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "<" in value:
            value = _uri_of_name_addr(value)
        parse_sip_uri(value, need_user=False)
        return value


def _uri_of_name_addr(value: str) -> str:
    """The URI of a Contact written as the app writes it in its own REGISTER
    (``<sip:…>;+sip.instance="<urn:uuid:…>"``): the URI is what we keep, the header parameters
    (+sip.instance, reg-id, expires) are ours to set."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise _uri_error("whitespace or control characters in URI")
    try:
        return str(NameAddr.parse(value).uri)
    except SipParseError:
        raise _uri_error("malformed name-addr (expected <sip:…>;params)") from None


class EnrollOut(BaseModel):
    selector: str
    token: str = Field(description="Bearer token for this instance; shown only here")
    state: str


class ErrorOut(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. validation_error, forbidden")
    detail: str = Field(description="Human text; names the offending field for validation errors")


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    reasons: list[str] | None = None  # why not, when unavailable


def error_body(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail}
