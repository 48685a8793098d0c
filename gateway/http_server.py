"""The gateway's HTTP server: aiohttp's, with two things its defaults lack in front of the internet.

- Requests its parser refuses (a malformed request line, a header over the size limit) get an
  OpenAI-style JSON error, 431 for headers that are too large, and are counted in the metrics; aiohttp
  answers them with a plain-text 400.
- The turn endpoints skip aiohttp's application layer: a POST to exactly one of their paths goes
  straight to its handler (which answers its own errors), everything else through the application
  (its router, middlewares and `Expect` handling), as before. Resolving the route and running the
  middleware chain cost ~8 us a request, ~3 % of a routed turn (docs/EXPERIMENTS.md, "Gateway CPU,
  fifth pass").
- A header-read deadline: a connection has `header_timeout_s` to send a complete request head after
  it opens or after its previous response, else it is closed. aiohttp's keep-alive timer already
  closes a connection that has not completed a request when it fires; here it fires after
  `header_timeout_s`, so a slowloris client that trickles header bytes holds a socket for seconds,
  not the 75 s of aiohttp's default keep-alive.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.errors import ApiError

log = logging.getLogger("kvgate.gateway.http")

DEFAULT_HEADER_TIMEOUT_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]  # what web.Server takes


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering parse errors as JSON."""

    on_refused: Callable[[int], None]

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        # aiohttp logs each with a traceback at ERROR: anyone could flood the log with bad requests
        log.debug("refused a request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:  # part of a response went out: the connection is broken
            raise ConnectionError("response already started; cannot answer with an error")
        if status == 400 and isinstance(exc, LineTooLong):
            error = ApiError(431, "request header fields too large", code="header_too_large")
        elif status >= 500:
            error = ApiError(status, "internal gateway error")
        else:
            reason = (message or "bad request")[:200]
            error = ApiError(status, f"malformed HTTP request: {reason}", code="bad_request")
        self.on_refused(error.status)
        response = error.response()
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server, making `_JsonErrorHandler`s for its connections."""

    def __init__(self, *args: Any, on_refused: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a class per server: the handlers it makes report refusals to its own counter
        self.handler_class: type[_JsonErrorHandler] = type(
            "GatewayRequestHandler", (_JsonErrorHandler,), {"on_refused": staticmethod(on_refused)}
        )

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


class _Direct:
    """The server's request handler: a POST to one of `routes`' exact paths (no query, no `Expect`)
    goes to its handler, anything else to the application's own handler."""

    def __init__(self, routes: Mapping[str, Handler], app_handler: Handler) -> None:
        self._routes = dict(routes)
        self._app_handler = app_handler

    def __call__(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        handler = self._routes.get(request.raw_path) if request.method == hdrs.METH_POST else None
        if handler is None or hdrs.EXPECT in request.headers:
            return self._app_handler(request)
        return handler(request)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer parse errors as JSON and have a header-read deadline;
    `direct` maps paths to handlers that a POST there reaches without the application layer (each
    must answer its own errors, as the application's middlewares would)."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        on_refused: Callable[[int], None] = lambda status: None,
        direct: Mapping[str, Handler] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=header_timeout_s, **kwargs)
        self._on_refused = on_refused
        self._direct = direct

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # runs the app's start-up; its settings are kept
        handler = made.request_handler
        if self._direct:
            # typed for any BaseRequest; the app's request factory (kept below) makes web.Requests
            handler = cast(RawHandler, _Direct(self._direct, handler))
        return _Server(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            on_refused=self._on_refused,
            **made._kwargs,
        )
