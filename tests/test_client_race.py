"""The suite's gradio client (conftest.lab_client) against the stream race of gradio_client 2.5.

A stream thread that is slow to finish after the server's ``close_stream`` (as on a busy 2-core machine)
is simulated by a 0.3 s pause after the library's own stream loop returns. The library's client then loses
every other request to an empty ``CancelledError``; the suite's client gets every answer."""

import time

import gradio as gr
import gradio_client.client as gcc
import pytest
from conftest import lab_client


@pytest.fixture
def slow_stream_end(monkeypatch):
    original = gcc.Client.stream_messages

    def slow(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(gcc.Client, "stream_messages", slow)


@pytest.fixture
def refusing_app():
    def refuse(x):
        raise gr.Error(f"{int(x)} must be positive")

    with gr.Blocks() as demo:
        n, o = gr.Number(), gr.Number()
        gr.Button().click(refuse, n, o, api_name="refuse")
    demo.queue().launch(prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


def answers(client, n=6) -> list[str]:
    out = []
    for i in range(n):
        try:
            client.predict(-i - 1, api_name="/refuse")
        except Exception as e:   # noqa: BLE001  (the message is what is compared)
            out.append(str(e))
    return out


def test_back_to_back_requests_each_get_their_own_answer(slow_stream_end, refusing_app):
    plain = answers(gcc.Client(refusing_app, verbose=False))
    assert sum("must be positive" not in a for a in plain) >= 2, plain   # the race, as the library has it
    ours = answers(lab_client(refusing_app))
    assert ours == [f"{-i - 1} must be positive" for i in range(6)], ours
