"""Alert sinks: a JSON webhook, syslog, and e-mail over SMTP ([alerts] in the config).

`Notifier.notify(event, alert)` only queues (never blocks the monitor); one worker task
delivers each notice to every configured sink in turn. The webhook is POSTed with a timeout
and retried with backoff; a notice that still fails is logged and dropped. When the queue is
full the notice is dropped and logged: the alert itself is in the database either way.

The notice (the webhook body, the syslog message and the mail body, as JSON):

    {"event": "raised" | "cleared", "source": "tandem-center", "instance": HOSTNAME,
     "at": ISO-8601, "alert": {"id", "dedup_key", "kind", "severity", "subject", "details"}}
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import logging.handlers
import smtplib
import socket
from email.message import EmailMessage

import httpx

from .config import AlertsConfig

log = logging.getLogger("tandem.center.sinks")

QUEUE_SIZE = 1000


class WebhookSink:
    def __init__(self, url: str, timeout: float, retries: int):
        self.url, self.retries = url, retries
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def send(self, notice: dict) -> None:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = await self.client.post(self.url, json=notice)
                if r.status_code < 300:
                    return
                error = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise RuntimeError(f"webhook {self.url}: {error} after {self.retries + 1} attempt(s)")

    async def close(self) -> None:
        await self.client.aclose()


class SyslogSink:
    SEVERITY = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}

    def __init__(self, address: str, facility: str):
        if ":" in address and not address.startswith("/"):
            host, _, port = address.rpartition(":")
            where: str | tuple = (host, int(port))
        else:
            where = address
        self.handler = logging.handlers.SysLogHandler(
            address=where, facility=logging.handlers.SysLogHandler.facility_names[facility])
        self.handler.ident = "tandem-center: "

    async def send(self, notice: dict) -> None:
        level = logging.INFO if notice["event"] == "cleared" else \
            self.SEVERITY.get(notice["alert"]["severity"], logging.WARNING)
        record = logging.LogRecord("tandem.center.alerts", level, __file__, 0,
                                   "%s", (json.dumps(notice, separators=(",", ":")),), None)
        await asyncio.to_thread(self.handler.emit, record)

    async def close(self) -> None:
        self.handler.close()


class EmailSink:
    def __init__(self, host: str, port: int, sender: str, to: list[str], timeout: float):
        self.host, self.port, self.sender, self.to, self.timeout = host, port, sender, to, timeout

    def _send(self, notice: dict) -> None:
        msg = EmailMessage()
        a = notice["alert"]
        msg["Subject"] = f"[tandem {notice['event']}] {a['severity']}: {a['subject']}"
        msg["From"], msg["To"] = self.sender, ", ".join(self.to)
        msg.set_content(json.dumps(notice, indent=2))
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.send_message(msg)

    async def send(self, notice: dict) -> None:
        await asyncio.to_thread(self._send, notice)

    async def close(self) -> None:
        pass


class Notifier:
    def __init__(self, cfg: AlertsConfig):
        self.sinks: list = []
        if cfg.webhook_url:
            self.sinks.append(WebhookSink(cfg.webhook_url, cfg.webhook_timeout, cfg.webhook_retries))
        if cfg.syslog_address:
            self.sinks.append(SyslogSink(cfg.syslog_address, cfg.syslog_facility))
        if cfg.smtp_host:
            self.sinks.append(EmailSink(cfg.smtp_host, cfg.smtp_port, cfg.smtp_from, cfg.smtp_to,
                                        cfg.webhook_timeout))
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.instance = socket.gethostname()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.sinks:
            self._task = asyncio.create_task(self._worker(), name="alert-sinks")

    def notify(self, event: str, alert: dict) -> None:
        if not self.sinks:
            return
        notice = {"event": event, "source": "tandem-center", "instance": self.instance,
                  "at": datetime.datetime.now(datetime.UTC).isoformat(), "alert": alert}
        try:
            self.queue.put_nowait(notice)
        except asyncio.QueueFull:
            log.error("alert sink queue full: notice dropped: %s %s", event, alert.get("dedup_key"))

    async def _worker(self) -> None:
        while True:
            notice = await self.queue.get()
            for sink in self.sinks:
                try:
                    await sink.send(notice)
                except Exception as e:        # one sink failing does not stop the others
                    log.error("alert sink %s failed: %s", type(sink).__name__, e)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sink in self.sinks:
            await sink.close()
