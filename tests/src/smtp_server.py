"""The "internet" mail server of the p25 lab (see smtp_lab.rs), run by Debian's python3.

A real SMTP server, aiosmtpd (Debian package python3-aiosmtpd), listening on every address
of its network namespace, IPv4 and IPv6:

- 25 (relay, what p25 filters) and 587 (submission), both offering STARTTLS;
- 465 (submissions, RFC 8314): implicit TLS.

It accepts every message and appends one JSON line per delivered message to --log, so
the lab can check deliveries at the receiver rather than trusting the client. It writes
--ready once every socket listens, and exits by itself after --lifetime seconds.
"""

import argparse
import asyncio
import json
import ssl

from aiosmtpd.smtp import SMTP


class Recorder:
    """aiosmtpd handler: logs each message and accepts it."""

    def __init__(self, port, log):
        self.port = port
        self.log = log

    async def handle_DATA(self, server, session, envelope):
        record = {
            "port": self.port,
            "peer": session.peer[0],
            "tls": session.ssl is not None,
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "bytes": len(envelope.content or b""),
        }
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        return "250 2.0.0 Ok: delivered to the lab mailbox"


async def serve(args):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    log = open(args.log, "a", buffering=1, encoding="utf-8")
    loop = asyncio.get_running_loop()
    servers = []
    for port, implicit_tls in ((25, False), (587, False), (465, True)):

        def factory(port=port, implicit_tls=implicit_tls):
            # hostname is given so that aiosmtpd does not call getfqdn(): there is no DNS
            # in the lab, and a lookup would stall every greeting.
            return SMTP(
                Recorder(port, log),
                hostname=args.hostname,
                ident="p25 lab aiosmtpd",
                tls_context=None if implicit_tls else context,
                require_starttls=False,
            )

        # host=None: one socket per address family, on every address.
        servers.append(
            await loop.create_server(
                factory,
                host=None,
                port=port,
                ssl=context if implicit_tls else None,
                reuse_address=True,
            )
        )
    with open(args.ready, "w", encoding="utf-8") as ready:
        ready.write("ready\n")
    await asyncio.sleep(args.lifetime)
    for server in servers:
        server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--lifetime", type=float, required=True)
    parser.add_argument("--hostname", default="mx.lab.example")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
