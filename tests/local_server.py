"""Test helper: an HTTP server on 127.0.0.1 in a background thread, for download tests."""
import contextlib
import http.server
import threading


@contextlib.contextmanager
def local_server(handler):
    """Serve `handler` on a free loopback port; the server's `url` attribute is its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
