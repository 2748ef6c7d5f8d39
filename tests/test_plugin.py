"""The plugin client against a scripted loopback server: retries, auth, fallbacks, odd bodies."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from reconciler.plugin import (
    AnswerLost,
    InDoubt,
    Item,
    NotSent,
    PluginClient,
    Unavailable,
    Unpaced,
    retry_after,
    transient_apply_errors,
)
from reconciler.ratelimit import SharedRateLimiter

from .faultserver import FaultServer, Step, converge, plan_for

ITEMS = [Item(11, "dcim.site", {"site": {"name": "a"}}), Item(12, "dcim.site", {"site": {"name": "b"}})]


@pytest.fixture
def server():
    fault = FaultServer()
    yield fault
    fault.close()


def netbox(url: str, **overrides) -> SimpleNamespace:
    values = dict(url=url, timeout_seconds=2.0, server_timeout_seconds=3.0, max_attempts=4, api="auto", verify_tls=True,
                  token="static-token", token_url="", client_id="", client_secret="", client_secret_file="")
    values.update(overrides)
    return SimpleNamespace(**values)


def client(url: str, pacer=None, limiter=None, **overrides) -> PluginClient:
    return PluginClient(netbox(url, **overrides), limiter or SharedRateLimiter(0, 1), pacer)


def test_bulk_plan_apply_sends_protojson_entities_and_matches_results_by_id(server):
    def shuffled(body):
        step = converge(body)
        step.body["results"].reverse()  # order is not how results are matched
        return step
    server.script("bulk-plan-apply/", Step(answer=shuffled))
    results = client(server.url).plan_apply(ITEMS, "br4nch01")
    assert results[11].change_set["id"] == "cs-11" and results[12].change_set["id"] == "cs-12"
    [call] = server.calls("bulk-plan-apply/")
    assert call.body == {"entities": [{"id": "11", "object_type": "dcim.site", "entity": {"site": {"name": "a"}}},
                                      {"id": "12", "object_type": "dcim.site", "entity": {"site": {"name": "b"}}}]}
    assert call.headers["Authorization"] == "Bearer static-token"
    assert call.headers["X-NetBox-Branch"] == "br4nch01"
    assert call.headers["Content-Type"] == "application/json"


def test_no_branch_header_without_a_branch(server):
    server.script("bulk-plan/", Step(answer=lambda body: converge(body)))
    client(server.url).plan(ITEMS, None)
    assert "X-NetBox-Branch" not in server.calls("bulk-plan/")[0].headers


def test_207_mix_is_parsed_like_200(server):
    server.script("bulk-plan-apply/", Step(207, {"results": [
        {"id": "11", "change_set": plan_for("11"), "errors": None},
        {"id": "12", "change_set": None, "errors": {"plan": {"dcim.site": {"status": [["'bogus' is not valid"]]}}}},
        {"id": "13", "change_set": plan_for("13"), "errors": {"apply": {"dcim.site": {"name": ["too long"]}}}},
        "not an object", {"no": "id"},
    ]}))
    results = client(server.url).plan_apply(ITEMS, None)
    assert results[11].plan_errors is None and results[11].apply_errors is None
    assert results[12].plan_errors == {"dcim.site": {"status": [["'bogus' is not valid"]]}}
    assert results[13].apply_errors == {"dcim.site": {"name": ["too long"]}}
    assert set(results) == {11, 12, 13}


def test_an_apply_that_failed_only_in_netboxs_database_is_marked_transient_where_it_is_parsed(server):
    server.script("bulk-plan-apply/", Step(200, {"results": [
        {"id": "11", "change_set": plan_for("11"), "errors": {"apply": {"__all__": ["db_deadlock_after_retries"]}}},
        {"id": "12", "change_set": plan_for("12"), "errors": {"apply": {"__all__": ["db_error", "name too long"]}}},
        {"id": "13", "change_set": plan_for("13"), "errors": {"apply": {"__all__": "db_error"}}},
    ]}))
    results = client(server.url).plan_apply(ITEMS3, None)
    assert [results[n].apply_transient for n in (11, 12, 13)] == [True, False, True]


@pytest.mark.parametrize("errors, transient", [
    ({"__all__": [["db_error"]]}, True),
    ([{"__all__": "db_error"}, {}], True),
    ([[], {"__all__": "db_deadlock_after_retries"}], True),
    ({"__all__": "db_error", "dcim.site": []}, True),
    ({"__all__": []}, False),  # nothing said: not a database error
    ([{}], False),
    ({"dcim.site": {"__all__": ["db_error"]}}, False),
])
def test_transient_apply_errors_by_shape(errors, transient):
    assert transient_apply_errors(errors) is transient


def test_bulk_plan_errors_are_not_unwrapped(server):
    server.script("bulk-plan/", Step(200, {"results": [{"id": "11", "errors": {"ipam.prefix": {"__all__": ["bad"]}}}]}))
    assert client(server.url).plan(ITEMS, None)[11].plan_errors == {"ipam.prefix": {"__all__": ["bad"]}}


def test_5xx_then_success_is_retried(server):
    server.script("bulk-plan-apply/", Step(500, {"errors": {"request": {"__all__": ["internal error"]}}}),
                  Step(503, b"<html>busy</html>"), Step(answer=converge))
    results = client(server.url).plan_apply(ITEMS, None)
    assert set(results) == {11, 12} and len(server.calls("bulk-plan-apply/")) == 3


def test_5xx_every_time_is_unavailable_after_max_attempts(server):
    server.default("bulk-plan-apply/", Step(503, b"unavailable"))
    with pytest.raises(Unavailable, match="failed after 3 attempts: HTTP 503"):
        client(server.url, max_attempts=3).plan_apply(ITEMS, None)
    assert len(server.calls("bulk-plan-apply/")) == 3


class InFlight(Unpaced):
    """Records what the client says about requests that may be running in NetBox."""

    def __init__(self) -> None:
        self.said: list[float] = []

    def in_flight(self, until: float) -> None:
        self.said.append(until)


@pytest.mark.parametrize("endpoint", ["bulk-plan/", "bulk-plan-apply/"])
@pytest.mark.parametrize("failure", [Step(answer=converge, delay=1.5), Step(504, b"gateway timeout"),
                                     Step(502, b"bad gateway")], ids=["read-timeout", "504", "502"])
def test_a_request_that_went_unanswered_is_never_sent_again(server, endpoint, failure):
    """NetBox goes on working on a request when we stop waiting for it (a proxy's 502/504 too): sending
    the batch again would have two requests plan or apply the same entities at once. (The batch was
    sent max_attempts times in a row after a read timeout.)"""
    server.default(endpoint, failure)
    pacer = InFlight()
    plugin = client(server.url, pacer, timeout_seconds=0.3, server_timeout_seconds=120.0, max_attempts=4)
    sent_at = time.time()
    with pytest.raises(InDoubt, match="not sent again while NetBox may still be working on it") as raised:
        (plugin.plan if endpoint == "bulk-plan/" else plugin.plan_apply)(ITEMS, None)
    gave_up = time.time()
    assert len(server.calls(endpoint)) == 1
    # NetBox may have taken it up only as we gave up (queued behind busy workers), and then works 120 s.
    assert sent_at + 120 <= raised.value.until <= gave_up + 120
    before, after = pacer.said  # before sending (the longest it could run), then once we gave up
    assert before >= after == raised.value.until  # and no all-clear: still in doubt


def test_an_answered_request_is_cleared_and_one_that_never_left_is_not_in_doubt(server):
    server.script("bulk-plan/", Step(503, b"busy"))
    server.default("bulk-plan/", Step(answer=converge))
    pacer = InFlight()
    client(server.url, pacer).plan(ITEMS, None)
    assert pacer.said[1::2] == [0.0, 0.0] and len(pacer.said) == 4  # each answer ends its request
    url = server.url
    server.close()
    with pytest.raises(Unavailable, match="NewConnectionError") as raised:
        client(url, pacer, max_attempts=1).plan(ITEMS, None)
    assert not isinstance(raised.value, InDoubt) and pacer.said[-1] == 0.0


def test_429_honours_retry_after(server):
    server.script("bulk-plan-apply/", Step(429, {"detail": "slow down"}, headers={"Retry-After": "1"}),
                  Step(answer=converge))
    pacer = CountingPacer()
    client(server.url, pacer).plan_apply(ITEMS, None)
    assert pacer.slept == [1.0] and len(server.calls("bulk-plan-apply/")) == 2  # waited what it was told, once
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("120") == 60.0 and retry_after(None) is None


def test_connection_refused_is_unavailable(server):
    url = server.url
    server.close()
    with pytest.raises(Unavailable, match="failed after 2 attempts: (NewConnectionError|MaxRetryError)"):
        client(url, max_attempts=2).plan(ITEMS, None)


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", json.dumps({"results": "nope"}).encode()],
                         ids=["broken", "empty", "array", "results-not-a-list"])
def test_malformed_bodies_are_unavailable_not_a_verdict(server, body):
    server.default("bulk-plan-apply/", Step(200, body))
    with pytest.raises(Unavailable):
        client(server.url).plan_apply(ITEMS, None)


def test_400_envelope_refusal_is_a_plan_error_for_every_entity(server):
    server.script("bulk-plan/", Step(400, {"errors": {"request": {"entities": ["a non-empty list is required"]}}}))
    results = client(server.url).plan(ITEMS, None)
    assert all(r.plan_errors == {"request": {"errors": {"request": {"entities": ["a non-empty list is required"]}}}}
               for r in results.values())


def test_invalid_branch_plain_text_400_is_unavailable(server):
    server.script("bulk-plan/", Step(400, b"Invalid branch identifier"))
    with pytest.raises(Unavailable, match="Invalid branch identifier"):
        client(server.url).plan(ITEMS, "gone1234")


def test_404_on_bulk_falls_back_to_one_call_per_entity(server):
    server.default("generate-diff/", Step(answer=lambda body: Step(200, {
        "id": "x", "errors": None, "change_set": plan_for(body["entity"]["site"]["name"])})))
    server.default("apply-change-set/", Step(answer=lambda body: Step(200, {"id": body["id"], "errors": None})))
    plugin = client(server.url)
    results = plugin.plan_apply(ITEMS, "br1")
    assert results[11].change_set["id"] == "cs-a" and results[12].apply_errors is None
    assert len(server.calls("generate-diff/")) == 2 and len(server.calls("apply-change-set/")) == 2
    assert all(c.headers["X-NetBox-Branch"] == "br1" for c in server.calls("apply-change-set/"))
    plugin.plan_apply(ITEMS, None)  # the fallback is remembered: no second 404 on the bulk endpoint
    assert len(server.calls("bulk-plan-apply/")) == 1


def test_fallback_reports_plan_and_apply_errors_and_skips_empty_plans(server):
    answers = iter([Step(400, {"id": "p", "errors": {"dcim.site": {"slug": ["invalid"]}}}),
                    Step(200, {"id": "q", "errors": None, "change_set": {"id": "q", "changes": [], "branch": None}})])
    server.default("generate-diff/", Step(answer=lambda body: next(answers)))
    results = client(server.url, api="single").plan_apply(ITEMS, None)
    assert results[11].plan_errors == {"dcim.site": {"slug": ["invalid"]}}
    assert results[12].change_set["changes"] == []
    assert server.calls("apply-change-set/") == [] and server.calls("bulk-plan-apply/") == []


ITEMS3 = ITEMS + [Item(13, "dcim.site", {"site": {"name": "c"}})]


def single_plans(server):
    server.default("generate-diff/", Step(answer=lambda body: Step(200, {
        "id": "x", "errors": None, "change_set": plan_for(body["entity"]["site"]["name"])})))


@pytest.mark.parametrize("failure", [Step(503, b"busy"), Step(200, {"id": "cs-b", "errors": None}, delay=1.5)],
                         ids=["5xx", "timeout"])
def test_a_change_set_that_may_have_reached_the_plugin_is_not_applied_twice(server, failure):
    """Replaying apply-change-set/ after a timeout or a 5xx could create an object twice: the entity
    is reported unavailable (planned afresh later), the one done before keeps its result, and the
    one after is not sent at all."""
    single_plans(server)
    server.script("apply-change-set/", Step(200, {"id": "cs-a", "errors": None}), failure)
    results = client(server.url, api="single", timeout_seconds=0.5).plan_apply(ITEMS3, None)
    assert results[11].change_set["id"] == "cs-a" and results[11].unavailable is None
    assert "apply-change-set/" in results[12].unavailable and "not sent again" in results[12].unavailable
    assert (results[12].running_until is not None) == (failure.delay > 0)  # unanswered: NetBox may be on it
    assert results[13].unavailable == results[12].unavailable
    assert [c.body["id"] for c in server.calls("apply-change-set/")] == ["cs-a", "cs-b"]
    assert [c.body["entity"]["site"]["name"] for c in server.calls("generate-diff/")] == ["a", "b"]


def test_a_change_set_refused_with_429_or_no_connection_is_sent_again(server):
    single_plans(server)
    server.script("apply-change-set/", Step(429, {"detail": "slow"}, headers={"Retry-After": "0"}))
    server.default("apply-change-set/", Step(answer=lambda body: Step(200, {"id": body["id"], "errors": None})))
    results = client(server.url, api="single").plan_apply(ITEMS[:1], None)
    assert results[11].unavailable is None and len(server.calls("apply-change-set/")) == 2
    url = server.url
    server.close()
    with pytest.raises(Unavailable, match="failed after 2 attempts: NewConnectionError"):  # retried: never arrived
        client(url, max_attempts=2)._call("POST", "apply-change-set/", {"id": "cs-a"}, None, replay_safe=False)


def test_an_apply_that_reached_the_plugin_is_never_resent_even_with_one_attempt_allowed(server):
    server.default("apply-change-set/", Step(500, {"error": "boom"}))
    with pytest.raises(AnswerLost, match="not sent again"):
        client(server.url, max_attempts=1)._call("POST", "apply-change-set/", {"id": "cs-a"}, None, replay_safe=False)
    assert len(server.calls("apply-change-set/")) == 1


def test_a_bulk_apply_refused_whole_applied_nothing(server):
    server.default("bulk-apply/", Step(400, {"change_sets": ["change_sets must not be empty"]}))
    results = client(server.url).apply({7: {"id": "cs-7", "changes": [{}]}}, None)
    assert results[7].sent is False and "refused the whole request" in results[7].unavailable
    assert results[7].apply_errors is None


def test_the_first_entity_unavailable_makes_the_whole_batch_unavailable(server):
    server.default("generate-diff/", Step(503, b"down"))
    with pytest.raises(Unavailable, match="generate-diff/ failed after 2 attempts"):
        client(server.url, api="single", max_attempts=2).plan(ITEMS, None)


class CountingPacer:
    """A role as the client sees it: counts heartbeats and can be told to stop after some."""

    def __init__(self, stop_after_beats: int | None = None) -> None:
        self.beats, self.stop_after_beats = 0, stop_after_beats
        self.asked: list[float] = []  # every wait the client asked for (retries, the rate limit)
        self.slept: list[float] = []  # those it got

    @property
    def stopping(self) -> bool:
        return self.stop_after_beats is not None and self.beats >= self.stop_after_beats

    def beat(self) -> None:
        self.beats += 1

    def pause(self, seconds: float) -> bool:
        self.asked.append(seconds)
        if self.stopping:  # as Role.pause: a stop ends the wait at once
            return False
        time.sleep(seconds)
        self.slept.append(seconds)
        return True

    def in_flight(self, until: float) -> None:
        pass


def test_every_request_beats_the_heartbeat_so_a_long_fallback_batch_is_not_taken_for_a_hang(server):
    pacer, beats_seen = CountingPacer(), []

    def applied(body):
        beats_seen.append(pacer.beats)
        return Step(200, {"id": body["id"], "errors": None})

    single_plans(server)
    server.default("apply-change-set/", Step(answer=applied))
    client(server.url, pacer, api="single").plan_apply(ITEMS3, None)
    assert pacer.beats == 6  # generate-diff/ and apply-change-set/ for each of the three
    assert beats_seen == [2, 4, 6]  # each beat came before its request, not after


def test_no_token_request_once_stopping(server, tokens, tmp_path):
    server.default("bulk-plan/", Step(answer=converge))
    with pytest.raises(NotSent, match="stopping before the request was sent"):
        oauth_client(server, tokens, tmp_path, pacer=CountingPacer(stop_after_beats=0)).plan(ITEMS, None)
    assert tokens.requests == [] and server.calls("bulk-plan/") == []


def test_a_token_request_counts_against_the_deadline(server, tokens, tmp_path):
    """A token due first means two requests before the answer: 2 x (2 s + 2 s) do not fit in 6 s."""
    server.default("bulk-plan/", Step(answer=converge))
    plugin = oauth_client(server, tokens, tmp_path, timeout_seconds=2.0)
    with pytest.raises(Unavailable, match="could outlast the claim's lease"):
        plugin.plan(ITEMS, None, deadline=time.monotonic() + 6.0)
    assert tokens.requests == []
    plugin.plan(ITEMS, None, deadline=time.monotonic() + 9.0)
    assert len(tokens.requests) == 1
    plugin.plan(ITEMS, None, deadline=time.monotonic() + 5.0)  # token cached: one request fits
    assert len(server.calls("bulk-plan/")) == 2


def test_a_token_request_beats_the_heartbeat_too(server, tokens, tmp_path):
    server.default("bulk-plan/", Step(answer=converge))
    pacer = CountingPacer()
    oauth_client(server, tokens, tmp_path, pacer=pacer).plan(ITEMS, None)
    assert pacer.beats == 2 and len(tokens.requests) == 1


def test_a_stop_between_entities_sends_nothing_more(server):
    single_plans(server)
    pacer = CountingPacer(stop_after_beats=2)  # SIGTERM while the second entity is being planned
    results = client(server.url, pacer, api="single").plan(ITEMS3, None)
    assert results[11].change_set and results[12].change_set
    assert "stopping" in results[13].unavailable and not results[13].sent
    assert len(server.calls("generate-diff/")) == 2


class StopOnPause(CountingPacer):
    """SIGTERM arrives while the client waits to retry, just as the wait ends."""

    def pause(self, seconds: float) -> bool:
        self.stop_after_beats = 0
        return True


def test_a_stop_after_failed_attempts_still_counts_them(server):
    server.default("bulk-plan/", Step(503, b"busy", headers={"Retry-After": "0"}))
    with pytest.raises(Unavailable, match="stopping before the request was sent, after 1 failed attempts") as raised:
        client(server.url, StopOnPause()).plan(ITEMS, None)
    assert not isinstance(raised.value, NotSent) and len(server.calls("bulk-plan/")) == 1


def test_a_stop_while_waiting_for_the_rate_limit_sends_nothing(server):
    server.default("bulk-plan/", Step(answer=converge))
    pacer = CountingPacer(stop_after_beats=1)
    plugin = client(server.url, pacer, limiter=SharedRateLimiter(0.2, 1))  # the next token in 5 s
    plugin.plan(ITEMS, None)
    with pytest.raises(NotSent, match="stopping before the request was sent"):
        plugin.plan(ITEMS, None)
    [wait] = pacer.asked  # for the next token
    assert 0 < wait <= 5 and pacer.slept == [] and len(server.calls("bulk-plan/")) == 1  # ended at once


def test_no_request_starts_that_could_outlast_the_deadline(server):
    server.default("bulk-plan/", Step(answer=converge))
    plugin = client(server.url, timeout_seconds=2.0)
    with pytest.raises(Unavailable, match="not sent, it could outlast the claim's lease") as raised:
        plugin.plan(ITEMS, None, deadline=time.monotonic() + 3.0)  # a request may take 2 s connect + 2 s read
    assert not isinstance(raised.value, NotSent)  # counted against the rows: NotSent is for a stop
    assert server.calls("bulk-plan/") == []
    assert set(plugin.plan(ITEMS, None, deadline=time.monotonic() + 5.0)) == {11, 12}


def test_a_retry_wait_that_would_outlast_the_deadline_is_not_waited(server):
    server.default("bulk-plan/", Step(503, b"busy", headers={"Retry-After": "30"}))
    pacer = CountingPacer()
    with pytest.raises(Unavailable, match="HTTP 503; no time left to retry within the claim's lease") as raised:
        client(server.url, pacer).plan(ITEMS, None, deadline=time.monotonic() + 20.0)
    assert not isinstance(raised.value, NotSent)  # the first attempt was sent: the rows used an attempt
    assert pacer.asked == [] and len(server.calls("bulk-plan/")) == 1  # the 30 s wait was not even begun


def test_nul_characters_in_answers_are_replaced_so_they_can_be_stored(server):
    plan = plan_for("11")
    plan["changes"][0]["data"] = {"name": "a", "description": "before\x00after", "bad\x00key": ["x\x00"]}
    server.script("bulk-plan/", Step(200, {"results": [{"id": "11", "change_set": plan, "errors": None}]}))
    [change] = client(server.url).plan(ITEMS, None)[11].change_set["changes"]
    assert change["data"] == {"name": "a", "description": "before\ufffdafter", "bad\ufffdkey": ["x\ufffd"]}


def test_default_branch(server):
    server.script("default-branch/", Step(200, {"branch": {"id": "td5smq0f", "name": "staging"}}),
                  Step(200, {"branch": None}), Step(404, b"<html>Not Found</html>"))
    plugin = client(server.url)
    assert plugin.default_branch() == {"id": "td5smq0f", "name": "staging"}
    assert plugin.default_branch() is None
    assert plugin.default_branch() is None  # plugin older than 1.5


def test_static_token_rejected_is_unavailable(server):
    server.default("bulk-plan/", Step(403, {"detail": "Invalid token"}))
    with pytest.raises(Unavailable, match="refused our token"):
        client(server.url).plan(ITEMS, None)
    assert len(server.calls("bulk-plan/")) == 1


# --- OAuth2 client credentials ---


class TokenServer:
    """Issues numbered tokens (client credentials grant) and records the requests."""

    def __init__(self, lifetime: int = 3600) -> None:
        self.requests: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                outer.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.dumps({"access_token": f"tok-{len(outer.requests)}", "expires_in": lifetime,
                                   "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def tokens():
    token_server = TokenServer()
    yield token_server
    token_server.close()


def oauth_client(server, tokens, tmp_path, **overrides) -> PluginClient:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    return client(server.url, token="", token_url=tokens.url, client_id="diode-to-netbox",
                  client_secret_file=str(secret), **overrides)


def test_oauth_token_is_fetched_once_and_reused(server, tokens, tmp_path):
    server.default("bulk-plan/", Step(answer=converge))
    plugin = oauth_client(server, tokens, tmp_path)
    plugin.plan(ITEMS, None)
    plugin.plan(ITEMS, None)
    assert len(tokens.requests) == 1
    form = dict(pair.split("=") for pair in tokens.requests[0].decode().split("&"))
    assert form == {"grant_type": "client_credentials", "client_id": "diode-to-netbox", "client_secret": "s3cret",
                    "scope": "netbox%3Aread+netbox%3Awrite"}
    assert all(c.headers["Authorization"] == "Bearer tok-1" for c in server.calls("bulk-plan/"))


def test_oauth_token_is_renewed_once_on_invalid_token(server, tokens, tmp_path):
    server.script("bulk-plan/", Step(403, {"detail": "Invalid token"}), Step(answer=converge))
    oauth_client(server, tokens, tmp_path).plan(ITEMS, None)
    assert [c.headers["Authorization"] for c in server.calls("bulk-plan/")] == ["Bearer tok-1", "Bearer tok-2"]


def test_missing_scope_is_not_retried_with_a_new_token(server, tokens, tmp_path):
    server.default("bulk-plan-apply/", Step(403, {"detail": "You do not have permission to perform this action."}))
    with pytest.raises(Unavailable, match="You do not have permission"):
        oauth_client(server, tokens, tmp_path).plan_apply(ITEMS, None)
    assert len(tokens.requests) == 1 and len(server.calls("bulk-plan-apply/")) == 1


def test_oauth_token_is_renewed_before_it_expires(server, tmp_path):
    short = TokenServer(lifetime=1)
    try:
        server.default("bulk-plan/", Step(answer=converge))
        plugin = oauth_client(server, short, tmp_path)
        plugin.plan(ITEMS, None)
        time.sleep(1.1)
        plugin.plan(ITEMS, None)
        assert len(short.requests) == 2
    finally:
        short.close()


# --- the shared rate limit ---


def _ask_once(limiter: SharedRateLimiter, waits) -> None:
    """One request's turn: 0.0 if a token was granted, else the wait the limiter asked for (not waited)."""
    asked: list[float] = []
    limiter.acquire(sleep=lambda seconds: asked.append(seconds) or False)  # False: stop instead of waiting
    waits.append(asked[0] if asked else 0.0)


def test_rate_limit_is_shared_by_processes():
    """Five processes ask once each, with a burst of 2 and a token every 1000 s: two are granted, three are
    told to wait for the next token. Each process with a bucket of its own would have granted all five."""
    context = multiprocessing.get_context("fork")
    limiter = SharedRateLimiter(rate=0.001, burst=2, context=context)
    with context.Manager() as manager:
        waits = manager.list()
        workers = [context.Process(target=_ask_once, args=(limiter, waits)) for _ in range(5)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert [worker.exitcode for worker in workers] == [0] * 5
        granted, refused = [w for w in waits if w == 0.0], sorted(w for w in waits if w > 0.0)
    assert len(granted) == 2 and len(refused) == 3
    assert all(900 < wait <= 1000 for wait in refused)  # a whole token short: about 1 / rate


def _spin(limiter: SharedRateLimiter) -> None:
    while True:
        limiter.acquire()


def test_a_process_killed_inside_the_rate_limit_leaves_it_usable():
    """A worker SIGKILLed while it held the limiter's lock once left it held for ever: every other worker
    blocked in acquire(), was killed as hung, and restarted into the same lock."""
    context = multiprocessing.get_context("fork")
    limiter = SharedRateLimiter(rate=1e9, burst=1, context=context)  # no waiting: the lock is all there is
    for _ in range(20):
        spinner = context.Process(target=_spin, args=(limiter,))
        spinner.start()
        time.sleep(0.05)  # spinning: inside the lock about half of the time
        os.kill(spinner.pid, signal.SIGKILL)
        spinner.join()
        acquired = threading.Event()
        threading.Thread(target=lambda: (limiter.acquire(), acquired.set()), daemon=True).start()
        assert acquired.wait(10), "acquire() blocked: the killed process left the limiter locked"
