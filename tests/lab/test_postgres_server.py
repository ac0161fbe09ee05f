"""The throwaway PostgreSQL of the tests and demos: it restarts on its port and leaves nothing behind."""

from __future__ import annotations

import socket

from lab.postgres import PostgresServer


def accepts(server: PostgresServer) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((server.host, server.port)) == 0


def test_restart_keeps_the_port_and_close_removes_everything() -> None:
    server = PostgresServer()
    try:
        server.start()
        url = server.create_database()
        assert url.startswith(f"postgresql://sipis@127.0.0.1:{server.port}/t_")
        server.psql("CREATE TABLE kept (x INTEGER); INSERT INTO kept VALUES (7)", database=url.rsplit("/", 1)[1])
        server.stop()
        assert not accepts(server)
        server.start()
        assert server.psql("SELECT x FROM kept", database=url.rsplit("/", 1)[1]) == "7"
    finally:
        server.close()
    assert not server.running and not accepts(server) and not server.root.exists()
    server.close()  # idempotent
