"""A small relay: aiosmtpd applies the domain policy, accepted mail goes on to a downstream host.

Needs the aiosmtpd extra (``pip install 'domainpolicy[aiosmtpd]'``; without it the script says
so and exits 2).  Run it (the downstream server must accept mail from this host for any
recipient)::

    python examples/aiosmtpd_relay.py --config examples/tenants.toml \\
        --listen 127.0.0.1:10025 --downstream 127.0.0.1:25

then ``swaks --server 127.0.0.1:10025 --from alice@contoso.com --to bob@example.org``.  A
tenant's servers that relay from unregistered domains get ``550 5.7.750`` once over the limits
in the configuration.  Stop with Ctrl-C.

This is an example, not a mail server: it forwards each message once, synchronously, and a
downstream failure makes the client retry (``451 4.4.0``).  It keeps no queue.
"""

from __future__ import annotations

import argparse
import logging
import signal
import smtplib
import sys
import threading
from collections.abc import Callable
from typing import Any

from domainpolicy import load_config

try:
    from aiosmtpd.controller import Controller

    from domainpolicy.integrations.aiosmtpd import PolicyHandler
except ModuleNotFoundError as missing:  # the aiosmtpd extra is not installed
    if (missing.name or "").partition(".")[0] != "aiosmtpd":
        raise
    print("aiosmtpd_relay.py needs aiosmtpd: pip install 'domainpolicy[aiosmtpd]'", file=sys.stderr)
    raise SystemExit(2) from None

__all__ = ["build_controller", "forwarder", "main"]


def forwarder(host: str, port: int, *, timeout: float = 30.0) -> Callable[[Any], str]:
    """A sync relay callable for `PolicyHandler` that sends each envelope to *host*:*port*.

    The handler runs it in a worker thread.  Recipients the downstream host refuses are
    reported in the reply; if it refuses them all (or the connection fails) the exception
    propagates and the client gets ``451 4.4.0`` and retries.

    Raises:
        OSError: the downstream host cannot be reached (``smtplib.SMTPException`` included).
    """

    def relay(envelope: Any) -> str:
        content = envelope.original_content or b""
        with smtplib.SMTP(host, port, timeout=timeout) as client:
            refused = client.sendmail(
                envelope.mail_from,
                envelope.rcpt_tos,
                content,
                # smtplib adds its own SIZE; BODY and SMTPUTF8 must go on as received.
                mail_options=[o for o in envelope.mail_options if not o.startswith("SIZE=")],
            )
        if refused:
            return f"250 2.0.0 OK, relayed; {len(refused)} recipient(s) refused downstream"
        return "250 2.0.0 OK, relayed"

    return relay


def build_controller(
    config_path: str,
    listen: tuple[str, int],
    downstream: tuple[str, int],
    *,
    check_at: str = "mail",
) -> Controller:
    """An aiosmtpd `Controller` (not started) running `PolicyHandler` with `forwarder`.

    Raises:
        InvalidConfiguration: the configuration file is invalid.
        StoreUnavailable: the configured store cannot be opened.
    """
    config = load_config(config_path)
    policy = config.build_policy()
    handler = PolicyHandler(
        policy,
        check_at="rcpt" if check_at == "rcpt" else "mail",
        relay=forwarder(*downstream),
        alerts=config.alerts,  # [alerts]: deliver the outbox's notices from this process
    )
    return Controller(handler, hostname=listen[0], port=listen[1])


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, start the relay and serve until SIGINT or SIGTERM.

    Raises:
        SystemExit: bad command-line arguments.
    """
    parser = argparse.ArgumentParser(
        description="aiosmtpd relay applying the domain policy, forwarding accepted mail"
    )
    parser.add_argument("--config", required=True, help="tenants.toml")
    parser.add_argument("--listen", default="127.0.0.1:10025", type=_host_port)
    parser.add_argument("--downstream", required=True, type=_host_port)
    parser.add_argument("--check-at", choices=["mail", "rcpt"], default="mail")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    controller = build_controller(args.config, args.listen, args.downstream, check_at=args.check_at)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
        controller.handler.close()


if __name__ == "__main__":
    main()
