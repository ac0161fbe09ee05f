"""What an app or operator sees of an instance."""

from __future__ import annotations

from contract.codec import from_json
from contract.documents import InstanceView
from sipis.instance import Account, AppState, Instance, PushTarget, Registration, RegStatus


def make_instance() -> Instance:
    return Instance(
        selector="sel-1",
        account=Account(aor="sip:alice@example.com", username="alice", password="s3cret",
                        registrar="sips:pbx.example.com"),
        push=PushTarget("fcm", "org.example.phone", "0123456789abcdef", voip_token=None),
        token_hash="f" * 64, instance_id="8a3c1b0e", state=AppState.PROXIED,
        registration=Registration(status=RegStatus.REGISTERED, last_code=200, last_reason="OK",
                                  expires_at=1_800_000_600.0, failure_count=0, flow="tls 10.0.0.1:5061"),
        app_last_seen=1_800_000_000.0, created_at=1_799_999_000.0,
    )


def test_public_view_shows_no_secret_and_masks_tokens() -> None:
    assert make_instance().public_view() == {
        "selector": "sel-1", "state": "proxied", "aor": "sip:alice@example.com", "username": "alice",
        "auth_username": None, "registrar": "sips:pbx.example.com", "display_name": None,
        "instance_id": "8a3c1b0e", "reg_id": 1,
        "push": {"provider": "fcm", "app_id": "org.example.phone", "token": "0123…cdef", "voip_token": None,
                 "unreachable": False},
        "registration": {"status": "registered", "last_code": 200, "last_reason": "OK",
                         "expires_at": 1_800_000_600.0, "next_refresh_at": None, "failure_count": 0,
                         "backoff_until": None, "flow": "tls 10.0.0.1:5061"},
        "app_contact": None, "app_last_seen": 1_800_000_000.0, "created_at": 1_799_999_000.0,
        "disabled": False, "credentials_stored": True,
    }


def test_public_view_is_the_contract_document() -> None:
    instance = make_instance()
    assert from_json(InstanceView, instance.public_view()) == instance.view()
