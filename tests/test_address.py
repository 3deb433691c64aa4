"""`--address` in either form (`ember.cluster.address`): a GCS address where a verb needs the dashboard, a dashboard
URL where it needs the GCS, and the one line that says which was used. No Ray: the local cluster's state is given,
and the servers that answer are tiny stand-ins (an HTTP one for a dashboard, one speaking bytes for a GCS)."""

from __future__ import annotations

import argparse
import http.server
import os
import socketserver
import threading

import pytest

from conftest import free_port
from ember.cli import _use_address_form
from ember.cluster import address
from ember.cluster.local import ClusterInfo
from ember.errors import EmberError

LOCAL = ClusterInfo(pid=1, address="127.0.0.1:46379", dashboard_url="http://127.0.0.1:48265", workers=2,
                    cpus_per_node=1, metrics_ports=[], session_dir="", service_discovery_file="")


@pytest.fixture
def serving():
    """Starts a server on a free loopback port in a thread; returns its port. Stopped at the end of the test."""
    servers = []

    def start(server_class, handler):
        server = server_class(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHTTP(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # what a dashboard says to a client without the token
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


class NotHTTP(socketserver.BaseRequestHandler):
    def handle(self):  # an HTTP/2 settings frame, as a GCS (gRPC) answers an HTTP/1 request
        self.request.recv(64)
        self.request.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")


def test_a_dashboard_url_becomes_a_gcs_address():
    assert address.to_gcs("http://127.0.0.1:48265/", LOCAL) == address.Found(
        "127.0.0.1:46379", "Ray GCS, from the dashboard URL http://127.0.0.1:48265: the local cluster of "
                           "`ember cluster up`")
    assert address.to_gcs("http://localhost:48265", LOCAL).address == "127.0.0.1:46379"  # one host, two names
    guessed = address.to_gcs("https://10.0.0.5:8265", LOCAL)
    assert guessed.address == "10.0.0.5:6379" and "its host, Ray's default GCS port" in guessed.note
    assert address.to_gcs("http://[fd00::5]:8265").address == "[fd00::5]:6379"
    for given in ("10.0.0.5:6379", "auto", "ray://10.0.0.5:10001"):  # forms Ray joins as they are
        assert address.to_gcs(given, LOCAL) == address.Found(given)


def test_the_local_clusters_gcs_address_becomes_its_dashboard_url():
    found = address.to_dashboard("127.0.0.1:46379", LOCAL)
    assert found.address == "http://127.0.0.1:48265"
    assert found.line() == ("cluster: http://127.0.0.1:48265 (Ray dashboard, from the GCS address 127.0.0.1:46379: "
                            "the local cluster of `ember cluster up`)")
    assert address.to_dashboard("auto", LOCAL).address == "http://127.0.0.1:48265"
    assert address.to_dashboard("http://10.0.0.5:8265/", LOCAL) == address.Found("http://10.0.0.5:8265")


def test_a_gcs_address_asks_the_gcs_for_its_dashboard(serving, monkeypatch):
    port = serving(socketserver.TCPServer, NotHTTP)
    asked = []
    monkeypatch.setattr(address, "_published_dashboard", lambda gcs: asked.append(gcs) or "http://127.0.0.1:9999")
    assert address.to_dashboard(f"127.0.0.1:{port}") == address.Found("http://127.0.0.1:9999",
                                                          f"Ray dashboard, from the GCS address 127.0.0.1:{port}")
    assert asked == [f"127.0.0.1:{port}"]
    monkeypatch.setattr(address, "_published_dashboard", lambda gcs: None)  # the GCS does not say: Ray's default port
    fallback = address.to_dashboard(f"127.0.0.1:{port}")
    assert fallback.address == "http://127.0.0.1:8265" and "Ray's default dashboard port" in fallback.note


def test_a_host_port_that_answers_http_is_a_dashboard(serving, monkeypatch):
    port = serving(http.server.HTTPServer, QuietHTTP)
    monkeypatch.setattr(address, "_published_dashboard", lambda gcs: pytest.fail("a dashboard is not asked as a GCS"))
    found = address.to_dashboard(f"127.0.0.1:{port}")
    assert found.address == f"http://127.0.0.1:{port}" and "answers HTTP" in found.note


def test_nothing_listening_falls_back_to_the_default_dashboard_port(monkeypatch):
    monkeypatch.setattr(address, "_published_dashboard", lambda gcs: pytest.fail("nothing there to ask"))
    found = address.to_dashboard(f"127.0.0.1:{free_port()}")
    assert found.address == "http://127.0.0.1:8265"


def test_an_address_of_neither_form_is_refused():
    for bad in ("nonsense", "10.0.0.5:port"):
        with pytest.raises(EmberError, match="expected a GCS address HOST:PORT"):
            address.to_dashboard(bad)


def test_the_command_says_which_address_it_used_only_when_it_translated(monkeypatch, capsys):
    monkeypatch.setattr("ember.cluster.local.read_state", lambda directory=None: LOCAL)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    jobs = argparse.Namespace(verb="jobs", address="127.0.0.1:46379")
    _use_address_form(jobs)
    assert jobs.address == "http://127.0.0.1:48265"
    assert capsys.readouterr().err == ("cluster: http://127.0.0.1:48265 (Ray dashboard, from the GCS address "
                                       "127.0.0.1:46379: the local cluster of `ember cluster up`)\n")
    run = argparse.Namespace(verb="run", address=None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:48265")  # as Ray's `ray job` CLI takes it
    _use_address_form(run)
    assert run.address == "127.0.0.1:46379"
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:46379"
    assert capsys.readouterr().err.startswith("cluster: 127.0.0.1:46379 (Ray GCS, from the dashboard URL")
    for args in (argparse.Namespace(verb="serve", address="127.0.0.1:46379"),
                 argparse.Namespace(verb="status", address="http://127.0.0.1:48265"),
                 argparse.Namespace(verb="report")):
        _use_address_form(args)
    assert capsys.readouterr().err == ""


def test_the_jobs_client_resolves_a_gcs_address(monkeypatch):
    from ember.cluster.jobs import resolve_dashboard

    monkeypatch.setattr("ember.cluster.local.read_state", lambda directory=None: LOCAL)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_dashboard("127.0.0.1:46379") == resolve_dashboard(None) == "http://127.0.0.1:48265"


def test_the_environment_gives_the_address_in_the_order_rays_clients_read_it(monkeypatch):
    from ember.connection import DASHBOARD, GCS, address_form, cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.6:8265")
    assert cluster_address(None, GCS) == cluster_address(None, address_form("run")) == "10.0.0.5:6379"
    assert cluster_address(None, DASHBOARD) == cluster_address(None, address_form("jobs")) == "http://10.0.0.6:8265"
    assert cluster_address("10.0.0.7:6379", DASHBOARD) == "10.0.0.7:6379"  # --address first
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert cluster_address(None, DASHBOARD) == "10.0.0.5:6379"
    assert address_form("report") is None
