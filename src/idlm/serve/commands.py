"""`idlm serve`: load the model, serve the API with uvicorn (a background thread) and run the engine loop in the
main thread until SIGINT / SIGTERM.

On SIGTERM the server stops accepting connections and new requests (503), lets in-flight requests run for
`--drain-timeout` seconds, ends the rest with finish_reason "abort" (streams get their last chunk and
[DONE]), then exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

log = logging.getLogger("idlm.serve")


def register(sub: argparse._SubParsersAction) -> None:
    from idlm.cli import add_model_args

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, /metrics, "
                                     "a web page)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--decoding", choices=["auto", "ar", "isd", "risd"], default=None,
                   help="default decoding of requests (default: auto with an adapter, else ar); requests may "
                        "name another with the `decoding` field")
    s.add_argument("--stride", type=int, default=None, help="default stride (auto: the largest it tries)")
    s.add_argument("--max-model-len", type=int, default=None, help="context per request (default: the model's)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which new ones get 503")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may still run before they are aborted")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ValueError(f"idlm serve needs the serve extra: pip install -e '.[serve]' ({e})") from e

    from idlm import LLM
    from idlm.engine.async_llm import AsyncLLM
    from idlm.serve.api import ServeOptions, create_app

    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device, quantize=args.quantize,
              panel=args.panel, kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching,
              max_model_len=args.max_model_len, stationary=args.stationary, compile=args.compile is not False)
    options = ServeOptions(args.served_model_name or llm.name, args.decoding or llm.default_decoding, args.stride,
                           args.api_key, args.max_queue, args.drain_timeout)
    engine = AsyncLLM(llm.engine)
    app = create_app(llm, engine, options)  # builds the default decoding (auto: measures step costs once)
    logger = logging.getLogger("idlm")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        logger.propagate = False
    if llm.engine.config.compile:  # compile the step graphs now, not on the first requests
        t0 = time.perf_counter()
        llm.warm_up(options.decoding, options.stride)
        log.info("compiled step graphs in %.1f s (--no-compile: eager steps, no start-up compile)",
                 time.perf_counter() - t0)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                log.info("ready at http://%s:%d (model %s as %r, decoding %s, %s)", host, port, llm.name,
                         options.served_model_name, options.decoding, str(llm.dtype).replace("torch.", ""))

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(args.drain_timeout) + 5, access_log=False)
    server = Server(config)

    def on_signal(sig, frame) -> None:  # SIGINT / SIGTERM: drain, then uvicorn closes; a second one forces it
        if engine.draining:
            server.force_exit = True
        else:
            log.info("draining: new requests get 503; in-flight ones may run %.0f s", args.drain_timeout)
            engine.drain(args.drain_timeout)
        server.should_exit = True

    def http() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    web = threading.Thread(target=http, name="idlm-http", daemon=True)
    web.start()
    engine.run()  # the engine loop in the main thread (see engine/async_llm.py: why), until uvicorn has stopped
    web.join()
    if not server.started:
        raise ValueError(f"could not serve on {args.host}:{args.port} (see the message above)")
    return 0
